"""One IPv6 repair pass of vxlan (flannel-v6.<VNI>) and host-gw, with N peers already in place,
for two trees of flannelpy: the pass's wall time as medians with the ratio B/A.

A pass is what the backends' repair loop does every 300 s (vxlan) or 10 s (host-gw) and after a
kernel notification: read the device, its address, the main table's IPv6 routes (and for vxlan
the device's neighbours and FDB), compare them with the accepted leases and fix the difference;
here the kernel already matches, so the pass only reads and compares.  The entries are made with
`ip -batch` in a namespace of this run, so both trees see exactly the same kernel.

    .venv/bin/python bench/ipv6_repair.py --trees 1d00dc8,WORK --peers 100,1000

A tree is `git archive REV` of flannelpy/ (WORK: this work tree as it is).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VNI, MAC = 1, "0e:00:00:00:00:01"
NETWORK6, UNDERLAY6 = "fd42::/48", "fd77::1"


def _peer(i: int) -> tuple[str, str, str, str]:
    """Peer i: its IPv6 subnet, subnet base, VTEP MAC and PublicIPv6."""
    return (f"fd42:0:{i // 256:x}:{(i % 256) + 1:x}::/64", f"fd42:0:{i // 256:x}:{(i % 256) + 1:x}::",
            f"0e:10:00:00:{i // 256:02x}:{i % 256:02x}", f"fd77::{i + 10:x}")


def _ip(ns: str, *args: str, batch: str | None = None) -> None:
    subprocess.run(["ip", "-n", ns, *args], input=batch, text=True, check=True, capture_output=True)


def make_host(ns: str, peers: int) -> None:
    """A namespace with underlay u0 (fd77::1/64), flannel-v6.1 and its entries for `peers` peers,
    and host-gw's routes for the same peers (under a different prefix, so both coexist)."""
    subprocess.run(["ip", "netns", "add", ns], check=True)
    _ip(ns, "link", "add", "u0", "type", "veth", "peer", "name", "u1")  # no dummy module here
    _ip(ns, "link", "set", "u1", "up")
    _ip(ns, "addr", "add", f"{UNDERLAY6}/64", "dev", "u0", "nodad")
    _ip(ns, "link", "set", "u0", "up")
    _ip(ns, "link", "add", f"flannel-v6.{VNI}", "address", MAC, "mtu", "1380", "type", "vxlan", "id", str(VNI),
        "local", UNDERLAY6, "dev", "u0", "dstport", "8472", "nolearning")
    _ip(ns, "addr", "add", "fd42:0:ff:1::/128", "dev", f"flannel-v6.{VNI}", "nodad")
    _ip(ns, "link", "set", f"flannel-v6.{VNI}", "up")
    lines = []
    for i in range(peers):
        subnet, base, mac, public = _peer(i)
        lines.append(f"neigh replace {base} lladdr {mac} dev flannel-v6.{VNI} nud permanent")
        lines.append(f"route replace {subnet} via {base} dev flannel-v6.{VNI} onlink proto 70 metric 1024")
        hg = subnet.replace("fd42:", "fd43:", 1)
        lines.append(f"route replace {hg} via {public} dev u0 proto 70 metric 1024")
    _ip(ns, "-batch", "-", batch="\n".join(lines) + "\n")
    fdb = "".join(f"fdb append {_peer(i)[2]} dev flannel-v6.{VNI} dst {_peer(i)[3]} self permanent\n"
                  for i in range(peers))
    subprocess.run(["bridge", "-n", ns, "-batch", "-"], input=fdb, text=True, check=True, capture_output=True)


def measure(ns: str, peers: int, reps: int) -> dict[str, list[float]]:
    """Runs inside the tree's interpreter (PYTHONPATH=tree): time each backend's IPv6 pass."""
    from ipaddress import IPv6Address, IPv6Network

    from flannelpy.backends.hostgw import backend as hostgw
    from flannelpy.backends.hostgw.plan import Route as HgRoute
    from flannelpy.backends.vxlan import backend as vxlan
    from flannelpy.backends.vxlan.plan import Fdb, Neigh, PeerPlan, Route, VxlanDeviceSpec
    from flannelpy.hostnet.netlink import NetlinkThread

    nl = NetlinkThread(ns)
    try:
        links = subprocess.run(["ip", "-n", ns, "-j", "link", "show", "u0"], capture_output=True, check=True)
        u0 = json.loads(links.stdout)[0]["ifindex"]
        spec = VxlanDeviceSpec(name=f"flannel-v6.{VNI}", vni=VNI, vtep_index=u0, local=IPv6Address(UNDERLAY6),
                               port=8472, gbp=False, learning=False, mtu=1380)
        wanted = []
        wanted_hg = []
        for i in range(peers):
            subnet, base, mac, public = _peer(i)
            net = IPv6Network(subnet)
            wanted.append((net, PeerPlan(Route(net, IPv6Address(base), True), Neigh(IPv6Address(base), mac),
                                         Fdb(mac, IPv6Address(public)))))
            hg = IPv6Network(subnet.replace("fd42:", "fd43:", 1))
            wanted_hg.append((hg, HgRoute(hg, IPv6Address(public), u0)))
        out: dict[str, list[float]] = {"vxlan": [], "host-gw": []}
        for rep in range(reps + 1):  # the first of each is a warm-up (imports, first socket)
            t0 = time.perf_counter()
            _index, report = nl.call_sync(lambda _ipr: vxlan._reconcile(
                nl.dumps, spec, MAC, IPv6Address("fd42:0:ff:1::"), IPv6Network(NETWORK6), wanted, True))
            t1 = time.perf_counter()
            if report.changed or report.device_error:
                raise SystemExit(f"vxlan pass changed something: {report.summary()} {report.device_error}")
            report = nl.call_sync(lambda _ipr: hostgw._reconcile(
                nl.dumps, wanted_hg, u0, IPv6Network("fd43::/48"), True))
            t2 = time.perf_counter()
            if report.changed:
                raise SystemExit(f"host-gw pass changed something: {report.summary()}")
            if rep:
                out["vxlan"].append((t1 - t0) * 1000)
                out["host-gw"].append((t2 - t1) * 1000)
        return out
    finally:
        nl.stop()


def _snapshot(rev: str, into: str) -> str:
    if rev == "WORK":
        return REPO
    tree = os.path.join(into, rev)
    os.makedirs(tree)
    archive = subprocess.run(["git", "-C", REPO, "archive", rev, "flannelpy"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", tree], input=archive.stdout, check=True)
    return tree


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trees", default="HEAD,WORK", help="A,B: two git revisions (WORK: the work tree)")
    ap.add_argument("--peers", default="100,1000")
    ap.add_argument("--reps", type=int, default=5, help="passes per tree and round")
    ap.add_argument("--rounds", type=int, default=2, help="A B A B ... rounds")
    ap.add_argument("--measure", nargs=3, metavar=("NS", "PEERS", "REPS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        ns, peers, reps = args.measure
        print(json.dumps(measure(ns, int(peers), int(reps))))
        return
    revs = args.trees.split(",")
    if len(revs) != 2:
        raise SystemExit(f"--trees={args.trees}: give two revisions, A,B")
    rows = []
    with tempfile.TemporaryDirectory(prefix="ipv6-repair-") as tmp:
        trees = [_snapshot(rev, tmp) for rev in revs]
        for peers in (int(p) for p in args.peers.split(",")):
            ns = f"fpr6{secrets.token_hex(2)}"
            try:
                make_host(ns, peers)
                got: list[dict[str, list[float]]] = [{"vxlan": [], "host-gw": []} for _ in trees]
                for _round in range(args.rounds):
                    for k, tree in enumerate(trees):
                        env = dict(os.environ, PYTHONPATH=tree)
                        res = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", ns, str(peers),
                                              str(args.reps)], env=env, capture_output=True, text=True, cwd=tmp)
                        if res.returncode:
                            raise SystemExit(f"tree {revs[k]}: {res.stderr.strip()}")
                        for key, values in json.loads(res.stdout).items():
                            got[k][key].extend(values)
            finally:
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            for key in ("vxlan", "host-gw"):
                a, b = (statistics.median(g[key]) for g in got)
                spread = [f"{min(g[key]):.1f}-{max(g[key]):.1f}" for g in got]
                rows.append((f"{key} IPv6 pass, {peers} peers, ms p50 (min-max)", f"{a:.1f} ({spread[0]})",
                             f"{b:.1f} ({spread[1]})", f"{b / a:.2f}x"))
    head = ("measure", revs[0], revs[1], "ratio")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
