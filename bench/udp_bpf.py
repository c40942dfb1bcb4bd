"""udp backend container->container TCP throughput (issue #16): flannelpy on the tc-BPF path,
flannelpy on the Python forwarder, and the real flanneld v0.17.0's udp (its C proxy), in the
same run, interleaved A B C A B C so that the shared machine's load falls on all three alike.

Three 2-host labs are up at once (separate namespaces); each round runs one iperf3 of
--seconds in each.  Before every run the machine's busy fraction is sampled (other people's
jobs share it) and printed with the figures.  Medians per path and their ratios at the end.

    python3 bench/udp_bpf.py [--seconds 5] [--rounds 3] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import BENCH_NETWORK, BENCH_SUBNET_MAX, BENCH_SUBNET_MIN, Resources, median, wait_idle, wait_peers_programmed  # noqa: E402
from throughput import iperf  # noqa: E402

from flannelpy.lab.netns_lab import Lab, LabHost, default_config  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ANCHORS = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "anchors"))
FLANNELD = os.path.join(ANCHORS, "flanneld-v0.17.0.xz")
PATHS = ("bpf", "python", "flanneld")


@dataclass
class FlanneldLab(Lab):
    """Every host runs the real flanneld binary (udp from a config without Backend)."""

    flanneld_bin: str = ""

    def agent_command(self, host: LabHost) -> list[str]:
        return [self.flanneld_bin, f"-etcd-endpoints={self.etcd_endpoint}", f"-etcd-prefix={self.etcd_prefix}",
                "-iface=eth0", f"-subnet-file={host.subnet_file}", "-ip-masq"]


def _config() -> str:
    config = json.loads(default_config("udp", BENCH_NETWORK))
    config.update(SubnetMin=BENCH_SUBNET_MIN, SubnetMax=BENCH_SUBNET_MAX)
    return json.dumps(config)


def _up(res: Resources, lab: Lab) -> Lab:
    res.labs.append(lab)
    lab.up()
    wait_peers_programmed(lab)
    return lab


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/udp_bpf.py: needs root (network namespaces)")
    with Resources() as res, tempfile.TemporaryDirectory(prefix="udpbpf-") as tmp:
        labs: dict[str, Lab] = {}
        for letter, path in zip("abc", PATHS):
            common = dict(prefix=res.prefix + letter, workdir=os.path.join(tmp, letter), hosts=2, backend="udp",
                          config=_config())
            if path == "flanneld":
                if not os.path.exists(FLANNELD):
                    print(f"skipping flanneld: {FLANNELD} is absent", file=sys.stderr)
                    continue
                binary = os.path.join(tmp, "flanneld-v0.17.0")
                with open(binary, "wb") as out:
                    subprocess.run(["xz", "-dc", FLANNELD], stdout=out, check=True)
                os.chmod(binary, 0o755)
                labs[path] = _up(res, FlanneldLab(**common, etcd_api="v2", flanneld_bin=binary))
            else:
                labs[path] = _up(res, Lab(**common, agent_flags=[f"-udp-forwarder={path}"]))
                wanted = "udp data plane: BPF" if path == "bpf" else "udp data plane: Python forwarder"
                for i in (1, 2):
                    if wanted not in labs[path].tail_log(i, 60):
                        raise SystemExit(f"{path} lab host {i} is not on the {path} path:\n{labs[path].tail_log(i, 20)}")
        figures: dict[str, list[float]] = {path: [] for path in labs}
        busy: list[float] = []
        for rnd in range(args.rounds):
            for path, lab in labs.items():
                busy.append(wait_idle(20.0))
                h1, h2 = lab.host(1), lab.host(2)
                gbps = iperf(res, h2.container_ns, h1.container_ns, h2.container_ip, args.seconds)
                figures[path].append(gbps)
                print(f"round {rnd + 1} {path:8s} {gbps * 1000:9.0f} Mbit/s  (machine busy before: {busy[-1]:.0%})",
                      flush=True)
        load = os.getloadavg()
        med = {path: median(v) for path, v in figures.items() if v}
        print()
        bar = "|" if args.markdown else ""
        print(f"{bar} path {bar} median Mbit/s {bar} runs (Mbit/s) {bar}")
        if args.markdown:
            print("|---|---:|---|")
        for path, v in figures.items():
            print(f"{bar} {path} {bar} {med[path] * 1000:.0f} {bar} {', '.join(f'{x * 1000:.0f}' for x in v)} {bar}")
        print()
        for a, b in (("bpf", "flanneld"), ("bpf", "python"), ("python", "flanneld")):
            if a in med and b in med and med[b] > 0:
                print(f"{a} / {b}: {med[a] / med[b]:.1f}x")
        print(f"machine busy before runs: median {median(busy):.0%}, max {max(busy):.0%}; "
              f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
