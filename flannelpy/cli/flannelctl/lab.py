"""flannelctl lab up|down|status: the single-machine multi-host lab (see flannelpy.lab.netns_lab)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from flannelpy.lab.netns_lab import DEFAULT_PREFIX, DEFAULT_WORKDIR, Lab, LabError, default_config, print_status

BACKENDS = ("vxlan", "udp", "host-gw", "none")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lab", help="a multi-host lab on this machine (namespaces, real etcd, real flanneld)",
                       description="Hosts are network namespaces on one bridge; each runs the real flanneld.")
    p.add_argument("--prefix", default=DEFAULT_PREFIX,
                   help=f"name prefix of the lab's namespaces (default {DEFAULT_PREFIX})")
    p.add_argument("--workdir", default="", help="state, logs and subnet.env files (default /run/flannelpy-lab/PREFIX)")
    lab_sub = p.add_subparsers(dest="lab_command", metavar="up|down|status", required=True)

    up = lab_sub.add_parser("up", help="build the lab, start etcd and the agents, ping across hosts")
    up.add_argument("--hosts", type=int, default=2, help="number of hosts (default 2)")
    up.add_argument("--backend", choices=BACKENDS, default="vxlan",
                    help="backend in the network config; 'none' writes no Backend (flanneld: udp)")
    up.add_argument("--network", default="10.5.0.0/16", help="the overlay Network (default 10.5.0.0/16)")
    up.add_argument("--etcd-api", choices=("v3", "v2"), default="v3",
                    help="write the config with etcdctl put (v3) or ETCDCTL_API=2 etcdctl mk (v2)")
    up.add_argument("--etcd-prefix", default="/coreos.com/network", help="etcd prefix (e.g. /atomic.io/network)")
    up.add_argument("--docker", action="store_true",
                    help="run a real dockerd per host (bip/mtu from -docker-daemon-json) and busybox containers")
    up.add_argument("--machines", action="store_true",
                    help="booted systemd machines instead of namespaces: an etcd machine and --hosts Docker hosts "
                         "provisioned by vagrant/'s scripts (flanneld.service, docker.io); see flannelpy.lab.machines")
    up.add_argument("--json", action="store_true", help="print the lab status and ping results as JSON")
    up.set_defaults(func=_up)

    down = lab_sub.add_parser("down", help="stop the agents and etcd, delete the namespaces")
    down.set_defaults(func=_down)

    status = lab_sub.add_parser("status", help="hosts, subnets, agents; --ping to test every pair")
    status.add_argument("--ping", action="store_true", help="ping every container pair")
    status.add_argument("--json", action="store_true", help="print as JSON")
    status.set_defaults(func=_status)


def _require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab creates network namespaces: run it as root")


def _print_pings(results: dict[tuple[int, int], bool]) -> None:
    for (a, b), ok in sorted(results.items()):
        print(f"  container on host {a} -> container on host {b}: {'ok' if ok else 'FAILED'}")


def _pings_json(results: dict[tuple[int, int], bool]) -> list[dict]:
    return [{"from": a, "to": b, "ok": ok} for (a, b), ok in sorted(results.items())]


def _up(args: argparse.Namespace) -> int:
    _require_root()
    if args.machines:
        return _up_machines(args)
    if args.docker:
        from flannelpy.lab.docker_lab import DockerLab

        lab: Lab = DockerLab(prefix=args.prefix, hosts=args.hosts, backend=args.backend, etcd_api=args.etcd_api,
                             etcd_prefix=args.etcd_prefix, workdir=args.workdir,
                             config=default_config(args.backend, args.network))
    else:
        lab = Lab(prefix=args.prefix, hosts=args.hosts, backend=args.backend, etcd_api=args.etcd_api,
                  etcd_prefix=args.etcd_prefix, workdir=args.workdir,
                  config=default_config(args.backend, args.network))
    if not args.json:
        print(f"starting lab {args.prefix}: etcd + {args.hosts} hosts, backend {args.backend} ...", flush=True)
    lab.up()
    results = lab.wait_all_pings()
    ok = all(results.values())
    if args.json:
        json.dump({**lab.status(), "pings": _pings_json(results)}, sys.stdout, indent=2)
        print()
    else:
        print_status(lab)
        print("cross-host pings:")
        _print_pings(results)
        print(f"{'all pings answered' if ok else 'SOME PINGS FAILED'}; "
              f"`flannelctl lab status --ping` to re-test, `flannelctl lab down` to remove the lab")
    return 0 if ok else 1


def _up_machines(args: argparse.Namespace) -> int:
    from flannelpy.lab.machines import MachineLab, print_status as print_machines

    if args.docker or args.backend != "vxlan" or args.etcd_api != "v3" or args.etcd_prefix != "/coreos.com/network" \
            or args.network != "10.5.0.0/16":
        raise LabError("--machines runs vagrant/'s provisioning unchanged (vxlan, /atomic.io/network, written with "
                       "ETCDCTL_API=2 etcdctl mk; Docker on every host): it takes only --hosts and --json")
    lab = MachineLab(prefix=args.prefix, hosts=args.hosts, workdir=args.workdir)
    if not args.json:
        print(f"starting lab {args.prefix}: an etcd machine + {args.hosts} Docker host machines (systemd-nspawn) ...",
              flush=True)
    lab.up()
    results = lab.wait_all_pings()
    ok = all(results.values())
    pings = [{"from": a, "to": b, "ok": v} for (a, b), v in sorted(results.items())]
    if args.json:
        json.dump({**lab.status(), "pings": pings}, sys.stdout, indent=2)
        print()
    else:
        print_machines(lab)
        print("cross-host pings (container fping on each host):")
        for p in pings:
            print(f"  {p['from']} -> {p['to']}: {'ok' if p['ok'] else 'FAILED'}")
        print(f"{'all pings answered' if ok else 'SOME PINGS FAILED'}; `flannelctl lab status --ping` to re-test, "
              f"`flannelctl lab down` to power the machines off and remove the lab")
    return 0 if ok else 1


def _load(args: argparse.Namespace) -> Lab:
    from flannelpy.lab.machines import MachineLab

    if MachineLab.exists(args.prefix, args.workdir):
        return MachineLab.load(args.prefix, args.workdir)  # type: ignore[return-value]  # same verbs
    # Decide before loading: Lab(**doc) would reject a DockerLab's extra fields in lab.json.
    workdir = args.workdir or os.path.join(DEFAULT_WORKDIR, args.prefix)
    if os.path.exists(os.path.join(workdir, "docker")):
        from flannelpy.lab.docker_lab import DockerLab

        return DockerLab.load(args.prefix, args.workdir)
    return Lab.load(args.prefix, args.workdir)


def _down(args: argparse.Namespace) -> int:
    _require_root()
    lab = _load(args)
    removed = lab.down()
    print(f"lab {args.prefix} removed ({len(removed)} namespaces)")
    return 0


def _status(args: argparse.Namespace) -> int:
    lab = _load(args)
    results = lab.ping_matrix() if args.ping else {}
    if args.json:
        doc = lab.status()
        if args.ping:
            doc["pings"] = _pings_json(results)
        json.dump(doc, sys.stdout, indent=2)
        print()
    else:
        if isinstance(lab, Lab):
            print_status(lab)
        else:
            from flannelpy.lab.machines import print_status as print_machines

            print_machines(lab)
        if args.ping:
            _print_pings(results)
    return 0 if all(results.values()) else 1
