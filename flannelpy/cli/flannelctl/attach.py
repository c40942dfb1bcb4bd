"""flannelctl attach / detach: a fixed overlay address for a running container (pipework's job).

    flannelctl attach web                 # the lowest free address of the subnet's upper half
    flannelctl attach web 10.5.69.200     # this one, or a one-line refusal saying why not
    flannelctl attach /var/run/netns/x1   # any network namespace, not only Docker's
    flannelctl detach web [10.5.69.200]

The address comes from this host's lease (subnet.env), from the half Docker does not allocate from
when flanneld writes `fixed-cidr` (-docker-fixed-cidr); see flannelpy.docker.attach for what is built.
"""

from __future__ import annotations

import argparse
import json
import os

from flannelpy.docker.attach import DEFAULT_SUBNET_FILE, attach, detach

_TARGET_HELP = "a Docker container (name or ID) or a network namespace path (e.g. /var/run/netns/NAME)"


def _docker_host(args: argparse.Namespace) -> str | None:
    return args.docker_host or os.environ.get("DOCKER_HOST") or None


def _attach(args: argparse.Namespace) -> int:
    done = attach(args.container, args.address, subnet_file=args.subnet_file, docker_host=_docker_host(args),
                  bridge=args.bridge)
    print(json.dumps(done.as_json(), indent=2) if args.json else done.describe())
    return 0


def _detach(args: argparse.Namespace) -> int:
    removed = detach(args.container, args.address, docker_host=_docker_host(args))
    if args.json:
        print(json.dumps({"container": args.container, "removed": removed}))
    else:
        print(f"detached {', '.join(removed)} from {args.container}")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("container", metavar="CONTAINER", help=_TARGET_HELP)
    p.add_argument("address", metavar="IP", nargs="?", default=None)
    p.add_argument("--docker-host", "-H", default="", metavar="URL",
                   help="Docker daemon socket (default: DOCKER_HOST, else Docker's default)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "attach", help="give a running container a fixed address on the overlay (pipework)",
        description="Give a running container an address from this host's flannel subnet (the upper half; Docker "
                    "allocates from the lower half when flanneld runs with -docker-fixed-cidr), on a veth plugged "
                    "into the bridge holding the subnet's gateway (docker0), with a route to the whole Network. "
                    "Without IP, the lowest free address is taken. It lasts as long as the container's network "
                    "namespace, whatever flanneld does.")
    _common(p)
    p.add_argument("--subnet-file", default=DEFAULT_SUBNET_FILE, help=f"flanneld's subnet.env (default {DEFAULT_SUBNET_FILE})")
    p.add_argument("--bridge", default=None, help="bridge to plug into (default: the one holding the subnet's gateway)")
    p.set_defaults(func=_attach)

    d = subparsers.add_parser(
        "detach", help="remove an address given by flannelctl attach",
        description="Remove the interfaces flannelctl attach made in a container (only the one carrying IP, if given).")
    _common(d)
    d.set_defaults(func=_detach)
