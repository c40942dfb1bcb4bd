import os
import shutil
import sys

import pytest
from etcd_server import EtcdServer

# The suite runs from a venv (`.venv/bin/python -m pytest`) that is not activated: put its
# flanneld and flannelctl first on PATH for the subprocesses the tests and the lab start.
_BIN = os.path.dirname(sys.executable)
if os.path.exists(os.path.join(_BIN, "flanneld")):
    os.environ["PATH"] = _BIN + os.pathsep + os.environ.get("PATH", "")


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
