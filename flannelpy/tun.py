"""Open a TUN device the way flanneld's pkg/ip/tun.go does.

IFF_TUN|IFF_NO_PI (bare IP packets, no 4-byte packet-info header) and not persistent, so
the device disappears when its fd is closed.  The device is created in the network
namespace of the calling thread.
"""

from __future__ import annotations

import fcntl
import os
import struct

from .errors import FlannelError

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFNAMSIZ = 16


def open_tun(pattern: str = "flannel%d", *, nonblocking: bool = True) -> tuple[int, str]:
    """Create a TUN device named by `pattern` (the kernel fills in %d); return (fd, name)."""
    if len(pattern.encode()) >= IFNAMSIZ:
        raise FlannelError(f"TUN name {pattern!r} is longer than {IFNAMSIZ - 1} bytes")
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_NONBLOCK if nonblocking else 0)
    try:
        fd = os.open("/dev/net/tun", flags)
    except OSError as exc:
        raise FlannelError(f"failed to open /dev/net/tun: {exc.strerror} (is the tun module loaded?)") from None
    try:
        ifr = struct.pack("16sH22x", pattern.encode(), IFF_TUN | IFF_NO_PI)
        result = fcntl.ioctl(fd, TUNSETIFF, ifr)
    except OSError as exc:
        os.close(fd)
        raise FlannelError(f"failed to create TUN device {pattern!r}: {exc.strerror}") from None
    name = result[:IFNAMSIZ].rstrip(b"\0").decode()
    return fd, name
