"""One thread owns the netlink sockets (KernelDumps' plain rtnl socket, and pyroute2's
synchronous IPRoute where the udp backend needs it); trio tasks await calls into it.

pyroute2's asyncio API does not run under trio, and neither socket may be used from several
threads at once, so every netlink call goes through this single worker.

Also here: what the kernel holds, as plain values (KernelRoute, KernelNeigh, KernelFdb) and
KernelDumps, which reads them (one dump per table), so the backends' pure plans can compare "what should
be there" with "what is there"; and FLANNEL_RTPROT, the route protocol that marks our routes.

This is the one module that imports pyroute2, and it loads only what IPRoute needs: pyroute2's
package __init__ imports every API it has (NDB with sqlite3, IPDB, conntrack, ipset, nl80211,
wireguard...), ~0.1 s and ~5 MiB that flanneld never uses.  `_bare_package()` registers the
package, and pyroute2.netlink, without running its __init__ (which still runs, once, if anyone
asks the package itself for a name: `from pyroute2 import NDB` keeps working), and IPRoute is
imported on first use, by the netlink thread, not when this module is imported, and only for a
request that goes through it: reads and the vxlan/host-gw backends' changes go through
KernelDumps (hostnet/rtnl.py; use rtnl_call), so only the udp backend's TUN set-up loads it.
"""

from __future__ import annotations

import errno
import importlib.util
import logging
import os
import queue
import socket
import sys
import threading
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Container, Generic, Iterator, NamedTuple, TypeVar

import outcome
import trio

from . import rtnl


def _bare_package(name: str) -> None:
    """Register package `name` (pyroute2, then pyroute2.netlink) without running its __init__, so
    that importing one of its modules loads that module and what it imports, not the whole
    library.  The __init__ runs (once, in the same module object) the first time an attribute the
    bare package lacks is asked for, so code that wants the full package still gets it."""
    if name in sys.modules:
        return  # already imported, bare or whole: nothing to save
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        raise ImportError(f"{name} is not installed (flannelpy needs pyroute2: pip install pyroute2)")
    package = importlib.util.module_from_spec(spec)
    loader = spec.loader
    lock = threading.Lock()

    def complete(attr: str) -> Any:
        # Not for a submodule not imported yet: `from pyroute2 import config` (pyroute2's own
        # modules do that) asks hasattr first, and must then import just that submodule.
        # Nor for dunders that tools probe for (__wrapped__...), only the two __init__ sets.
        if (attr.startswith("__") and attr not in ("__all__", "__version__")) or _is_submodule(package, attr):
            raise AttributeError(f"module {name!r} has no attribute {attr!r}")
        with lock:
            if package.__dict__.get("__getattr__") is complete:
                del package.__dict__["__getattr__"]
                loader.exec_module(package)  # the package's __init__.py, run as its import would
        return getattr(package, attr)

    package.__getattr__ = complete  # type: ignore[attr-defined]  # PEP 562: only for names not set
    sys.modules[name] = package
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, package)  # as an import binds a submodule to its parent


def _is_submodule(package: ModuleType, name: str) -> bool:
    return any(os.path.isfile(os.path.join(where, name + ".py")) or os.path.isdir(os.path.join(where, name))
               for where in package.__path__)


# pyroute2.netlink's __init__ (its message classes, ~2 ms) is only IPRoute's business.
_bare_package("pyroute2")
_bare_package("pyroute2.netlink")
from pyroute2.netlink.exceptions import NetlinkError  # noqa: E402  # re-exported (cheap: no IPRoute)

if TYPE_CHECKING:
    from pyroute2.iproute.linux import IPRoute


def _iproute_class() -> "type[IPRoute]":
    """pyroute2's IPRoute, imported on first use (~0.1 s, as much as everything else here)."""
    from pyroute2.iproute.linux import IPRoute

    return IPRoute


def __getattr__(name: str) -> Any:
    # `from flannelpy.hostnet.netlink import IPRoute` still works; it loads IPRoute then
    if name == "IPRoute":
        return _iproute_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


T = TypeVar("T")
R = TypeVar("R")
log = logging.getLogger(__name__)

# The route protocol (rtm_protocol) of every route flannelpy adds, so that it can tell its own
# routes from everyone else's and never remove what it did not make.  flanneld leaves it to
# vishvananda/netlink's default, RTPROT_BOOT (3), which is also what `ip route add` uses, and
# which routing daemons purge on start: useless as a mark.  70 (0x46, "F") is not in
# iproute2's rt_protos (0-4 kernel/boot/static, 8-16 gated..dhcp, 18 keepalived, 42 babel,
# 99 openr, 186-192 bgp/isis/ospf/rip/eigrp) nor used by bird, FRR or the usual CNIs, and the
# kernel stores values >= RTPROT_STATIC without interpreting them.  `ip route` prints it as
# "proto 70".
FLANNEL_RTPROT = 70
RTPROT_KERNEL = 2
MAIN_TABLE = 254
NUD_PERMANENT = 0x80
RTNH_F_ONLINK = 0x04


class NetlinkThread:
    """Runs `fn(ipr, *args)` (call) or `fn(dumps, *args)` (rtnl_call) on the thread that owns the
    netlink sockets."""

    def __init__(self, netns: str | None = None) -> None:
        # netns: operate inside /var/run/netns/<netns> (tests); None = this process's namespace.
        self._netns = netns
        self._jobs: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name="netlink", daemon=True)
        self._started = False
        self._port_id: int | None = None
        self.iproute_loaded = False  # whether pyroute2's IPRoute was needed (a change) in this run
        self._dumps: KernelDumps | None = None

    @property
    def netns(self) -> str | None:
        """The named namespace this thread works in (None: the process's own)."""
        return self._netns

    @property
    def port_id(self) -> int | None:
        """The netlink port id of the IPRoute socket: the kernel stamps it on the notifications of
        changes we made, so a monitor can skip its own echoes.  None when unknown, or while no
        change was asked for (the socket is made for the first)."""
        return self._port_id

    @property
    def own_ports(self) -> Container[int]:
        """Port ids of both our sockets that change the kernel (pyroute2's and KernelDumps'
        batch socket): notifications stamped with one of them are our own echoes.  A live view:
        pyroute2's socket may be opened after it is taken."""
        return _OwnPorts(self, self.dumps.port_id)

    @property
    def dumps(self) -> "KernelDumps":
        """Fast reads of the kernel's tables in this thread's namespace; use them inside call()."""
        if self._dumps is None:
            self._dumps = KernelDumps(self._netns)
        return self._dumps

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def _serve(self) -> None:
        ipr = _LazyIPRoute(self._make_iproute)
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                fn, args, deliver = job
                result = outcome.capture(fn, ipr, *args)
                deliver(result)
                # Not kept while the queue is empty: a repair pass's arguments (every peer's
                # entries) and result would otherwise live until the next request.
                del job, fn, args, deliver, result
        finally:
            ipr.close()

    def _make_iproute(self, why: str) -> Any:
        # Said once per process: a start that finds everything in place never gets here.
        log.info("netlink: loading pyroute2's IPRoute (first request through it: ipr.%s)", why)
        iproute = _iproute_class()
        # groups=0: this socket only asks; notifications nobody reads would pile up in it
        # (hostnet.monitor has its own socket for them).
        ipr = iproute(netns=self._netns, groups=0) if self._netns else iproute(groups=0)
        self._port_id = _port_id_of(ipr)
        self.iproute_loaded = True
        return ipr

    async def rtnl_call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(dumps, *args) on the netlink thread: reads and changes through KernelDumps'
        plain rtnl socket, no pyroute2."""
        return await self.rtnl_submit(fn, *args).result()

    def rtnl_submit(self, fn: Callable[..., T], *args: Any) -> "PendingCall[T]":
        """rtnl_call without the wait: the job is queued now, `await .result()` gets what it
        returned.  The caller works on meanwhile (a backend plans its next batch of peers while
        the kernel takes this one)."""
        dumps = self.dumps
        return self.submit(lambda _ipr: fn(dumps, *args))

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(ipr, *args) on the netlink thread and return its result (or raise); `ipr` is
        pyroute2's IPRoute, made when fn first uses it."""
        return await self.submit(fn, *args).result()

    def submit(self, fn: Callable[..., T], *args: Any) -> "PendingCall[T]":
        """Queue fn(ipr, *args) for the netlink thread (call() without the wait); jobs run in
        the order they were queued."""
        self.start()
        pending: PendingCall[T] = PendingCall(trio.lowlevel.current_trio_token())
        self._jobs.put((fn, args, pending.deliver))
        return pending

    def call_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """For code outside trio (tests, CLI): run on the owning thread and block."""
        self.start()
        ev = threading.Event()
        box: list[outcome.Outcome] = []

        def deliver(result: outcome.Outcome) -> None:
            box.append(result)
            ev.set()

        self._jobs.put((fn, args, deliver))
        ev.wait()
        return box[0].unwrap()

    def stop(self) -> None:
        if self._started:
            self._jobs.put(None)
            self._thread.join(timeout=5)
            self._started = False
        if self._dumps is not None:
            self._dumps.close()


class PendingCall(Generic[T]):
    """A job queued on the netlink thread (NetlinkThread.submit)."""

    __slots__ = ("_token", "_done", "_box")

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self._token = token
        self._done = trio.Event()
        self._box: list[outcome.Outcome] = []

    def deliver(self, result: outcome.Outcome) -> None:
        """Called on the netlink thread with the job's outcome."""
        self._box.append(result)
        try:
            self._token.run_sync_soon(self._done.set)
        except trio.RunFinishedError:
            pass

    async def result(self) -> T:
        """What the job returned (or raised), once it has run."""
        # A kernel change is not undone if we are cancelled: wait for it, so that the caller's
        # view of the data plane stays true.
        with trio.CancelScope(shield=True):
            await self._done.wait()
        result = self._box[0]  # not unwrap(): that works once, and a caller may ask again
        if isinstance(result, outcome.Error):
            raise result.error
        return result.value


class _OwnPorts:
    def __init__(self, thread: NetlinkThread, batch_port: int | None) -> None:
        self._thread = thread
        self._batch_port = batch_port

    def __contains__(self, port: object) -> bool:
        return bool(port) and port in (self._batch_port, self._thread.port_id)


class _LazyIPRoute:
    """Stands for the netlink thread's IPRoute and makes it on first use.  Reads go through
    KernelDumps (hostnet.rtnl), so only a change to the kernel (a device to create, an address
    to add...) needs pyroute2: importing IPRoute costs ~75 ms and ~5.7 MiB (asyncio,
    unittest.mock, multiprocessing), which a restart that finds everything in place never pays."""

    def __init__(self, make: Callable[[str], Any]) -> None:
        self._make = make
        self._ipr: Any = None

    def __getattr__(self, name: str) -> Any:
        if self._ipr is None:
            self._ipr = self._make(name)
        return getattr(self._ipr, name)

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()


def _port_id_of(ipr: Any) -> int | None:
    """The socket's port id; the kernel assigns it on the first request, so make one."""
    try:
        ipr.get_links(1)  # lo is ifindex 1 in every namespace
        port = ipr.asyncore.socket.getsockname()[0]
    except Exception as exc:  # pyroute2 internals differ between versions: only an optimisation
        log.debug("netlink port id unknown: %s", exc)
        return None
    return int(port) or None


# --- what the kernel holds: plain values, one dump each -----------------------------------


class KernelRoute(NamedTuple):
    """One route of the main table (IPv4 or IPv6), as the kernel reports it."""

    dst: IPv4Network | IPv6Network
    gateway: IPv4Address | IPv6Address | None
    oif: int | None
    proto: int
    priority: int = 0
    tos: int = 0
    onlink: bool = False


class KernelNeigh(NamedTuple):
    """A neighbour entry (IPv4: ARP, IPv6: NDP) on one device."""

    ip: IPv4Address | IPv6Address
    mac: str | None
    permanent: bool


class KernelFdb(NamedTuple):
    """A bridge FDB entry of a vxlan device that sends to a remote VTEP (has NDA_DST)."""

    mac: str
    dst: IPv4Address | IPv6Address
    permanent: bool


def dump_main_routes(ipr: Any) -> list[KernelRoute]:
    """The main table's IPv4 unicast routes through pyroute2 (for one-off reads; the periodic
    reconciliation uses the much faster KernelDumps)."""
    routes = []
    for msg in ipr.get_routes(family=socket.AF_INET, table=MAIN_TABLE):
        if msg.get_attr("RTA_TABLE", msg["table"]) != MAIN_TABLE or msg["type"] != 1:  # RTN_UNICAST
            continue
        dst = msg.get_attr("RTA_DST") or "0.0.0.0"
        gw = msg.get_attr("RTA_GATEWAY")
        routes.append(KernelRoute(
            dst=IPv4Network(f"{dst}/{msg['dst_len']}", strict=False),
            gateway=IPv4Address(gw) if gw else None,
            oif=msg.get_attr("RTA_OIF"),
            proto=msg["proto"],
            priority=msg.get_attr("RTA_PRIORITY") or 0,
            tos=msg["tos"],
            onlink=bool(msg["flags"] & RTNH_F_ONLINK),
        ))
    return routes


class KernelDumps:
    """One dump each of the main table's routes, a device's neighbours, a device's FDB (either
    family), the devices and addresses (for the start's reads), read
    with hostnet.rtnl (milliseconds for thousands of entries, where pyroute2 takes a second),
    and batches of requests that change them (transact: one send for many, as the backends'
    peer programming needs).

    Use it from one thread at a time (the backends call it on the netlink thread)."""

    def __init__(self, netns: str | None = None) -> None:
        self._netns = netns
        self._sock: socket.socket | None = None
        self._seq = 0
        self._open_lock = threading.Lock()

    def _socket(self) -> socket.socket:
        with self._open_lock:
            if self._sock is None:
                sock = rtnl.open_socket(self._netns, 0, blocking=True)
                sock.settimeout(10)
                self._sock = sock
            return self._sock

    @property
    def port_id(self) -> int | None:
        """The batch socket's netlink port id (the kernel stamps it on our changes' notifications)."""
        try:
            return int(self._socket().getsockname()[0]) or None
        except OSError:
            return None

    def transact(self, requests: list[rtnl.Request]) -> list[int]:
        """Send the requests in order, many per sendmsg; each one's errno (0: done).  When the
        socket itself fails (it cannot be opened, a send fails, no ACK within its timeout), that
        errno is every request's: the callers record them as failed and their next pass retries."""
        first = self._seq + 1
        self._seq += len(requests)
        try:
            return rtnl.transact(self._socket(), requests, first)
        except OSError as exc:
            return [exc.errno or errno.EIO] * len(requests)

    def change(self, request: rtnl.Request, what: str) -> None:
        """One request that changes the kernel; NetlinkError(errno) when it is refused."""
        code = self.transact([request])[0]
        if code:
            raise NetlinkError(code, f"{what}: {os.strerror(code)}")

    def _each(self, mtype: int, header: bytes, keep: Callable[[rtnl.Message], T | None]) -> Iterator[T]:
        """One dump's values one at a time, each reply message made into what the caller keeps
        (None: nothing) as it arrives, so that nothing holds thousands of raw messages (~0.5 KiB
        each) at once.  Ends with rtnl.DumpInterrupted when the kernel's table changed meanwhile:
        read it inside retried(), which starts the reader over."""
        self._socket()
        assert self._sock is not None
        self._seq += 1
        for msg in rtnl.dump_each(self._sock, mtype, header, self._seq):
            value = keep(msg)
            if value is not None:
                yield value

    def retried(self, read: Callable[[], R]) -> R:
        """read(), which reads dumps one value at a time (each_route, each_neighbour, each_fdb),
        run again from the start while a dump says its table changed under it."""
        for _ in range(5):
            try:
                return read()
            except rtnl.DumpInterrupted:
                continue  # the table changed under the dump: read it again
        raise OSError(errno.EAGAIN, "the kernel's table kept changing during the dump")

    def _dump(self, mtype: int, header: bytes, keep: Callable[[rtnl.Message], T | None]) -> list[T]:
        """One dump's values, as a list."""
        return self.retried(lambda: list(self._each(mtype, header, keep)))

    def all_routes(self, family: int = socket.AF_INET) -> list[rtnl.RouteInfo]:
        """Every route of one family, every table and type, in the kernel's order."""
        header = rtnl.RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)
        return self._dump(rtnl.RTM_GETROUTE, header, lambda m: rtnl.route_info(m) if (
            m.type == rtnl.RTM_NEWROUTE and m.body[0] == family) else None)

    def routes(self, family: int = socket.AF_INET) -> list[KernelRoute]:
        """Every unicast route of the main table, of one family (IPv6 routes always carry a
        metric: 1024 when added without one)."""
        return self.retried(lambda: list(self.each_route(family)))

    def each_route(self, family: int = socket.AF_INET) -> Iterator[KernelRoute]:
        """routes(), one at a time as the kernel sends them (read inside retried())."""
        v6 = family == socket.AF_INET6
        address, network, size = (IPv6Address, IPv6Network, 16) if v6 else (IPv4Address, IPv4Network, 4)

        def keep(m: rtnl.Message) -> KernelRoute | None:
            if m.type != rtnl.RTM_NEWROUTE or m.body[0] != family:
                return None
            r = rtnl.route_info(m)
            if r.table != MAIN_TABLE or r.type != 1:
                return None  # other tables; local, broadcast, blackhole... routes (RTN_UNICAST is 1)
            gw = r.gateway
            return KernelRoute(
                dst=network((address(r.dst[:size]) if r.dst else address(0), r.dst_len), strict=False),
                gateway=address(gw[:size]) if gw and len(gw) >= size else None,
                oif=r.oif, proto=r.proto, priority=r.priority, tos=r.tos,
                onlink=bool(r.flags & RTNH_F_ONLINK),
            )

        return self._each(rtnl.RTM_GETROUTE, rtnl.RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0), keep)

    def neighbours(self, index: int, family: int = socket.AF_INET) -> list[KernelNeigh]:
        """Neighbour entries (IPv4: ARP, IPv6: NDP) of device `index`."""
        return self.retried(lambda: list(self.each_neighbour(index, family)))

    def each_neighbour(self, index: int, family: int = socket.AF_INET) -> Iterator[KernelNeigh]:
        """neighbours(), one at a time as the kernel sends them (read inside retried())."""
        size, address = (16, IPv6Address) if family == socket.AF_INET6 else (4, IPv4Address)

        def keep(msg: rtnl.Message) -> KernelNeigh | None:
            fam, _p1, _p2, ifindex, state, _fl, _type = rtnl.NDMSG.unpack(msg.body)
            dst = msg.attrs.get(_NDA_DST)
            if fam != family or ifindex != index or not dst or len(dst) != size:
                return None
            return KernelNeigh(address(dst), _mac(msg.attrs.get(_NDA_LLADDR)), bool(state & NUD_PERMANENT))

        return self._each(rtnl.RTM_GETNEIGH, rtnl.NDMSG.pack(family, 0, 0, 0, 0, 0, 0), keep)

    def fdb(self, index: int, family: int = socket.AF_INET) -> list[KernelFdb]:
        """FDB entries of vxlan device `index` that point at a remote VTEP of `family` (have NDA_DST)."""
        return self.retried(lambda: list(self.each_fdb(index, family)))

    def each_fdb(self, index: int, family: int = socket.AF_INET) -> Iterator[KernelFdb]:
        """fdb(), one at a time as the kernel sends them (read inside retried())."""
        size, address = (16, IPv6Address) if family == socket.AF_INET6 else (4, IPv4Address)

        def keep(msg: rtnl.Message) -> KernelFdb | None:
            fam, _p1, _p2, ifindex, state, _fl, _type = rtnl.NDMSG.unpack(msg.body)
            dst = msg.attrs.get(_NDA_DST)
            mac = _mac(msg.attrs.get(_NDA_LLADDR))
            if fam != socket.AF_BRIDGE or ifindex != index or not dst or len(dst) != size or mac is None:
                return None
            return KernelFdb(mac, address(dst), bool(state & NUD_PERMANENT))

        return self._each(rtnl.RTM_GETNEIGH, rtnl.NDMSG.pack(socket.AF_BRIDGE, 0, 0, 0, 0, 0, 0), keep)

    def links(self) -> list[rtnl.LinkInfo]:
        """Every device, in the kernel's order."""
        return self._dump(rtnl.RTM_GETLINK, rtnl.IFINFOMSG.pack(0, 0, 0, 0, 0, 0),
                          lambda m: rtnl.link_info(m) if m.type == 16 else None)  # RTM_NEWLINK

    def link(self, name: str) -> rtnl.LinkInfo | None:
        """The device called `name`, None when there is none."""
        return next((link for link in self.links() if link.name == name), None)

    def addresses(self, family: int, index: int = 0) -> list[rtnl.AddrInfo]:
        """Addresses of one family (of device `index` only, when given), in the kernel's order."""
        def keep(m: rtnl.Message) -> rtnl.AddrInfo | None:
            a = rtnl.addr_info(m)
            return a if a.family == family and (not index or a.index == index) else None

        return self._dump(rtnl.RTM_GETADDR, rtnl.IFADDRMSG.pack(family, 0, 0, 0, 0), keep)

    def route_get(self, dst: IPv4Address | IPv6Address) -> list[rtnl.RouteInfo]:
        """`ip route get <dst>`: the route the kernel would use; OSError (ENETUNREACH...) when none."""
        family = socket.AF_INET6 if dst.version == 6 else socket.AF_INET
        payload = rtnl.RTMSG.pack(family, dst.max_prefixlen, 0, 0, 0, 0, 0, 0, 0) + rtnl._attr(rtnl.RTA_DST, dst.packed)
        self._socket()
        assert self._sock is not None
        self._seq += 1
        return [rtnl.route_info(m) for m in rtnl.ask(self._sock, rtnl.RTM_GETROUTE, payload, self._seq)
                if m.type == rtnl.RTM_NEWROUTE]

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


_NDA_DST, _NDA_LLADDR = 1, 2


def _mac(raw: bytes | None) -> str | None:
    return raw.hex(":") if raw and len(raw) == 6 else None


def delete_route_request(route: KernelRoute) -> rtnl.Request:
    """The request that deletes exactly this main-table route: its protocol, tos, metric,
    gateway and device included, so nobody else's route to the same subnet matches."""
    return rtnl.route_request(False, route.dst.network_address.packed, route.dst.prefixlen,
                              route.gateway.packed if route.gateway is not None else None,
                              oif=route.oif, table=MAIN_TABLE, protocol=route.proto, tos=route.tos,
                              priority=route.priority)
