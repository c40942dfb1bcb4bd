"""How long iptables work takes in a fresh namespace: full ensure, a no-op resync check, a repair.

Run as root: python3 bench/bench_iptables.py [rounds].  Prints a table (milliseconds).
"""

import secrets
import statistics
import subprocess
import sys
import time
from ipaddress import IPv4Network as N

import trio

sys.path.insert(0, ".")
from flannelpy.hostnet.iptables import IptablesManager  # noqa: E402


async def bench(ns: str, rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"ensure (first, full batch)": [], "resync check (nothing missing)": [], "repair (1 rule deleted)": []}
    for _ in range(rounds):
        m = IptablesManager(N("10.5.0.0/16"), N("10.5.72.0/24"), masq=True, forward=True, netns=ns)
        t = time.perf_counter()
        await m.ensure()
        times["ensure (first, full batch)"].append(time.perf_counter() - t)
        t = time.perf_counter()
        assert await m.missing() == []
        times["resync check (nothing missing)"].append(time.perf_counter() - t)
        subprocess.run(["nsenter", f"--net=/var/run/netns/{ns}", "iptables", "-D", "FLANNEL-FWD", "1"], check=True)
        t = time.perf_counter()
        await m.missing()
        await m.ensure()
        times["repair (1 rule deleted)"].append(time.perf_counter() - t)
    return times


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    ns = f"fpip-bench-{secrets.token_hex(2)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        times = trio.run(bench, ns, rounds)
    finally:
        subprocess.run(["ip", "netns", "del", ns])
    print(f"{'operation':34} {'median ms':>10} {'max ms':>8}  (n={rounds})")
    for name, ts in times.items():
        print(f"{name:34} {statistics.median(ts) * 1000:10.1f} {max(ts) * 1000:8.1f}")


if __name__ == "__main__":
    main()
