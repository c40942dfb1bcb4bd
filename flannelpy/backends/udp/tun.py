"""Open a TUN device the way flanneld's pkg/ip/tun.go does.

IFF_TUN|IFF_NO_PI (bare IP packets, no 4-byte packet-info header) and not persistent, so
the device disappears when its fd is closed.  The device is created in the network
namespace of the calling thread.
"""

from __future__ import annotations

import fcntl
import os
import struct

from flannelpy.errors import FlannelError

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16
VNET_HDR_LEN = 10  # struct virtio_net_hdr, the TUN default size


def open_tun(pattern: str = "flannel%d", *, nonblocking: bool = True, vnet_hdr: bool = False) -> tuple[int, str]:
    """Create a TUN device named by `pattern` (the kernel fills in %d); return (fd, name).

    With `vnet_hdr` every read and write carries a 10-byte virtio_net_hdr in front of the
    packet (IFF_VNET_HDR), which lets the forwarder write coalesced TCP super-packets
    (gso_type TCPV4) into the kernel.  Offloads towards us stay off (TUNSETOFFLOAD 0), so
    reads are still single, fully checksummed packets: the kernel segments in C.
    """
    if len(pattern.encode()) >= IFNAMSIZ:
        raise FlannelError(f"TUN name {pattern!r} is longer than {IFNAMSIZ - 1} bytes")
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_NONBLOCK if nonblocking else 0)
    try:
        fd = os.open("/dev/net/tun", flags)
    except OSError as exc:
        raise FlannelError(f"failed to open /dev/net/tun: {exc.strerror} (is the tun module loaded?)") from None
    try:
        flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
        ifr = struct.pack("16sH22x", pattern.encode(), flags)
        result = fcntl.ioctl(fd, TUNSETIFF, ifr)
        if vnet_hdr:
            fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
    except OSError as exc:
        os.close(fd)
        raise FlannelError(f"failed to create TUN device {pattern!r}: {exc.strerror}") from None
    name = result[:IFNAMSIZ].rstrip(b"\0").decode()
    return fd, name
