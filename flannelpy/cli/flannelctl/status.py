"""flannelctl status: a running agent's /status (unix socket by default, or a healthz URL).

Exit 0 when the agent answers and is ready; 1 when it is unreachable or not ready yet
(the message says which).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import httpx

from flannelpy.config.flags import FLAGS

# flanneld's -status-socket default (the flag's own, so the two cannot differ)
DEFAULT_SOCKET = next(spec.default for spec in FLAGS if spec.name == "status-socket")


def format_status(doc: dict[str, Any], now: float) -> str:
    """Pure: the human-readable summary of a /status document."""
    lines = [
        f"ready:      {'yes' if doc.get('ready') else 'no'}",
        f"subnet:     {doc.get('subnet') or '-'} (network {doc.get('network') or '-'})",
        f"backend:    {doc.get('backend') or '-'} on {doc.get('interface') or '-'}, public IP "
        f"{doc.get('public_ip') or '-'}, MTU {doc.get('mtu') or '-'}",
        f"peers:      {doc.get('peers_programmed', 0)} programmed of {doc.get('leases_seen', 0)} leases seen",
    ]
    if doc.get("ipv6_subnet"):  # dual stack
        lines.insert(2, f"ipv6:       {doc['ipv6_subnet']} (network {doc.get('ipv6_network') or '-'}), public IPv6 "
                        f"{doc.get('public_ipv6') or '-'}")
    exp = doc.get("lease_expiration")
    lines.append(f"lease:      expires in {int(exp - now)}s" if exp else "lease:      no expiry")
    at = doc.get("last_event_at")
    ago = f" ({int(now - at)}s ago)" if at else ""
    lines.append(f"last event: {doc.get('last_event') or '-'}{ago}")
    return "\n".join(lines) + "\n"


def run(args) -> int:
    try:
        if args.url:
            r = httpx.get(args.url.rstrip("/") + "/status", timeout=5)
        else:
            with httpx.Client(transport=httpx.HTTPTransport(uds=args.socket), timeout=5) as c:
                r = c.get("http://flanneld/status")
        r.raise_for_status()
        doc = r.json()
    except (httpx.HTTPError, ValueError) as exc:
        where = args.url or args.socket
        fix = ("is flanneld running with -healthz-port, and is this its address?" if args.url else
               "is flanneld running (systemctl status flanneld)? One started with -status-socket=PATH is "
               "reached with --socket PATH, one with -healthz-port with --url http://IP:PORT")
        print(f"flannelctl: agent unreachable at {where}: {str(exc) or type(exc).__name__}; {fix}", file=sys.stderr)
        return 1
    print(json.dumps(doc, indent=2, sort_keys=True) if args.json else format_status(doc, time.time()), end="")
    if not doc.get("ready"):
        print("flannelctl: agent is running but not ready yet", file=sys.stderr)
        return 1
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("status", help="show a running flanneld's state")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--socket", default=DEFAULT_SOCKET, help=f"agent status socket (default {DEFAULT_SOCKET})")
    g.add_argument("--url", help="healthz base URL instead, e.g. http://127.0.0.1:8285")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)
