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
    nsprobe.py revoke --etcd URL --lease-id ID            drop the fake leases again (v2: --first/--count)
    nsprobe.py churn --rate EV/S --seconds S              write CHURN_COUNT leases, delete them (v3: one
                                                          range delete), again and again, paced to EV/S
    nsprobe.py stale                                      sample how many churn entries the kernel holds;
                                                          stdin "stop T" = the writer stopped at T

Every etcd mode takes --api v3 (JSON gateway, leases attached to an etcd lease as flanneld
v0.18+ writes them) or --api v2 (keys API with a TTL per key, as flanneld <= v0.17 writes them).

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
import sys
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
    """The lab's etcd, v3 JSON gateway or v2 keys API; one HTTP connection per instance."""

    def __init__(self, url: str, api: str = "v3") -> None:
        self.url = url.rstrip("/")
        self.api = api
        self.http = httpx.Client(timeout=10)

    def post(self, path: str, body: dict) -> dict:
        r = self.http.post(self.url + path, json=body)
        r.raise_for_status()
        return r.json()

    def grant(self, ttl: int) -> int:
        """v3: an etcd lease the fake keys hang on; v2 has none (0: each key gets its own TTL)."""
        if self.api == "v2":
            return 0
        return int(self.post("/v3/lease/grant", {"TTL": str(ttl)})["ID"])

    def put(self, key: str, value: str, lease_id: int, ttl: int = 3600) -> None:
        if self.api == "v2":
            r = self.http.put(f"{self.url}/v2/keys{key}", data={"value": value, "ttl": str(ttl)})
            r.raise_for_status()
            return
        self.post("/v3/kv/put", {"key": b64(key), "value": b64(value), "lease": str(lease_id)})

    def delete(self, key: str) -> None:
        if self.api == "v2":
            r = self.http.delete(f"{self.url}/v2/keys{key}")
            if r.status_code != 404:
                r.raise_for_status()
            return
        self.post("/v3/kv/deleterange", {"key": b64(key)})

    def delete_prefix(self, prefix: str) -> int:
        """v3 only: one range delete of every key starting with prefix; returns how many went."""
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        return int(self.post("/v3/kv/deleterange", {"key": b64(prefix), "range_end": b64(end)}).get("deleted", 0))


def in_threads(count: int, threads: int, work) -> None:
    """Run work(indices) for range(count) split over `threads` threads (each makes its own client)."""
    chunks = [list(range(count))[t::threads] for t in range(threads)]
    errors: list[BaseException] = []

    def run(chunk: list[int]) -> None:
        try:
            work(chunk)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            errors.append(exc)

    pool = [threading.Thread(target=run, args=(c,)) for c in chunks if c]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise errors[0]


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


class Tables:
    """Routes (dst/len), ARP entries (ip) and FDB entries (mac), each with when it was first seen."""

    def __init__(self) -> None:
        self.routes: dict[str, float] = {}
        self.neighs: dict[str, float] = {}
        self.fdbs: dict[str, float] = {}

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


class Kernel(Tables):
    """What the kernel announced (rtnetlink multicast), re-dumped after a buffer overflow."""

    def __init__(self) -> None:
        super().__init__()
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE (root)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
        self.sock.bind((0, RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE))
        self.overflows = 0

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


def programmed(k: Kernel, subnet: IPv4Network, mac: str) -> float | None:
    """When the last of route, ARP entry and FDB entry for this peer appeared (None: not yet)."""
    ts = (k.routes.get(str(subnet)), k.neighs.get(str(subnet.network_address)), k.fdbs.get(mac))
    return None if None in ts else max(ts)  # type: ignore[type-var]


# --- modes ------------------------------------------------------------------------------


def cmd_fill(args: argparse.Namespace) -> dict:
    lease_id = Etcd(args.etcd, args.api).grant(3600)
    t = time.monotonic()

    def work(chunk: list[int]) -> None:
        etcd = Etcd(args.etcd, args.api)
        for j in chunk:
            subnet, mac, ip = fake_peer(args.first + j)
            etcd.put(lease_key(args.prefix, subnet), lease_value(mac, ip), lease_id)

    in_threads(args.count, args.threads, work)
    return {"lease_id": lease_id, "seconds": time.monotonic() - t}


def cmd_revoke(args: argparse.Namespace) -> dict:
    if args.api == "v3":
        Etcd(args.etcd).post("/v3/lease/revoke", {"ID": str(args.lease_id)})
        return {}

    def work(chunk: list[int]) -> None:  # v2: no lease to revoke, the keys go one by one
        etcd = Etcd(args.etcd, "v2")
        for j in chunk:
            etcd.delete(lease_key(args.prefix, fake_peer(args.first + j)[0]))

    in_threads(args.count, args.threads, work)
    return {}


def _watch_v3(url: str, prefix: str, on_key) -> None:
    body = {"create_request": {"key": b64(prefix), "range_end": b64(prefix[:-1] + "0")}}
    with httpx.Client(timeout=httpx.Timeout(10, read=None)) as c, \
            c.stream("POST", url + "/v3/watch", json=body) as r:
        for line in r.iter_lines():
            now = time.monotonic()
            for ev in (json.loads(line).get("result") or {}).get("events") or []:
                on_key(base64.b64decode(ev["kv"]["key"]).decode(), now)


def _watch_v2(url: str, prefix: str, on_key) -> None:
    """The v2 keys API's long poll, one event per request (as flanneld <= v0.17 watches)."""
    directory = prefix.rstrip("/")
    with httpx.Client(timeout=httpx.Timeout(10, read=None)) as c:
        r = c.get(f"{url}/v2/keys{directory}")
        index = int(r.headers["X-Etcd-Index"]) + 1
        while True:
            r = c.get(f"{url}/v2/keys{directory}", params={"wait": "true", "recursive": "true",
                                                            "waitIndex": str(index)})
            now = time.monotonic()
            doc = r.json()
            node = doc.get("node") or {}
            if "modifiedIndex" not in node:  # 401 index cleared: start from the current index
                index = int(r.headers.get("X-Etcd-Index", index)) + 1
                continue
            on_key(node["key"], now)
            index = int(node["modifiedIndex"]) + 1


def cmd_join(args: argparse.Namespace) -> dict:
    etcd = Etcd(args.etcd, args.api)
    lease_id = etcd.grant(3600)
    k = Kernel()
    prefix = f"{args.prefix.rstrip('/')}/subnets/"
    seen: dict[str, float] = {}
    cond = threading.Condition()

    def on_key(key: str, now: float) -> None:
        with cond:
            seen.setdefault(key, now)
            cond.notify_all()

    watch = _watch_v2 if args.api == "v2" else _watch_v3
    threading.Thread(target=watch, args=(etcd.url, prefix, on_key), daemon=True).start()
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
            cond.wait_for(lambda key=key: key in seen, timeout=max(0.0, deadline - time.monotonic()))
            t_watch = seen.get(key)
        rows.append({"subnet": str(subnet), "put": t_put - t0,
                     "watch": None if t_watch is None else t_watch - t0,
                     "kernel": None if done is None else done - t0,
                     "route": k.routes.get(str(subnet), t0) - t0,
                     "neigh": k.neighs.get(str(subnet.network_address), t0) - t0,
                     "fdb": k.fdbs.get(mac, t0) - t0})
        time.sleep(args.pause)
    return {"lease_id": lease_id, "joins": rows, "overflows": k.overflows}


# Churn leases: CHURN_COUNT fake peers whose keys all start with CHURN_KEY_PREFIX (10.123.0.0 ..
# 10.123.99.0), so one v3 range delete removes exactly them; nothing else in the lab lives in
# 10.123.0.0/16 (hosts are below SubnetMax 10.99.255.0, other fake peers below index CHURN_FIRST).
CHURN_NET = IPv4Network("10.123.0.0/16")
CHURN_FIRST = (int(CHURN_NET.network_address) - FAKE_BASE) // 256
CHURN_COUNT = 100


def churn_macs() -> set[str]:
    return {fake_peer(CHURN_FIRST + j)[1] for j in range(CHURN_COUNT)}


def cmd_churn(args: argparse.Namespace) -> dict:
    """Put CHURN_COUNT leases (in --threads parallel clients), then delete them all, paced so that
    puts + deletes come to --rate events/s, for --seconds; the last round's delete always runs."""
    etcd = Etcd(args.etcd, args.api)
    lease_id = etcd.grant(int(args.seconds) + 600)  # outlives the run (a 600 s soak lost its lease)
    key_prefix = f"{args.prefix.rstrip('/')}/subnets/{'.'.join(str(CHURN_NET.network_address).split('.')[:2])}."
    keys = [lease_key(args.prefix, fake_peer(CHURN_FIRST + j)[0]) for j in range(CHURN_COUNT)]
    values = [lease_value(*fake_peer(CHURN_FIRST + j)[1:]) for j in range(CHURN_COUNT)]
    clients = [Etcd(args.etcd, args.api) for _ in range(args.threads)]
    chunks = [list(range(CHURN_COUNT))[t::args.threads] for t in range(args.threads)]
    per_round = 2 * CHURN_COUNT

    def parallel(fn) -> None:
        pool = [threading.Thread(target=fn, args=(c, chunk)) for c, chunk in zip(clients, chunks)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()

    def puts(c: Etcd, chunk: list[int]) -> None:
        for j in chunk:
            c.put(keys[j], values[j], lease_id, ttl=600)

    def deletes(c: Etcd, chunk: list[int]) -> None:
        for j in chunk:
            c.delete(keys[j])

    t0 = time.monotonic()
    rounds = deleted = 0
    while True:
        parallel(puts)
        if args.api == "v3":
            deleted += etcd.delete_prefix(key_prefix)
        else:
            parallel(deletes)
            deleted += CHURN_COUNT
        rounds += 1
        if time.monotonic() - t0 >= args.seconds:
            break
        pause = t0 + rounds * per_round / args.rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    t_stop = time.monotonic()
    if args.api == "v3":
        etcd.post("/v3/lease/revoke", {"ID": str(lease_id)})
    return {"t0": t0, "t_stop": t_stop, "rounds": rounds, "events": rounds * CHURN_COUNT + deleted,
            "rate": (rounds * CHURN_COUNT + deleted) / (t_stop - t0)}


def cmd_stale(args: argparse.Namespace) -> dict:
    """Sample the churn entries the kernel holds (routes and ARP entries in CHURN_NET, FDB entries
    with a churn MAC) every --interval s.  A line "stop T" on stdin says the writer stopped at T
    (CLOCK_MONOTONIC); from then on the probe ends once the count has been 0 for --quiet s, or
    --window s after T."""
    macs = churn_macs()
    samples: list[tuple[float, int, int, int]] = []
    t_stop: float | None = None
    zero_since: float | None = None
    while True:
        tables = Tables()
        tables.dump()
        now = time.monotonic()
        routes = sum(1 for r in tables.routes if IPv4Network(r, strict=False).subnet_of(CHURN_NET))
        neighs = sum(1 for n in tables.neighs if IPv4Address(n) in CHURN_NET)
        fdbs = sum(1 for m in tables.fdbs if m in macs)
        samples.append((now, routes, neighs, fdbs))
        if routes + neighs + fdbs == 0:
            zero_since = now if zero_since is None else zero_since
        else:
            zero_since = None
        if t_stop is None and select.select([sys.stdin], [], [], 0)[0]:
            line = sys.stdin.readline().split()
            if line and line[0] == "stop":
                t_stop = float(line[1])
        if t_stop is not None and now > t_stop:
            if zero_since is not None and now - zero_since >= args.quiet:
                break
            if now - t_stop >= args.window:
                break
        time.sleep(args.interval)
    return {"samples": samples, "t_stop": t_stop}


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
    p.add_argument("mode", choices=("fill", "join", "scale", "revoke", "churn", "stale"))
    p.add_argument("--api", choices=("v3", "v2"), default="v3")
    p.add_argument("--threads", type=int, default=4, help="fill/revoke/churn: parallel etcd clients")
    p.add_argument("--rate", type=float, default=150.0, help="churn: lease events per second")
    p.add_argument("--seconds", type=float, default=30.0, help="churn: how long")
    p.add_argument("--interval", type=float, default=0.2, help="stale: sampling period")
    p.add_argument("--quiet", type=float, default=5.0, help="stale: end after this long at 0 past the stop")
    p.add_argument("--window", type=float, default=60.0, help="stale: end this long after the stop at the latest")
    p.add_argument("--etcd", default="http://10.250.0.1:2379")
    p.add_argument("--prefix", default="/coreos.com/network")
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--pause", type=float, default=0.05)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--lease-id", type=int, default=0)
    p.add_argument("--peer", action="append", default=[], help="scale: also wait for SUBNET=VTEPMAC")
    args = p.parse_args()
    modes = {"fill": cmd_fill, "join": cmd_join, "scale": cmd_scale, "revoke": cmd_revoke, "churn": cmd_churn,
             "stale": cmd_stale}
    result = modes[args.mode](args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
