"""flannelctl leases against a real etcd holding leases written in flanneld's format."""

import json

import pytest

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
    assert lines[0].split() == ["SUBNET", "PUBLIC", "IP", "BACKEND", "VTEP", "MAC", "EXPIRES", "IN", "REFUSED"]
    assert lines[1].split()[:4] == ["10.5.1.0/24", "192.0.2.1", "vxlan", "c6:d2:32:6f:8f:44"]
    assert lines[1].split()[4].startswith(("23h", "24h")) and lines[1].split()[5] == "-"
    assert "never (reservation)" in lines[2]
    assert main(base + ["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["subnet"] for r in rows] == ["10.5.1.0/24", "10.5.2.0/24"]
    assert rows[0]["vni"] == 1 and rows[1]["expiration"] is None
    assert rows[0]["refused"] is None and rows[1]["refused_code"] is None


HOSTILE = {
    "10.5.3.0-24": '{"PublicIP":"127.0.0.1","BackendType":"vxlan","BackendData":{"VtepMAC":"02:00:00:00:00:03"}}',
    "192.168.77.0-24": '{"PublicIP":"192.0.2.7","BackendType":"vxlan","BackendData":{"VtepMAC":"02:00:00:00:00:04"}}',
    "10.5.4.0-24": '{"PublicIP":"192.0.2.8","BackendType":"vxlan","BackendData":{"VtepMAC":"C6:D2:32:6F:8F:44"}}',
    "10.5.1.128-25": '{"PublicIP":"192.0.2.9","BackendType":"vxlan","BackendData":{"VtepMAC":"02:00:00:00:00:05"}}',
}


def test_leases_say_why_an_agent_would_refuse_them(etcd, capsys):
    """The same admission rules as the agent, judged against the config in etcd."""
    etcd.etcdctl("put", f"{PREFIX}/config", CONFIG)
    etcd.etcdctl("put", f"{PREFIX}/subnets/10.5.1.0-24", V1)
    for key, value in HOSTILE.items():
        etcd.etcdctl("put", f"{PREFIX}/subnets/{key}", value)
    base = ["leases", "--etcd-endpoints", etcd.endpoint, "--etcd-prefix", PREFIX, "--etcd-api", "v3"]
    assert main(base + ["--json"]) == 0
    rows = {r["subnet"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["10.5.1.0/24"]["refused"] is None
    assert rows["10.5.3.0/24"]["refused_code"] == "public_ip" and "loopback" in rows["10.5.3.0/24"]["refused"]
    assert rows["192.168.77.0/24"]["refused_code"] == "outside_network"
    assert rows["10.5.4.0/24"]["refused_code"] == "duplicate_vtep_mac"
    assert rows["10.5.1.128/25"]["refused_code"] == "overlap"
    assert main(base) == 0
    out = capsys.readouterr()
    line = next(x for x in out.out.splitlines() if x.startswith("192.168.77.0/24"))
    assert line.endswith("subnet 192.168.77.0/24 is outside Network 10.5.0.0/16")
    # Without a valid config there is nothing to judge by: said once, on stderr.
    etcd.etcdctl("put", f"{PREFIX}/config", '{"Network":"127.0.0.0/16"}')
    assert main(base + ["--json"]) == 0
    out = capsys.readouterr()
    assert all(r["refused"] is None for r in json.loads(out.out))
    assert "the network config in etcd is invalid (Network: 127.0.0.0/16 overlaps loopback" in out.err


def test_a_wrong_prefix_names_the_prefixes_that_hold_a_network(etcd, capsys):
    """No config and no lease under the prefix: exit 1 and say where the network is."""
    etcd.etcdctl("put", "/atomic.io/network/config", CONFIG)
    etcd.etcdctl("put", "/atomic.io/network/subnets/10.5.1.0-24", V1)
    assert main(["leases", "--etcd-endpoints", etcd.endpoint, "--etcd-prefix", "/coreos.com/network"]) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.count("\n") == 1
    assert "nothing under /coreos.com/network/ (no config, no leases)" in out.err
    assert "found /atomic.io/network (a config and 1 lease, etcd v3): use --etcd-prefix /atomic.io/network" in out.err
    # nothing anywhere: says so, still exit 1
    assert main(["leases", "--etcd-endpoints", etcd.endpoint, "--etcd-prefix", "/x", "--etcd-api", "v2"]) == 1
    assert "no flannel network at the usual prefixes either" in capsys.readouterr().err


def test_a_config_without_leases_is_an_empty_table(etcd, capsys):
    etcd.etcdctl("put", f"{PREFIX}/config", CONFIG)
    assert main(["leases", "--etcd-endpoints", etcd.endpoint, "--etcd-prefix", PREFIX]) == 0
    out = capsys.readouterr()
    assert out.out.split() == ["SUBNET", "PUBLIC", "IP", "BACKEND", "VTEP", "MAC", "EXPIRES", "IN", "REFUSED"]
    assert "no leases under /fpop/network/subnets/ yet" in out.err


def test_leases_has_the_tls_and_auth_options_of_config(capsys):
    import pytest

    for argv in (["leases"], ["config", "get"], ["config", "set"], ["config", "validate"]):
        with pytest.raises(SystemExit):
            main([*argv, "--help"])
        text = capsys.readouterr().out
        for opt in ("--etcd-cafile", "--etcd-certfile", "--etcd-keyfile", "--etcd-username", "--etcd-password",
                    "--etcd-api", "--etcd-transport", "/etc/sysconfig/flanneld"):
            assert opt in text, (argv, opt)


DUAL_CONFIG = ('{"Network":"10.42.0.0/16","EnableIPv6":true,"IPv6Network":"fd42::/48",'
               '"Backend":{"Type":"vxlan"}}')
DUAL_VALUE = ('{"PublicIP":"10.199.0.11","PublicIPv6":"fd99::11","BackendType":"vxlan",'
              '"BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:11"},'
              '"BackendV6Data":{"VNI":1,"VtepMAC":"02:00:00:00:00:12"}}')


DUAL_VALUE_OUTSIDE = ('{"PublicIP":"10.199.0.12","PublicIPv6":"fd99::12","BackendType":"vxlan",'
                      '"BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:21"},'
                      '"BackendV6Data":{"VNI":1,"VtepMAC":"02:00:00:00:00:22"}}')


@pytest.mark.parametrize("api", ["v3", "v2"])
def test_leases_of_a_dual_stack_network_show_both_sides(etcd, capsys, api):
    """issue #14: flanneld's dual keys (`10.42.63.0-24&fd42:0:0:1f::-64`) are listed, not skipped, and an IPv6
    subnet outside IPv6Network is refused as the agents refuse it."""
    put = (lambda k, v: etcd.etcdctl("put", k, v)) if api == "v3" else (lambda k, v: etcd.etcdctl("set", k, v, api=2))
    put(f"{PREFIX}/config", DUAL_CONFIG)
    put(f"{PREFIX}/subnets/10.42.63.0-24&fd42:0:0:1f::-64", DUAL_VALUE)
    put(f"{PREFIX}/subnets/10.42.64.0-24&fd43:0:0:1::-64", DUAL_VALUE_OUTSIDE)
    base = ["leases", "--etcd-endpoints", etcd.endpoint, "--etcd-prefix", PREFIX, "--etcd-api", api]
    assert main(base + ["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["subnet"], r["ipv6_subnet"], r["public_ipv6"]) for r in rows] == [
        ("10.42.63.0/24", "fd42:0:0:1f::/64", "fd99::11"), ("10.42.64.0/24", "fd43:0:0:1::/64", "fd99::12")]
    assert rows[0]["refused"] is None
    assert "fd43:0:0:1::/64" in rows[1]["refused"] and "fd42::/48" in rows[1]["refused"]
    assert main(base) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:6] == ["SUBNET", "PUBLIC", "IP", "IPV6", "SUBNET", "PUBLIC"]
    assert lines[1].split()[:4] == ["10.42.63.0/24", "10.199.0.11", "fd42:0:0:1f::/64", "fd99::11"]
