"""Small helpers for tests that need network namespaces and veth pairs, by name.

Everything is done with the `ip` command so the helpers do not depend on the code under
test.  Callers pick names with their own prefix (see unique_name) and delete what they
made in a finally block (or use the `namespaces` context manager, which does).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import subprocess
from typing import Iterator


def sh(*args: str, check: bool = True) -> str:
    """Run a command; return stdout; raise with stderr in the message on failure."""
    proc = subprocess.run(args, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def unique_name(prefix: str) -> str:
    """`<prefix>-<6 hex>`: short enough to leave room for suffixes in a 15-char ifname."""
    return f"{prefix}-{secrets.token_hex(3)}"


def add_netns(name: str) -> None:
    sh("ip", "netns", "add", name)
    sh("ip", "-n", name, "link", "set", "lo", "up")


def del_netns(name: str) -> None:
    """Delete a namespace if it exists (its devices go with it)."""
    sh("ip", "netns", "del", name, check=False)


@contextlib.contextmanager
def namespaces(*names: str) -> Iterator[tuple[str, ...]]:
    """Create the namespaces; always delete them afterwards."""
    try:
        for name in names:
            add_netns(name)
        yield names
    finally:
        for name in names:
            del_netns(name)


def add_veth(ns_a: str, if_a: str, ns_b: str | None, if_b: str, mtu: int | None = None) -> None:
    """A veth pair with one end in ns_a and the other in ns_b (None: the root namespace),
    both ends up."""
    sh("ip", "-n", ns_a, "link", "add", if_a, "type", "veth", "peer", "name", if_b,
       *(("netns", ns_b) if ns_b else ()))
    for ns, ifname in ((ns_a, if_a), (ns_b, if_b)):
        prefix = ("ip", "-n", ns) if ns else ("ip",)
        if mtu is not None:
            sh(*prefix, "link", "set", ifname, "mtu", str(mtu))
        sh(*prefix, "link", "set", ifname, "up")


def add_addr(ns: str, ifname: str, cidr: str) -> None:
    sh("ip", "-n", ns, "addr", "add", cidr, "dev", ifname)


def ip_json(ns: str, *args: str) -> list[dict]:
    """`ip -j -n NS <args>` parsed (iproute2's JSON output)."""
    out = sh("ip", "-j", "-n", ns, *args)
    return json.loads(out) if out.strip() else []


def bridge_json(ns: str, *args: str) -> list[dict]:
    out = sh("bridge", "-j", "-n", ns, *args)
    return json.loads(out) if out.strip() else []


def ifindex(ns: str, ifname: str) -> int:
    return ip_json(ns, "link", "show", "dev", ifname)[0]["ifindex"]


def ping(ns: str, dst: str, count: int = 2, src: str | None = None) -> bool:
    """True when `ping` from ns to dst gets replies (iputils ping, else busybox's)."""
    cmd = ["ping"] if shutil.which("ping") else ["busybox", "ping"]
    args = ["ip", "netns", "exec", ns, *cmd, "-c", str(count), "-W", "2"]
    if src:
        args += ["-I", src]
    return subprocess.run(args + [dst], capture_output=True).returncode == 0
