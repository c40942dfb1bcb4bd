"""A TCP forwarder across network namespaces: the lab's etcd on 127.0.0.1 of the host's namespace.

The lab's etcd listens on the underlay bridge inside `<prefix>-ul`; from the host's own namespace that
address is not the lab's at all (10.250.0.1 would follow the default route off the machine).  So the
lab binds a listening socket on 127.0.0.1 in the host's namespace and starts this program inside the
underlay namespace (`nsenter --net=...`) with that socket inherited: a socket stays in the namespace
it was made in, so it accepts connections from the host's loopback, while every connection this
program opens to etcd is made in the underlay.  Traffic stays on loopback and in the lab.

    nsenter --net=/var/run/netns/fplab-ul python3 -m flannelpy.lab.portforward --fd 3 --to 10.250.0.1:2379 --lab fplab

It runs until SIGTERM (the lab's `down` stops it by PID; it lives in the underlay namespace, so the
lab's leftover sweep finds it too).
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys

import trio

BUFFER = 65536


async def _pipe(source: trio.SocketStream, sink: trio.SocketStream) -> None:
    try:
        while data := await source.receive_some(BUFFER):
            await sink.send_all(data)
        await sink.send_eof()  # half-close: etcd's answers to a finished request still come back
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


async def _forward(client: trio.SocketStream, host: str, port: int) -> None:
    try:
        upstream = await trio.open_tcp_stream(host, port)
    except OSError:
        await client.aclose()
        return
    async with client, upstream:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pipe, client, upstream)
            nursery.start_soon(_pipe, upstream, client)


async def serve(listen_fd: int, host: str, port: int) -> None:
    sock = socket.socket(fileno=listen_fd)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))

    async def handle(stream: trio.SocketStream) -> None:
        await _forward(stream, host, port)

    await trio.serve_listeners(handle, [listener])


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # stopped by signal, never with a traceback in its log
    p = argparse.ArgumentParser(prog="flannelpy.lab.portforward")
    p.add_argument("--fd", type=int, required=True, help="inherited listening socket")
    p.add_argument("--to", required=True, help="HOST:PORT to connect to, from this process's namespace")
    p.add_argument("--lab", default="", help="the lab's prefix (only so that `ps` says whose forwarder this is)")
    args = p.parse_args(argv)
    host, _, port = args.to.rpartition(":")
    trio.run(serve, args.fd, host, int(port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
