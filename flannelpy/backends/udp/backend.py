"""udp backend: a TUN device plus a user-space forwarder (flanneld's pkg/backend/udp).

Wire-compatible with flanneld: bare IPv4 packets in UDP to <peer PublicIP>:<Port>, all
nodes on the same port.  Unlike flanneld, datagrams from addresses that hold no lease
are dropped (flanneld writes anything it receives into the TUN).
"""

from __future__ import annotations

import errno
import os
import socket
from ipaddress import IPv4Address
from typing import Any, Sequence

import trio
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from flannelpy.backends.base import Backend, LeaseData
from flannelpy.errors import FlannelError
from flannelpy.subnet.lease import EventKind, Lease, LeaseEvent

from .forwarder import Forwarder
from .peertable import PeerTable
from .tun import open_tun

DEFAULT_PORT = 8285
ENCAP_OVERHEAD = 28  # outer IPv4 (20) + UDP (8)
SOCKET_BUFFER = 4 << 20  # absorbs bursts while Python is busy with the other direction


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


class UdpBackend(Backend):
    name = "udp"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.port: int = self.config.backend_option("Port", int, DEFAULT_PORT)
        if not 0 < self.port < 65536:
            raise FlannelError(f"Backend.Port: {self.port} is not a UDP port")
        self.peers = PeerTable(self.port)
        self.tun_fd: int | None = None
        self.tun_name: str | None = None
        self.sock: socket.socket | None = None
        self.forwarder: Forwarder | None = None

    def mtu(self) -> int:
        return self.ext.mtu - ENCAP_OVERHEAD

    def accepts(self, lease: Lease) -> bool:
        # flanneld's udp backend never looks at BackendType.
        return True

    async def prepare(self) -> LeaseData:
        return LeaseData("", None)  # udp leases carry no BackendType

    async def start(self, lease: Lease) -> None:
        address = lease.subnet.network_address
        fd, name = open_tun("flannel%d", vnet_hdr=True)
        sock: socket.socket | None = None
        try:
            await self.netlink.call(_configure_tun, name, str(address), self.mtu(), str(self.config.network))
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
        self.tun_fd, self.tun_name, self.sock = fd, name, sock
        self.forwarder = Forwarder(fd, sock, self.peers, IPv4Address(address), vnet_hdr=True)

    async def apply(self, events: Sequence[LeaseEvent]) -> None:
        for event in events:
            if event.kind is EventKind.ADDED:
                self.peers.set(event.lease.subnet, event.lease.attrs.public_ip)
            else:
                self.peers.remove(event.lease.subnet)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.forwarder is None:
            raise FlannelError("udp backend: run() before start()")
        await self.forwarder.run(task_status=task_status)

    def counters(self) -> dict[str, int]:
        return self.forwarder.counters.as_dict() if self.forwarder else {}

    async def close(self) -> None:
        # Like flanneld: the TUN fd closes, so flannel0 and its routes vanish.
        if self.sock is not None:
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()
            self.sock = None
        if self.tun_fd is not None:
            trio.lowlevel.notify_closing(self.tun_fd)
            os.close(self.tun_fd)
            self.tun_fd = None


BACKEND = UdpBackend
