"""sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET.

flanneld sends only READY=1 (after subnet.env and the backend are up), which Type=notify
units rely on so docker.service starts after subnet.env exists (flannel#205).  We also
send STATUS= and STOPPING=1, which systemd shows in `systemctl status`.  Without
NOTIFY_SOCKET (not under systemd) every call is a no-op; a failed send is logged, never
fatal, like sd_notify's return value that flanneld ignores.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Mapping

log = logging.getLogger("flanneld.sdnotify")


def socket_address(value: str) -> str | bytes | None:
    """NOTIFY_SOCKET -> an AF_UNIX address; `@name` is the abstract namespace (leading NUL)."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock:... and relative paths are not for us


def notify(*fields: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send `fields` as one newline-joined message; True when a datagram was sent."""
    env = os.environ if environ is None else environ
    raw = env.get("NOTIFY_SOCKET", "")
    address = socket_address(raw)
    if address is None:
        if raw:
            log.warning("NOTIFY_SOCKET=%r: not a unix socket path or @abstract name; not notifying", raw)
        return False
    for f in fields:
        if "\n" in f or "=" not in f:
            raise ValueError(f"sd_notify field {f!r}: must be KEY=VALUE on one line")
    message = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", raw, exc)
        return False
    return True
