"""Docker on a dual-stack overlay (issue #14): flanneld writes `ipv6: true` and `fixed-cidr-v6` (the host's IPv6
subnet) into daemon.json, a real dockerd per host gives its container an IPv6 address from that subnet, and the
containers ping each other over IPv4 and IPv6 across hosts (vxlan: flannel.1 and flannel-v6.1)."""

from __future__ import annotations

import json
import secrets
import shutil
from ipaddress import IPv6Address, IPv6Interface

import pytest

from flannelpy.lab.docker_lab import DockerLab
from flannelpy.lab.dockerd import leftover_pids
from flannelpy.lab.netns_lab import run

pytestmark = [pytest.mark.docker, pytest.mark.root, pytest.mark.slow]


@pytest.fixture(params=["vxlan", "host-gw"])
def dual_docker_lab(request, root):
    for tool in ("dockerd", "docker", "containerd", "runc"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (apt-get install docker.io); .ci/setup installs it")
    lab = DockerLab(prefix=f"fpd{secrets.token_hex(2)}", hosts=2, backend=request.param, ipv6=True,
                    daemon_json={"ip-masq": False})
    try:
        lab.up()
        yield lab
    finally:
        lab.down()
        assert leftover_pids(lab.workdir) == []
        existing = run("ip", "netns", "list").stdout
        assert not [n for n in lab.all_namespaces() if n in existing]


def test_docker_containers_get_ipv6_from_the_lease_and_ping_across_hosts(dual_docker_lab: DockerLab):
    lab = dual_docker_lab
    for host in lab.host_list:
        subnet6 = IPv6Interface(host.subnet6).network
        with open(lab.daemon_json_path(host)) as f:
            doc = json.load(f)
        assert doc["ipv6"] is True and doc["fixed-cidr-v6"] == str(subnet6)
        # dockerd read it: the container's address comes from this host's IPv6 subnet
        assert IPv6Address(host.container_ip6) in subnet6, (host.container_ip6, subnet6)
        addr = run("ip", "-6", "-o", "addr", "show", "docker0", netns=host.netns).stdout
        assert any(IPv6Interface(w).ip in subnet6 for line in addr.splitlines() for w in line.split()[3:4]), addr
    assert lab.host(1).container_ip6 != lab.host(2).container_ip6
    assert lab.wait_all_pings(timeout=30) == {(1, 2): True, (2, 1): True}
    assert lab.wait_all_pings(timeout=30, ipv6=True) == {(1, 2): True, (2, 1): True}
