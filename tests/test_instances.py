"""Issue #12 part 6: several flanneld instances on one machine, as flanneld allows.

- Two instances in different network namespaces with flanneld's flags (so the same default
  -status-socket): both start; the second runs without the socket and says so.
- Two instances in one namespace with different -etcd-prefix and Network: each keeps its
  iptables rules in flanneld's shared chains through many resyncs, neither deletes the other's.

The default status socket lives in /run; so that the machine's /run is never touched, each
instance runs in a private mount namespace whose /run is the same scratch directory.
"""

from __future__ import annotations

import os
import subprocess
import time

import httpx
import pytest
from test_startup import Run, _stop, _wait_file, lab  # noqa: F401 - lab is the module's fixture

from flannelpy.hostnet import iptables_rules as R

pytestmark = [pytest.mark.root, pytest.mark.etcd]


def test_two_instances_in_two_namespaces_with_the_default_status_socket_both_start(lab):  # noqa: F811
    shared_run = os.path.join(lab.workdir, "shared-run")
    os.makedirs(shared_run, exist_ok=True)
    mounts = f"mount --bind {shared_run} /run"
    first, second = Run(lab, host=1), Run(lab, host=2)
    second.prefix = first.prefix  # one flannel network, two hosts: only the socket is shared
    procs = []
    try:
        # flanneld's flags only: no -status-socket, so both want /run/flannel/flanneld.sock
        procs.append(first.start(f"-subnet-file={first.subnet_file}", defaults=False, mounts=mounts))
        _wait_file(first.subnet_file, procs[0], first.log)
        procs.append(second.start(f"-subnet-file={second.subnet_file}", defaults=False, mounts=mounts))
        _wait_file(second.subnet_file, procs[1], second.log)
        time.sleep(1)
        assert all(p.poll() is None for p in procs)
        log2 = open(second.log).read()
        assert ("status socket /run/flannel/flanneld.sock: another flanneld is serving on it; "
                "running without a status socket") in log2, log2
        assert "running without a status socket" not in open(first.log).read()
        # the first instance still answers on the default socket
        sock = os.path.join(shared_run, "flannel", "flanneld.sock")
        with httpx.Client(transport=httpx.HTTPTransport(uds=sock), timeout=5) as client:
            status = client.get("http://flanneld/status").json()
        first_subnet = open(first.subnet_file).read().split("FLANNEL_SUBNET=")[1].split()[0]
        assert status["subnet"] == first_subnet.replace(".1/", ".0/"), status
        assert len(first.leases()) == 2
        assert [_stop(p) for p in procs] == [0, 0]
    finally:
        for p in procs:
            _stop(p)
        first.delete_device()
        second.delete_device()


def _chain(ns: str, table: str, chain: str) -> list[str]:
    out = subprocess.run(["nsenter", f"--net=/var/run/netns/{ns}", "iptables-save", "-t", table],
                         capture_output=True, text=True, check=True).stdout
    return R.parse_save(out).chain(table, chain) or []


def test_two_networks_in_one_namespace_keep_both_rule_sets_across_resyncs(lab):  # noqa: F811
    a = Run(lab, host=1, network="10.5.0.0/16", vni=1)
    b = Run(lab, host=1, network="10.6.0.0/16", vni=2)
    procs = []
    try:
        procs.append(a.start("-ip-masq", "-iptables-resync=1"))
        procs.append(b.start("-ip-masq", "-iptables-resync=1"))
        _wait_file(a.subnet_file, procs[0], a.log)
        _wait_file(b.subnet_file, procs[1], b.log)
        ns = a.host.netns
        watched = 6.0  # six resyncs of each
        deadline = time.monotonic() + watched
        samples = 0
        while time.monotonic() < deadline:
            post, fwd = _chain(ns, "nat", "FLANNEL-POSTRTG"), _chain(ns, "filter", "FLANNEL-FWD")
            for net in ("10.5.0.0/16", "10.6.0.0/16"):
                assert f"-s {net} -m comment --comment \"flanneld forward\" -j ACCEPT" in fwd, fwd
                assert any(f"-s {net} ! -d 224.0.0.0/4" in spec for spec in post), post
            samples += 1
            assert all(p.poll() is None for p in procs)
            time.sleep(0.25)
        for run in (a, b):
            text = open(run.log).read()
            assert "Some iptables rules are missing" not in text, text  # nobody had to rebuild
        print(f"FIGURE two networks in one namespace: both rule sets present in {samples} samples over "
              f"{watched:.0f}s of 1 s resyncs, 0 rebuilds")
        assert [_stop(p) for p in procs] == [0, 0]
    finally:
        for p in procs:
            _stop(p)
        a.delete_device()
        b.delete_device()
