"""flannelctl docker-opts: mk-docker-opts.sh (same options, output, messages and exit codes)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from flannelpy.docker.opts import USAGE, DockerOptsError, parse_args, render, route_conflict
from flannelpy.subnet.envfile import parse_env_file


def run(argv: list[str], environ: dict[str, str] | None = None, prog: str = "mk-docker-opts.sh") -> int:
    env = dict(os.environ if environ is None else environ)
    try:
        opts = parse_args(argv, prog)
        flannel_env = None
        if os.path.isfile(opts.flannel_env):
            with open(opts.flannel_env, encoding="utf-8", errors="replace") as fh:
                flannel_env = parse_env_file(fh.read())
        text = render(opts, env, flannel_env)
        # the script truncates then appends: a plain write (not atomic), same end result
        with open(opts.docker_env, "w", encoding="utf-8") as fh:
            fh.write(text)
        subnet = {**env, **(flannel_env or {})}.get("FLANNEL_SUBNET", "")
        if subnet:
            try:
                routes = subprocess.run(["ip", "route", "show"], capture_output=True, text=True).stdout
            except FileNotFoundError:
                routes = ""  # no iproute2: nothing to compare against
            msg = route_conflict(subnet, routes)
            if msg:
                raise DockerOptsError(msg)
    except DockerOptsError as err:
        sys.stderr.write(str(err))
        return err.exit_code
    except OSError as err:
        sys.stderr.write(f"{prog}: {err.filename}: {err.strerror}\n")
        return 1
    return 0


def _run_from_flannelctl(args: argparse.Namespace) -> int:
    script = os.environ.get("MK_DOCKER_OPTS_NAME")
    if script is None and args.argv in (["--help"], ["-h"], ["-help"]):
        # Asked as flannelctl: help on stdout, exit 0.  As mk-docker-opts.sh (the wrapper sets
        # MK_DOCKER_OPTS_NAME), -h keeps the script's usage on stderr and exit 1.
        sys.stdout.write(USAGE.format(prog="flannelctl docker-opts"))
        return 0
    return run(args.argv, prog=script or "mk-docker-opts.sh")


def register(subparsers) -> None:
    # "+" as prefix: every argument, -h included, goes to the getopts-style parser unchanged
    p = subparsers.add_parser(
        "docker-opts",
        help="write Docker options from subnet.env (mk-docker-opts.sh)",
        prefix_chars="+",
        add_help=False,
    )
    p.add_argument("argv", nargs=argparse.REMAINDER)
    p.set_defaults(func=_run_from_flannelctl)
