"""sd_notify datagrams received on real AF_UNIX datagram sockets."""

import os
import socket

from flannelpy.ops import sdnotify


def test_path_socket(tmp_path):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(path)
        assert sdnotify.notify("READY=1", "STATUS=leased 10.5.1.0/24", environ={"NOTIFY_SOCKET": path})
        assert rx.recv(4096) == b"READY=1\nSTATUS=leased 10.5.1.0/24"


def test_abstract_socket():
    name = f"fpop-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(b"\0" + name.encode())
        assert sdnotify.notify("STOPPING=1", environ={"NOTIFY_SOCKET": "@" + name})
        assert rx.recv(4096) == b"STOPPING=1"


def test_noop_without_socket_and_on_missing_listener(tmp_path):
    assert sdnotify.notify("READY=1", environ={}) is False
    assert sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "absent")}) is False
