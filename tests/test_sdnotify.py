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


def test_a_failed_start_tells_systemd_why(etcd, tmp_path):
    """flanneld refusing a bad config sends STATUS=failed: <reason> (one line), so `systemctl status`
    shows the reason even when its log excerpt hides a failed attempt's lines."""
    import subprocess
    import sys

    path = str(tmp_path / "notify")
    etcd.etcdctl("put", "/fpsd/network/config", '{"Network":"10.5.0.0/33"}')
    flanneld = os.path.join(os.path.dirname(sys.executable), "flanneld")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(path)
        rx.settimeout(30)
        r = subprocess.run([flanneld, f"-etcd-endpoints={etcd.endpoint}", "-etcd-prefix=/fpsd/network",
                            f"-subnet-file={tmp_path}/subnet.env", "-status-socket="],
                           env=dict(os.environ, NOTIFY_SOCKET=path), capture_output=True, text=True, timeout=60)
        assert r.returncode == 1, r.stderr
        messages = []
        while not any(m.startswith(b"STATUS=failed") for m in messages):
            messages.append(rx.recv(4096))
    # first what the attempt waits for (systemd cleared the last attempt's line when it started this one)
    assert messages[0] == (b"STATUS=reading the network config at /fpsd/network/config "
                           b"(retrying while etcd or the key is missing)"), messages
    status = next(m for m in messages if m.startswith(b"STATUS=failed")).decode()
    assert status.startswith("STATUS=failed: Network: '10.5.0.0/33' is not a CIDR") and "\n" not in status
