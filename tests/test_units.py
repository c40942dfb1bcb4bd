"""systemd units verified with systemd-analyze in a temporary root; shellcheck on shipped scripts."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = [p for d in ("systemd", "etc", "vagrant") for p in sorted((REPO / d).rglob("*"))
           if p.is_file() and p.read_text(errors="replace").startswith("#!/bin/sh")
           or p.is_file() and p.suffix == ".sh"]


def _fake_root(tmp_path: Path) -> Path:
    """A root with the unit installed where the RPM puts it and executables at its ExecStart paths."""
    root = tmp_path / "fpop-root"
    unitdir = root / "usr/lib/systemd/system"
    # the host's stock units (sysinit.target, network-online.target, ...) so dependencies resolve
    shutil.copytree("/usr/lib/systemd/system", unitdir, symlinks=True)
    (unitdir / "docker.service.d").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "systemd/flanneld.service", unitdir)
    shutil.copy(REPO / "systemd/docker.service.d/flannel.conf", unitdir / "docker.service.d")
    (unitdir / "docker.service").write_text("[Service]\nType=notify\nExecStart=/usr/bin/dockerd\n")
    (root / "etc/sysconfig").mkdir(parents=True)
    shutil.copy(REPO / "etc/sysconfig/flanneld", root / "etc/sysconfig/flanneld")
    for exe in ("usr/bin/flanneld-start", "usr/bin/flannelctl", "usr/bin/dockerd", "bin/sh"):
        path = root / exe
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    return root


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze (Debian package systemd) missing")
def test_units_verify(tmp_path):
    root = _fake_root(tmp_path)
    unitdir = root / "usr/lib/systemd/system"
    r = subprocess.run(["systemd-analyze", "verify", f"--root={root}", "--man=no",
                        str(unitdir / "flanneld.service"), str(unitdir / "docker.service")],
                       capture_output=True, text=True, env=dict(os.environ, SYSTEMD_LOG_LEVEL="notice"))
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze missing")
def test_verify_catches_a_missing_binary(tmp_path):
    root = _fake_root(tmp_path)
    (root / "usr/bin/flanneld-start").unlink()
    unitdir = root / "usr/lib/systemd/system"
    r = subprocess.run(["systemd-analyze", "verify", f"--root={root}", "--man=no", str(unitdir / "flanneld.service")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "flanneld-start" in r.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_shellcheck(script):
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck (Debian package shellcheck) missing")
    r = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_wrapper_maps_sysconfig_variables(tmp_path):
    """flanneld-start with a stub flanneld: the FLANNEL_* values become flags, options pass through."""
    text = (REPO / "systemd/flanneld-start").read_text().replace("/usr/bin/flanneld", str(tmp_path / "stub"))
    (tmp_path / "stub").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    (tmp_path / "stub").chmod(0o755)
    (tmp_path / "wrapper").write_text(text)
    env = {"PATH": "/usr/bin:/bin", "FLANNEL_ETCD_ENDPOINTS": "http://e:2379", "FLANNEL_ETCD_KEY": "/atomic.io/network"}
    out = subprocess.run(["sh", str(tmp_path / "wrapper"), "-iface=eth1"], env=env, capture_output=True, text=True).stdout
    assert out.split("\n")[:3] == ["-etcd-endpoints=http://e:2379", "-etcd-prefix=/atomic.io/network", "-iface=eth1"]


def test_vagrantfile_syntax():
    if not shutil.which("ruby"):
        pytest.skip("ruby not installed")
    r = subprocess.run(["ruby", "-c", str(REPO / "vagrant/Vagrantfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_flanneld_unit_gives_a_waiting_start_as_long_as_coreos_does():
    """A boot where etcd comes up late: the agent waits (Type=notify, no READY=1 yet); the unit must not kill it
    after systemd's default 90 s."""
    import configparser

    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(Path(__file__).resolve().parent.parent / "systemd" / "flanneld.service")
    assert unit["Service"]["Type"] == "notify"
    assert unit["Service"]["TimeoutStartSec"] == "300"
