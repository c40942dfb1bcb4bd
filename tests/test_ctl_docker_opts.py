"""`flannelctl docker-opts --help` is help (stdout, exit 0); as mk-docker-opts.sh, -h stays the script's."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, env=None):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, **(env or {})))


def test_flannelctl_docker_opts_help():
    for flag in ("--help", "-h"):
        r = _run(sys.executable, "-m", "flannelpy.cli.flannelctl", "docker-opts", flag)
        assert r.returncode == 0 and r.stderr == ""
        assert r.stdout.startswith("flannelctl docker-opts [-f FLANNEL-ENV-FILE]") and "illegal option" not in r.stdout


def test_the_script_keeps_its_own_usage_and_exit_code():
    r = _run("sh", os.path.join(ROOT, "etc", "mk-docker-opts.sh"), "-h",
             env={"PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]})
    assert r.returncode == 1 and "Generate Docker daemon options" in r.stderr and r.stdout == ""
