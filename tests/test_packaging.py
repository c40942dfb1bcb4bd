"""What a host install gets: etc/install.sh installs a built wheel (not this tree), so every file the
package needs at run time must be in it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_wheel_carries_the_udp_bpf_object_and_its_source(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("flannelpy-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for part in ("udp_encap.bpf.o", "udp_encap.bpf.c", "build.sh"):
        assert f"flannelpy/backends/udp/bpf/{part}" in names, part
    assert "flannelpy/cli/flannelctl/__main__.py" in names
