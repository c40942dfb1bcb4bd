"""Turning EnableIPv6 off (issue #14): the next start finds the IPv6 lines in the old subnet.env and removes the
IPv6 masquerade/forward rules of that run (ip6tables here), as the IPv4 side removes a previous network's rules;
IPv4 keeps working."""

from __future__ import annotations

import json
import os
import secrets
import tempfile

import pytest

from flannelpy.lab.netns_lab import Lab, run

pytestmark = [pytest.mark.root, pytest.mark.etcd]

DUAL = {"Network": "10.5.0.0/16", "EnableIPv6": True, "IPv6Network": "fd42::/48", "Backend": {"Type": "vxlan"}}


@pytest.fixture
def lab(root):
    prefix = "fp6" + secrets.token_hex(2)
    lab = Lab(prefix=prefix, workdir=tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp"), ipv6=True, backend="vxlan",
              config=json.dumps(DUAL))
    try:
        lab.up(wait=30)
        yield lab
    finally:
        lab.down()


def flannel_rules(lab: Lab, i: int, tool: str) -> list[str]:
    out = run(f"{tool}-save", netns=lab.host(i).netns).stdout
    return [line for line in out.splitlines() if line.startswith("-A FLANNEL-")]


def test_a_restart_with_ipv6_off_removes_the_previous_runs_ipv6_rules(lab: Lab):
    before = flannel_rules(lab, 1, "ip6tables")
    assert any("fd42::/48" in rule for rule in before), before

    lab.stop_agent(1)
    lab.write_config(json.dumps({k: v for k, v in DUAL.items() if k not in ("EnableIPv6", "IPv6Network")}))
    mtime = os.stat(lab.host(1).subnet_file).st_mtime
    lab.start_agent(1)
    env = lab.wait_subnet_env(1, after_mtime=mtime)
    assert "FLANNEL_IPV6_SUBNET" not in env, env

    assert not [rule for rule in flannel_rules(lab, 1, "ip6tables") if "fd42:" in rule]
    assert "EnableIPv6 is off (the previous run had IPv6 subnet fd42:" in lab.tail_log(1, 40)
    # IPv4's rules are in place for this run's subnet (a new lease: the dual-stack key is not read with IPv6 off)
    ipv4 = flannel_rules(lab, 1, "iptables")
    subnet = env["FLANNEL_SUBNET"].rsplit(".", 1)[0] + ".0/24"
    assert any(f"-s {subnet} -d 10.5.0.0/16" in rule for rule in ipv4), ipv4
    assert any("-A FLANNEL-FWD -s 10.5.0.0/16" in rule for rule in ipv4), ipv4
    # the other host, still dual-stack, keeps its IPv6 rules
    assert any("fd42::/48" in rule for rule in flannel_rules(lab, 2, "ip6tables"))
