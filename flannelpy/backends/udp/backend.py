"""udp backend: a TUN device plus a user-space forwarder (flanneld's pkg/backend/udp).

Wire-compatible with flanneld: bare IPv4 packets in UDP to <peer PublicIP>:<Port>, all
nodes on the same port.  Unlike flanneld, a datagram is written into the TUN only when its
outer source holds a lease and each inner packet's source lies in that lease's subnet
(flanneld writes anything it receives); the drops are counted by kind.

Also unlike flanneld, flannel0 is kept as it should be (plan.py decides): a deleted device
is re-created (a new TUN; the forwarder moves to it), a removed address or route restored, a
downed link set up, every 10 s and within a fraction of a second of the kernel reporting a
change; /readyz shows what is broken until it is repaired.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from ipaddress import IPv4Address, IPv4Network
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import trio

from flannelpy.backends.base import Backend, LeaseData
from flannelpy.backends.repair import RESYNC_INTERVAL, RepairLoop
from flannelpy.errors import FlannelError
from flannelpy.hostnet.monitor import KernelChange
from flannelpy.hostnet.netlink import MAIN_TABLE, NetlinkError
from flannelpy.subnet.lease import EventKind, Lease, LeaseEvent

from .bpfmaps import merged_counters
from .bpfpath import BpfPath, BpfUnavailable, python_reason
from .forwarder import Counters, Forwarder
from .peertable import PeerTable
from .plan import TunFacts, TunRepair, TunSpec, change_matters, tun_repair
from .tun import open_tun

if TYPE_CHECKING:
    from flannelpy.hostnet.netlink import IPRoute  # annotations only: loaded by the netlink thread

log = logging.getLogger(__name__)

DEFAULT_PORT = 8285
ENCAP_OVERHEAD = 28  # outer IPv4 (20) + UDP (8)
SOCKET_BUFFER = 4 << 20  # absorbs bursts while Python is busy with the other direction
IFF_UP = 0x1


def _configure_tun(ipr: IPRoute, name: str, address: str, mtu: int, network: str) -> int:
    index = ipr.link_lookup(ifname=name)[0]
    ipr.addr("add", index=index, address=address, prefixlen=32)
    ipr.link("set", index=index, mtu=mtu, state="up")
    try:
        ipr.route("add", dst=network, oif=index)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:  # Docker may already hold a route to the network
            raise
    return index


def _read_tun(ipr: IPRoute, index: int, network: IPv4Network) -> TunFacts:
    """flannel0 (by index) as the kernel reports it: one link get, one address and one route dump."""
    try:
        links = ipr.get_links(index)
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return TunFacts(present=False)
        raise
    link = links[0]
    info = link.get_attr("IFLA_LINKINFO")
    if info is None or info.get_attr("IFLA_INFO_KIND") != "tun":
        return TunFacts(present=False)  # not a TUN: our device is gone and the index reused
    addresses = frozenset(
        (IPv4Address(m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")), m["prefixlen"])
        for m in ipr.get_addr(index=index, family=socket.AF_INET) if m["index"] == index
    )
    return TunFacts(present=True, up=bool(link["flags"] & IFF_UP), mtu=link.get_attr("IFLA_MTU"),
                    addresses=addresses, network_route_oifs=_network_route_oifs(ipr, network))


def _network_route_oifs(ipr: IPRoute, network: IPv4Network) -> tuple[int | None, ...]:
    """Output devices of the main table's unicast routes to exactly `network`."""
    base = str(network.network_address)
    return tuple(
        msg.get_attr("RTA_OIF")
        for msg in ipr.get_routes(family=socket.AF_INET, table=MAIN_TABLE)
        if msg.get_attr("RTA_TABLE", msg["table"]) == MAIN_TABLE and msg["type"] == 1  # RTN_UNICAST
        and msg["dst_len"] == network.prefixlen and (msg.get_attr("RTA_DST") or "0.0.0.0") == base
    )


def _fix_tun(ipr: IPRoute, spec: TunSpec, fix: TunRepair) -> list[str]:
    """Apply the repairs that keep the device (not reopen); return what failed, one line each."""
    failed = []
    steps = []
    if fix.set_mtu:
        steps.append(("MTU", lambda: ipr.link("set", index=spec.index, mtu=spec.mtu)))
    if fix.set_up:
        steps.append(("set up", lambda: ipr.link("set", index=spec.index, state="up")))
    if fix.add_address:
        steps.append(("address", lambda: ipr.addr("add", index=spec.index, address=str(spec.address), prefixlen=32)))
    if fix.add_route:
        steps.append(("route", lambda: ipr.route("add", dst=str(spec.network), oif=spec.index)))
    for what, step in steps:
        try:
            step()
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:  # someone else restored it meanwhile
                failed.append(f"{spec.name}: cannot restore {what}: {_reason(exc)}")
    return failed


def _reason(exc: BaseException) -> str:
    """An OS or netlink error as the operator reads it ("No such device", not "(19, ...)")."""
    code = getattr(exc, "code", None) if isinstance(exc, NetlinkError) else getattr(exc, "errno", None)
    if code:
        return os.strerror(code)
    return str(exc)


class UdpBackend(Backend):
    name = "udp"

    def __init__(self, *args: Any, resync_interval: float = RESYNC_INTERVAL, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.port: int = self.config.backend_option("Port", int, DEFAULT_PORT)
        if not 0 < self.port < 65536:
            raise FlannelError(f"Backend.Port: {self.port} is not a UDP port")
        self.peers = PeerTable(self.port)
        self.tun_fd: int | None = None
        self.tun_name: str | None = None
        self.tun_index: int | None = None
        self.sock: socket.socket | None = None
        self.forwarder: Forwarder | None = None
        self._counters = Counters()  # one set for every TUN this backend opens
        self._address: IPv4Address | None = None
        # What is broken now (/readyz shows it): set when the kernel reports a change or a
        # pass finds one, cleared by the pass that finds the device right again.
        self._problems: list[str] = []
        self.repairs: dict[str, int] = {}
        self._lock = trio.Lock()  # one repair at a time
        self._replaced = trio.Event()  # set (then renewed) whenever a repair installs a new forwarder
        self._forward_scope: trio.CancelScope | None = None
        self.loop = RepairLoop("udp flannel0", self.netlink, self.reconcile_once, self._notice,
                               interval=resync_interval)
        # -udp-forwarder: "auto" (BPF where the kernel takes it, else Python), "bpf" (refuse to
        # start without it) or "python".  The agent gives it through use_agent_flags().
        self.forwarder_choice = "auto"
        self.bpf: BpfPath | None = None
        self.data_path = "python"
        self.data_path_reason = ""

    def use_agent_flags(self, *, udp_forwarder: str = "auto") -> None:
        self.forwarder_choice = udp_forwarder

    def mtu(self) -> int:
        return self.ext.mtu - ENCAP_OVERHEAD

    def accepts(self, lease: Lease) -> bool:
        # flanneld's udp backend never looks at BackendType.
        return True

    async def prepare(self) -> LeaseData:
        return LeaseData("", None)  # udp leases carry no BackendType

    async def start(self, lease: Lease) -> None:
        address = lease.subnet.network_address
        fd, name, index = await self._open_tun(address)
        sock: socket.socket | None = None
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
                except OSError:
                    pass
            try:
                sock.bind((str(self.ext.ip), self.port))
            except OSError as exc:
                raise FlannelError(f"udp backend: cannot bind {self.ext.ip}:{self.port}: {exc.strerror}") from None
            sock.setblocking(False)
        except BaseException:
            # Closing the non-persistent TUN removes the device with its address and route.
            os.close(fd)
            if sock is not None:
                sock.close()
            raise
        self.sock = sock
        self._address = address
        self._install(fd, name, index)
        await self._start_bpf(name, index)

    async def _start_bpf(self, tun_name: str, tun_index: int) -> None:
        """Take the per-packet work off Python where the kernel allows; say which path runs."""
        reason = python_reason(self.forwarder_choice)
        if reason is None:
            bpf = BpfPath(self.ext.name, self.ext.index, self.ext.ip, self.port)
            try:
                await trio.to_thread.run_sync(bpf.load, tun_name, tun_index, self.peers.entries())
            except (BpfUnavailable, OSError, ValueError) as exc:
                reason = str(exc) if isinstance(exc, BpfUnavailable) else f"BPF setup failed: {_reason(exc)}"
                if self.forwarder_choice == "bpf":
                    await self.close()
                    raise FlannelError(f"-udp-forwarder=bpf: {reason}") from None
            else:
                self.bpf = bpf
                self.data_path, self.data_path_reason = "bpf", f"tc-BPF on {tun_name} egress and {self.ext.name} ingress"
                log.info("udp data plane: BPF (%s); the Python forwarder takes what it passes on "
                         "(unknown destinations, unknown senders, fragments)", self.data_path_reason)
                warning = await trio.to_thread.run_sync(bpf.offload_warning)
                if warning:
                    log.warning("udp data plane: %s", warning)
                return
        self.data_path, self.data_path_reason = "python", reason
        log.info("udp data plane: Python forwarder (%s)", reason)

    async def _open_tun(self, address: IPv4Address) -> tuple[int, str, int]:
        """A new flannel0, configured: (fd, name, index).  Nothing is left behind on failure."""
        fd, name = open_tun("flannel%d", vnet_hdr=True)
        try:
            index = await self.netlink.call(_configure_tun, name, str(address), self.mtu(), str(self.config.network))
        except BaseException:
            os.close(fd)
            raise
        return fd, name, index

    def _install(self, fd: int, name: str, index: int) -> None:
        """Make the forwarder work on this TUN (the forward loop moves over to it)."""
        assert self.sock is not None and self._address is not None
        self.tun_fd, self.tun_name, self.tun_index = fd, name, index
        self.forwarder = Forwarder(fd, self.sock, self.peers, self._address, vnet_hdr=True, counters=self._counters)
        self._replaced.set()
        self._replaced = trio.Event()
        if self._forward_scope is not None:
            self._forward_scope.cancel()

    def _spec(self) -> TunSpec:
        assert self.tun_name is not None and self.tun_index is not None and self._address is not None
        return TunSpec(self.tun_name, self.tun_index, self._address, self.mtu(), self.config.network)

    async def apply(self, events: Sequence[LeaseEvent]) -> None:
        # Only the agent's (admitted) lease events change who may send what: the peer table
        # is never touched by anything the data plane sees.
        for event in events:
            if event.kind is EventKind.ADDED:
                self.peers.set(event.lease.subnet, event.lease.attrs.public_ip)
            else:
                self.peers.remove(event.lease.subnet)
        if self.bpf is not None:
            try:
                self.bpf.sync(self.peers.entries())
            except OSError as exc:
                # Not fatal: what the maps lack goes to the Python path, which has the table.
                log.error("udp BPF maps: cannot apply the lease changes: %s", _reason(exc))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.forwarder is None:
            raise FlannelError("udp backend: run() before start()")
        async with trio.open_nursery() as nursery:
            await nursery.start(self._forward)
            await nursery.start(self.loop.run)
            task_status.started()

    async def _forward(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the current forwarder; when its TUN is gone, ask for a repair and wait for the
        new one.  The old fd is closed once its forwarder has stopped using it."""
        task_status.started()
        while True:
            forwarder = self.forwarder
            assert forwarder is not None
            with trio.CancelScope() as scope:
                self._forward_scope = scope
                await forwarder.run()
            self._forward_scope = None
            if self.forwarder is forwarder:
                # run() returned by itself: the TUN is gone (its fd reads an error).
                reason = _reason(forwarder.tun_error) if forwarder.tun_error else "stopped"
                log.warning("%s is gone (%s); re-creating it", self.tun_name, reason)
                self._problems = [f"{self.tun_name} is missing ({reason}), re-creating it"]
                self.loop.wake()
                while self.forwarder is forwarder:
                    await self._replaced.wait()
            _close_fd(forwarder.tun_fd)

    # --- kernel repair ---------------------------------------------------------------------

    def _notice(self, change: KernelChange) -> bool:
        matters = change_matters(change, index=self.tun_index, network=self.config.network)
        if matters and change.deleted and self.tun_name and self._address is not None:
            # /readyz says so from now until the pass (a fraction of a second later) repairs it.
            what = {"link": f"{self.tun_name} is missing",
                    "addr": f"an address of {self.tun_name} was removed",
                    "route": f"a route to {self.config.network} was removed"}.get(change.kind)
            line = f"{what}, restoring it" if what else None
            if line is not None and line not in self._problems:
                self._problems = [*self._problems, line]
        return matters

    async def reconcile_once(self) -> TunRepair | None:
        """One pass: read flannel0, decide, repair, and read again for /readyz.  None before
        start() (nothing is ours yet)."""
        if self.tun_index is None or self.forwarder is None:
            return None
        async with self._lock:
            spec = self._spec()
            facts = await self.netlink.call(_read_tun, spec.index, spec.network)
            fix = tun_repair(spec, facts, fd_broken=self.forwarder.tun_error is not None)
            failures: list[str] = []
            if fix.reopen:
                try:
                    fd, name, index = await self._open_tun(spec.address)
                except (FlannelError, NetlinkError, OSError, IndexError) as exc:
                    failures.append(f"{spec.name} is missing and re-creating it failed: {_reason(exc)}")
                else:
                    self._install(fd, name, index)
                    await self._reattach_bpf(name, index)
                    spec = self._spec()
                    log.warning("kernel repair: %s (now %s, index %d)", fix.done(spec), name, index)
                    self._count("device")
            elif fix.needed:
                failures = await self.netlink.call(_fix_tun, spec, fix)
                if not failures:
                    log.warning("kernel repair: %s", fix.done(spec))
                for flag, what in ((fix.set_up, "link_up"), (fix.set_mtu, "mtu"),
                                   (fix.add_address, "address_restored"), (fix.add_route, "route_restored")):
                    if flag:
                        self._count(what)
            if fix.needed and not failures:
                facts = await self.netlink.call(_read_tun, spec.index, spec.network)
                fix = tun_repair(spec, facts, fd_broken=self.forwarder.tun_error is not None)
            problems = failures or fix.problems(spec)
            if problems != self._problems and problems:
                for line in problems:
                    log.error("%s", line)
            elif self._problems and not problems:
                log.info("%s works again", spec.name)
            self._problems = problems
            return fix

    async def _reattach_bpf(self, tun_name: str, tun_index: int) -> None:
        """Encapsulate on the new flannel0; if that is refused, run on Python from now on."""
        if self.bpf is None:
            return
        try:
            await trio.to_thread.run_sync(self.bpf.attach_tun, tun_name, tun_index)
        except (BpfUnavailable, OSError) as exc:
            bpf, self.bpf = self.bpf, None
            await trio.to_thread.run_sync(bpf.close)
            self.data_path, self.data_path_reason = "python", f"re-attaching BPF to {tun_name} failed: {exc}"
            log.error("udp data plane: Python forwarder (%s)", self.data_path_reason)

    def _count(self, what: str) -> None:
        self.repairs[what] = self.repairs.get(what, 0) + 1

    def data_plane_problems(self) -> list[str]:
        return list(self._problems)

    def repair_counters(self) -> Mapping[str, int]:
        return dict(self.repairs)

    def counters(self) -> dict[str, int]:
        """Both paths' totals under the Python forwarder's names (/metrics shows these), and
        the BPF programs' own counters as bpf_* (summed over CPUs, read on each call)."""
        if not self.forwarder:
            return {}
        bpf: dict[str, int] = {}
        if self.bpf is not None:
            try:
                bpf = self.bpf.counters()
            except OSError as exc:
                log.warning("udp BPF counters unreadable: %s", _reason(exc))
        out = merged_counters(self._counters.as_dict(), bpf)
        out["bpf_active"] = int(self.bpf is not None)
        return out

    async def close(self) -> None:
        # No BPF state outlives us: filters, our clsact qdisc and the pins go first (a filter
        # left on the underlay would keep redirecting peers' datagrams to a missing flannel0).
        if self.bpf is not None:
            bpf, self.bpf = self.bpf, None
            bpf.close()
        # Like flanneld: the TUN fd closes, so flannel0 and its routes vanish.
        if self.sock is not None:
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()
            self.sock = None
        if self.tun_fd is not None:
            _close_fd(self.tun_fd)
            self.tun_fd = None


def _close_fd(fd: int) -> None:
    try:
        trio.lowlevel.notify_closing(fd)
    except RuntimeError:
        pass  # outside trio (nothing can be waiting on it then)
    try:
        os.close(fd)
    except OSError:
        pass  # closed already


BACKEND = UdpBackend
