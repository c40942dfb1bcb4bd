import os
import shutil

import pytest

from etcd_server import EtcdServer


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")


@pytest.fixture
def etcd():
    """A fresh real etcd on a free loopback port, removed afterwards."""
    if not shutil.which("etcd"):
        pytest.fail("etcd is not installed (apt-get install etcd-server); .ci/run installs it")
    server = EtcdServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def root():
    _need_root()
