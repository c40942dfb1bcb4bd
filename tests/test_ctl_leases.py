"""flannelctl leases against a real etcd holding leases written in flanneld's format."""

import json

from flannelpy.cli.flannelctl import main

PREFIX = "/fpop/network"
CONFIG = '{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}'
V1 = '{"PublicIP":"192.0.2.1","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"C6:D2:32:6F:8F:44"}}'
V2 = '{"PublicIP":"192.0.2.2","BackendType":"vxlan","BackendData":{"VtepMAC":"ee:84:9f:f3:57:3e"}}'


def test_leases_table_and_json(etcd, capsys):
    etcd.etcdctl("put", f"{PREFIX}/config", CONFIG)
    lease_id = etcd.etcdctl("lease", "grant", "86400").stdout.split()[1]
    etcd.etcdctl("put", "--lease", lease_id, f"{PREFIX}/subnets/10.5.1.0-24", V1)
    etcd.etcdctl("put", f"{PREFIX}/subnets/10.5.2.0-24", V2)  # no lease: a reservation
    base = ["leases", "--etcd-endpoints", etcd.endpoint, "--etcd-prefix", PREFIX, "--etcd-api", "v3"]
    assert main(base) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["SUBNET", "PUBLIC", "IP", "BACKEND", "VTEP", "MAC", "EXPIRES", "IN"]
    assert lines[1].split()[:4] == ["10.5.1.0/24", "192.0.2.1", "vxlan", "c6:d2:32:6f:8f:44"]
    assert lines[1].split()[4].startswith(("23h", "24h"))
    assert "never (reservation)" in lines[2]
    assert main(base + ["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["subnet"] for r in rows] == ["10.5.1.0/24", "10.5.2.0/24"]
    assert rows[0]["vni"] == 1 and rows[1]["expiration"] is None
