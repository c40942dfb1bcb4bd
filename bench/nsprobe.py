"""Helper the benchmarks run *inside* a lab host namespace (nsenter --net=...).

It talks to the lab's etcd through the v3 JSON gateway and watches the kernel through a raw
rtnetlink socket (the same events `ip monitor neigh route` prints), so no time is spent in
subprocesses between the write and the observation.  Every timestamp is CLOCK_MONOTONIC,
which is shared by all processes and network namespaces, so the parent can compare them
with its own.

    nsprobe.py fill  --etcd URL --prefix P --count N     grant one lease, write N fake vxlan leases
    nsprobe.py join  --etcd URL --prefix P --count N     N joins, one at a time: put -> watch event
                                                          (baseline) and put -> neigh+FDB+route
    nsprobe.py scale --count N [--peer SUBNET=MAC ...]    print "ready", then the time at which the
                                                          N fake peers (and the given ones) are all
                                                          programmed
    nsprobe.py revoke --etcd URL --lease-id ID            drop the fake leases again

Results are one JSON document on stdout.  Fake peer i has subnet FAKE_BASE + i*256 (/24),
VtepMAC 0e:fb:00:xx:xx:xx and PublicIP 10.251.x.y; see fake_peer().
"""

from __future__ import annotations

import argparse
import base64
import errno
import json
import select
import socket
import struct
import threading
import time
from ipaddress import IPv4Address, IPv4Network

import httpx

# Fake peers live in 10.100.0.0/14; the bench lab's Network is 10.64.0.0/10 (see benchlib).
FAKE_BASE = int(IPv4Address("10.100.0.0"))

RTMGRP_NEIGH = 0x4
RTMGRP_IPV4_ROUTE = 0x40
RTM_NEWROUTE, RTM_NEWNEIGH = 24, 28
NLMSG_ERROR, NLMSG_DONE = 2, 3
AF_INET, AF_BRIDGE = 2, 7


def fake_peer(i: int) -> tuple[IPv4Network, str, str]:
    subnet = IPv4Network((FAKE_BASE + i * 256, 24))
    mac = "0e:fb:00:%02x:%02x:%02x" % ((i >> 16) & 0xFF, (i >> 8) & 0xFF, i & 0xFF)
    public_ip = str(IPv4Address(int(IPv4Address("10.251.0.1")) + i))
    return subnet, mac, public_ip


def lease_key(prefix: str, subnet: IPv4Network) -> str:
    return f"{prefix.rstrip('/')}/subnets/{subnet.network_address}-{subnet.prefixlen}"


def lease_value(mac: str, public_ip: str) -> str:
    # flanneld v0.20+'s shape, as in the brief.
    return json.dumps({"PublicIP": public_ip, "PublicIPv6": None, "BackendType": "vxlan",
                       "BackendData": {"VNI": 1, "VtepMAC": mac}})


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class Etcd:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.Client(timeout=10)

    def post(self, path: str, body: dict) -> dict:
        r = self.http.post(self.url + path, json=body)
        r.raise_for_status()
        return r.json()

    def grant(self, ttl: int) -> int:
        return int(self.post("/v3/lease/grant", {"TTL": str(ttl)})["ID"])

    def put(self, key: str, value: str, lease_id: int) -> None:
        self.post("/v3/kv/put", {"key": b64(key), "value": b64(value), "lease": str(lease_id)})


# --- rtnetlink --------------------------------------------------------------------------


def _attrs(data: bytes, off: int, end: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while off + 4 <= end:
        length, kind = struct.unpack_from("HH", data, off)
        if length < 4:
            break
        out[kind & 0x3FFF] = data[off + 4:off + length]
        off += (length + 3) & ~3
    return out


class Kernel:
    """What the kernel announced: routes (dst/len), ARP entries (ip), FDB entries (mac)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE (root)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
        self.sock.bind((0, RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE))
        self.routes: dict[str, float] = {}
        self.neighs: dict[str, float] = {}
        self.fdbs: dict[str, float] = {}
        self.overflows = 0

    def _parse(self, data: bytes, now: float) -> None:
        off = 0
        while off + 16 <= len(data):
            length, kind, _flags, _seq, _pid = struct.unpack_from("IHHII", data, off)
            if length < 16:
                break
            body = off + 16
            if kind == RTM_NEWROUTE:
                family, dst_len = struct.unpack_from("BB", data, body)
                if family == AF_INET:
                    a = _attrs(data, body + 12, off + length)
                    if 1 in a:  # RTA_DST
                        self.routes.setdefault(f"{socket.inet_ntoa(a[1])}/{dst_len}", now)
            elif kind == RTM_NEWNEIGH:
                family = data[body]
                a = _attrs(data, body + 12, off + length)
                if family == AF_INET and 1 in a:  # NDA_DST
                    self.neighs.setdefault(socket.inet_ntoa(a[1]), now)
                elif family == AF_BRIDGE and 2 in a:  # NDA_LLADDR
                    self.fdbs.setdefault(":".join(f"{b:02x}" for b in a[2]), now)
            off += (length + 3) & ~3

    def pump(self, timeout: float) -> None:
        """Read everything that arrives within `timeout` (returns after the first burst)."""
        ready, _, _ = select.select([self.sock], [], [], timeout)
        while ready:
            try:
                data = self.sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # events lost: re-read the tables
                    self.overflows += 1
                    self.dump()
                    continue
                raise
            self._parse(data, time.monotonic())

    def dump(self) -> None:
        """RTM_GETROUTE / RTM_GETNEIGH (inet and bridge) dumps into the same tables."""
        for kind, family in ((26, AF_INET), (30, AF_INET), (30, AF_BRIDGE)):
            s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
            try:
                s.bind((0, 0))
                msg = struct.pack("IHHII", 16 + 12, kind, 0x301, 1, 0) + struct.pack("B11x", family)
                s.send(msg)
                done = False
                while not done:
                    data = s.recv(1 << 20)
                    now = time.monotonic()
                    off = 0
                    while off + 16 <= len(data):
                        length, mtype = struct.unpack_from("IH", data, off)
                        if mtype in (NLMSG_DONE, NLMSG_ERROR):
                            done = True
                            break
                        off += (length + 3) & ~3
                    self._parse(data, now)
            finally:
                s.close()


def programmed(k: Kernel, subnet: IPv4Network, mac: str) -> float | None:
    """When the last of route, ARP entry and FDB entry for this peer appeared (None: not yet)."""
    ts = (k.routes.get(str(subnet)), k.neighs.get(str(subnet.network_address)), k.fdbs.get(mac))
    return None if None in ts else max(ts)  # type: ignore[type-var]


# --- modes ------------------------------------------------------------------------------


def cmd_fill(args: argparse.Namespace) -> dict:
    etcd = Etcd(args.etcd)
    lease_id = etcd.grant(3600)
    t = time.monotonic()
    for i in range(args.first, args.first + args.count):
        subnet, mac, ip = fake_peer(i)
        etcd.put(lease_key(args.prefix, subnet), lease_value(mac, ip), lease_id)
    return {"lease_id": lease_id, "seconds": time.monotonic() - t}


def cmd_revoke(args: argparse.Namespace) -> dict:
    Etcd(args.etcd).post("/v3/lease/revoke", {"ID": str(args.lease_id)})
    return {}


def cmd_join(args: argparse.Namespace) -> dict:
    etcd = Etcd(args.etcd)
    lease_id = etcd.grant(3600)
    k = Kernel()
    prefix = f"{args.prefix.rstrip('/')}/subnets/"
    seen: dict[str, float] = {}
    cond = threading.Condition()

    def watch() -> None:
        body = {"create_request": {"key": b64(prefix), "range_end": b64(prefix[:-1] + "0")}}
        with httpx.Client(timeout=httpx.Timeout(10, read=None)) as c, \
                c.stream("POST", etcd.url + "/v3/watch", json=body) as r:
            for line in r.iter_lines():
                now = time.monotonic()
                for ev in (json.loads(line).get("result") or {}).get("events") or []:
                    key = base64.b64decode(ev["kv"]["key"]).decode()
                    with cond:
                        seen.setdefault(key, now)
                        cond.notify_all()

    threading.Thread(target=watch, daemon=True).start()
    time.sleep(0.5)  # watch established
    rows = []
    for i in range(args.first, args.first + args.count):
        subnet, mac, ip = fake_peer(i)
        key = lease_key(args.prefix, subnet)
        t0 = time.monotonic()
        etcd.put(key, lease_value(mac, ip), lease_id)
        t_put = time.monotonic()
        deadline = t0 + args.timeout
        done = None
        while done is None and time.monotonic() < deadline:
            k.pump(0.05)
            done = programmed(k, subnet, mac)
        with cond:
            cond.wait_for(lambda: key in seen, timeout=max(0.0, deadline - time.monotonic()))
            t_watch = seen.get(key)
        rows.append({"subnet": str(subnet), "put": t_put - t0,
                     "watch": None if t_watch is None else t_watch - t0,
                     "kernel": None if done is None else done - t0,
                     "route": k.routes.get(str(subnet), t0) - t0,
                     "neigh": k.neighs.get(str(subnet.network_address), t0) - t0,
                     "fdb": k.fdbs.get(mac, t0) - t0})
        time.sleep(args.pause)
    return {"lease_id": lease_id, "joins": rows, "overflows": k.overflows}


def cmd_scale(args: argparse.Namespace) -> dict:
    k = Kernel()
    peers = [fake_peer(i) for i in range(args.first, args.first + args.count)]
    for spec in args.peer:  # real peers too: SUBNET=MAC
        subnet, mac = spec.split("=")
        peers.append((IPv4Network(subnet), mac.lower(), ""))
    print("ready", flush=True)
    deadline = time.monotonic() + args.timeout
    pending = peers
    while pending and time.monotonic() < deadline:
        k.pump(0.2)
        pending = [p for p in pending if programmed(k, p[0], p[1]) is None]
    if pending:  # maybe lost to an overflow: one last look at the tables
        k.dump()
        pending = [p for p in peers if programmed(k, p[0], p[1]) is None]
    times = [programmed(k, s, m) for s, m, _ in peers]
    got = [t for t in times if t is not None]
    return {"done": max(got) if not pending and got else None, "first": min(got) if got else None,
            "missing": len(pending), "overflows": k.overflows}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("fill", "join", "scale", "revoke"))
    p.add_argument("--etcd", default="http://10.250.0.1:2379")
    p.add_argument("--prefix", default="/coreos.com/network")
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--pause", type=float, default=0.05)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--lease-id", type=int, default=0)
    p.add_argument("--peer", action="append", default=[], help="scale: also wait for SUBNET=VTEPMAC")
    args = p.parse_args()
    result = {"fill": cmd_fill, "join": cmd_join, "scale": cmd_scale, "revoke": cmd_revoke}[args.mode](args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
