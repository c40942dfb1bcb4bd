"""flanneld's healthz server, plus /metrics and /status, served by hypercorn on trio.

Same contract as flanneld (reference §7): `-healthz-port` 0 means no TCP listener; when on,
GET /healthz -> 200 "flanneld is running" and GET /readyz -> 200 "flanneld is ready" /
503 "flanneld is not ready yet".  flannelpy adds /metrics (Prometheus text) and /status
(AgentState as JSON), and always serves all four on a unix socket (mode 0600, root only)
so `flannelctl status` works even with healthz off, without exposing anything on the network.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import tempfile
from typing import Any, Awaitable, Callable, NamedTuple

import trio

from flannelpy.errors import FlannelError

from .metrics import Metrics
from .state import AgentState

log = logging.getLogger("flanneld.health")
# hypercorn's own "Running on ..." lines are noise next to ours; keep its warnings and errors
_server_log = logging.getLogger("flanneld.health.server")
_server_log.setLevel(logging.WARNING)

DEFAULT_SOCKET = "/run/flannel/flanneld.sock"
_TEXT = b"text/plain; charset=utf-8"
_JSON = b"application/json"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class HealthEndpoints(NamedTuple):
    """What serve_health bound: handed to task_status.started()."""

    tcp: tuple[str, int] | None
    unix: str | None


def route(path: str, state: AgentState, metrics: Metrics) -> tuple[int, bytes, bytes]:
    """(status, content type, body) for a GET of `path`: the whole decision, no I/O."""
    if path == "/healthz":
        return 200, _TEXT, b"flanneld is running"
    if path == "/readyz":
        if not state.ready:
            return 503, _TEXT, b"flanneld is not ready yet"
        # flannelpy: also 503 while the backend reports its data plane broken, saying why
        # (e.g. "flannel.1 missing, re-creating"), and 200 again once it is repaired.
        problems = state.data_plane_problems()
        if problems:
            return 503, _TEXT, ("flanneld is not ready: data plane broken: " + "; ".join(problems)).encode()
        return 200, _TEXT, b"flanneld is ready"
    if path == "/metrics":
        return 200, metrics.content_type.encode(), metrics.render()
    if path == "/status":
        return 200, _JSON, state.to_json().encode() + b"\n"
    return 404, _TEXT, b"404 page not found\n"  # Go's http.NotFound text


def make_app(state: AgentState, metrics: Metrics) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if scope["method"] in ("GET", "HEAD"):
            status, ctype, body = route(scope["path"], state, metrics)
        else:
            status, ctype, body = 405, _TEXT, b"method not allowed\n"
        await send({
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode())],
        })
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})

    return app


def _tcp_socket(ip: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ip, port))
    except OSError as exc:
        sock.close()
        raise FlannelError(f"healthz: cannot listen on {ip}:{port}: {exc.strerror}") from None
    return sock


def _unix_socket(path: str) -> socket.socket:
    """Bind `path` with mode 0600 from the first instant.

    The socket is bound inside a fresh 0700 directory, chmod'ed, then renamed into place,
    so there is no window in which it is reachable with the umask's looser mode, and the
    process umask (shared with the netlink thread) is never touched.
    """
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, mode=0o755, exist_ok=True)
        st: os.stat_result | None = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise FlannelError(f"status socket {path}: {exc.strerror}") from None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise FlannelError(f"status socket {path}: exists and is not a socket; remove it or pass -status-socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            pass  # stale socket from a previous run: replaced below
        else:
            raise FlannelError(f"status socket {path}: another flanneld is serving on it")
        finally:
            probe.close()
    try:
        tmpdir = tempfile.mkdtemp(prefix=".flanneld-sock-", dir=parent)
    except OSError as exc:
        raise FlannelError(f"status socket {path}: cannot create it in {parent}: {exc.strerror}") from None
    tmp = os.path.join(tmpdir, "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(tmp)
        os.chmod(tmp, 0o600)
        os.rename(tmp, path)
    except OSError as exc:
        sock.close()
        raise FlannelError(f"status socket {path}: {exc.strerror}") from None
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        os.rmdir(tmpdir)
    return sock


def _remove_socket(path: str, inode: int) -> None:
    try:
        if os.lstat(path).st_ino == inode:  # not if a newer agent took the path over
            os.unlink(path)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.debug("removing %s: %s", path, exc)


async def serve_health(state: AgentState, metrics: Metrics, ip: str, port: int, unix_socket: str | None,
                       *, unix_socket_optional: bool = False, after: trio.Event | None = None,
                       task_status: trio.TaskStatus[HealthEndpoints] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled.  TCP only when port != 0; the unix socket whenever given.

    `after` (the agent's start-up): the sockets are bound and listening at once (so a second
    agent sees the status socket taken, and clients queue in the backlog), but hypercorn, a
    ~0.1 s import, is loaded and served only once `after` is set: not on the start-up path;
    and only once the first client connects (it waits in the backlog meanwhile): an agent
    nobody asks never holds hypercorn, h2 and wsproto (~1.8 MiB).

    `unix_socket_optional` (the default -status-socket): when it cannot be served, e.g. because
    another flanneld on this machine serves it, warn and run without it, as flanneld (which has
    no such socket) would run; an explicitly given socket that cannot be served is an error.
    """
    if metrics.state is None:
        metrics.bind_state(state)
    socks: list[socket.socket] = []
    tcp = unix = None
    unix_inode = 0
    try:
        if port != 0:
            s = _tcp_socket(ip, port)
            socks.append(s)
            tcp = s.getsockname()[:2]
        if unix_socket:
            try:
                s = _unix_socket(unix_socket)
            except FlannelError as exc:
                if not unix_socket_optional:
                    raise
                log.warning("%s; running without a status socket (give this instance its own with "
                            "-status-socket=PATH)", exc)
            else:
                socks.append(s)
                unix = unix_socket
                unix_inode = os.lstat(unix_socket).st_ino
    except BaseException:
        for s in socks:
            s.close()
        raise
    if not socks:
        task_status.started(HealthEndpoints(None, None))
        return
    parts = []
    if tcp:
        parts.append(f"http://{tcp[0]}:{tcp[1]}")
    if unix:
        parts.append(f"unix:{unix}")
    logged = False
    if after is not None:
        for s in socks:
            s.listen(128)
        task_status.started(HealthEndpoints(tcp, unix))
        task_status = trio.TASK_STATUS_IGNORED
        try:
            await after.wait()
            log.info("serving /healthz /readyz /metrics /status on %s", ", ".join(parts))
            logged = True
            await _first_client(socks)
        except BaseException:
            for s in socks:
                s.close()
            if unix:
                _remove_socket(unix, unix_inode)
            raise

    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    # hypercorn takes ownership of the fds (socket(fileno=...)); detach so ours do not close them
    config.bind = [f"fd://{s.detach()}" for s in socks]
    config.accesslog = None
    config.errorlog = _server_log
    config.graceful_timeout = 3.0  # flanneld gives its healthz server 3 s on shutdown
    config.keep_alive_timeout = 5.0
    config.include_server_header = False
    try:
        await serve(make_app(state, metrics), config, mode="asgi",
                    task_status=_Started(task_status, HealthEndpoints(tcp, unix), [] if logged else parts))
    finally:
        if unix:
            _remove_socket(unix, unix_inode)


async def _first_client(socks: list[socket.socket]) -> None:
    """Until one of the listening sockets has a connection waiting (it stays in the backlog)."""
    async with trio.open_nursery() as nursery:
        async def wait_one(sock: socket.socket) -> None:
            await trio.lowlevel.wait_readable(sock)
            nursery.cancel_scope.cancel()

        for sock in socks:
            nursery.start_soon(wait_one, sock)


class _Started:
    """Adapts hypercorn's started(binds) to ours, logging once the listeners exist (unless
    that was said already: parts empty)."""

    def __init__(self, outer: trio.TaskStatus[HealthEndpoints], value: HealthEndpoints, parts: list[str]) -> None:
        self.outer, self.value, self.parts = outer, value, parts

    def started(self, _binds: Any = None) -> None:
        if self.parts:
            log.info("serving /healthz /readyz /metrics /status on %s", ", ".join(self.parts))
        if self.outer is not trio.TASK_STATUS_IGNORED:
            self.outer.started(self.value)
