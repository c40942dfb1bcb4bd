"""flannelctl lab up|down|status: the single-machine multi-host lab (see flannelpy.lab.netns_lab)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from flannelpy.lab.netns_lab import (
    DEFAULT_IPV6_NETWORK,
    DEFAULT_PREFIX,
    DEFAULT_WORKDIR,
    Lab,
    LabError,
    default_config,
    lab_command,
    ping_lines,
    print_status,
)
from flannelpy.lab.pki import TLS_MODES

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
    up.add_argument("--ipv6", action="store_true",
                    help="dual stack: IPv6 on the underlay (fd99::/64), EnableIPv6 with IPv6Network "
                         f"{DEFAULT_IPV6_NETWORK} in the config, an IPv6 address in each container, IPv6 pings too "
                         "(namespace or --docker lab; vxlan or host-gw)")
    up.add_argument("--etcd-tls", choices=TLS_MODES, default="",
                    help="etcd over https with client certificates (made with openssl in WORKDIR/pki): 'both' gives "
                         "etcd a server certificate with serverAuth,clientAuth (the agents use its JSON gateway), "
                         "'server-only' one with serverAuth only, the classic guide's cluster (the gateway cannot "
                         "serve; the agents' -etcd-transport auto uses gRPC)")
    up.add_argument("--json", action="store_true", help="print the lab status and ping results as JSON")
    up.set_defaults(func=_up)

    down = lab_sub.add_parser("down", help="stop the agents and etcd, delete the namespaces",
                              description="Removes the lab named in <workdir>/lab.json, and also whatever an "
                                          "interrupted `lab up` left without one: the namespaces named "
                                          "PREFIX-ul/-hN/-cN and every process inside them.")
    down.set_defaults(func=_down)

    status = lab_sub.add_parser("status", help="hosts, subnets, agents; --ping to test every pair")
    status.add_argument("--ping", action="store_true", help="ping every container pair")
    status.add_argument("--json", action="store_true", help="print as JSON")
    status.set_defaults(func=_status)


def _require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab creates network namespaces: run it as root")


def _pings_json(results: dict[tuple[int, int], bool], family: str = "") -> list[dict]:
    extra = {"family": family} if family else {}
    return [{"from": a, "to": b, "ok": ok, **extra} for (a, b), ok in sorted(results.items())]


def _pings6(lab: Lab) -> tuple[dict[tuple[int, int], bool], dict]:
    """A dual-stack lab's IPv6 pings and what each tried ({} without --ipv6)."""
    if not getattr(lab, "ipv6", False):
        return {}, {}
    results = lab.wait_all_pings(ipv6=True)
    return results, dict(lab.last_pings)


def _up(args: argparse.Namespace) -> int:
    _require_root()
    if args.ipv6 and args.machines:
        raise LabError("--ipv6: only the namespace and Docker labs run dual stack (not --machines)")
    if args.ipv6 and args.backend not in ("vxlan", "host-gw"):
        raise LabError(f"--ipv6 with --backend {args.backend}: dual stack runs on vxlan or host-gw "
                       "(flanneld's udp backend has no IPv6 data plane either)")
    if args.etcd_tls and args.machines:
        raise LabError("--etcd-tls: only the namespace and Docker labs run a TLS etcd (not --machines, whose "
                       "provisioning is vagrant/'s, unchanged)")
    if args.machines:
        return _up_machines(args)
    if args.docker:
        from flannelpy.lab.docker_lab import DockerLab

        lab: Lab = DockerLab(prefix=args.prefix, hosts=args.hosts, backend=args.backend, etcd_api=args.etcd_api,
                             etcd_prefix=args.etcd_prefix, workdir=args.workdir, ipv6=args.ipv6,
                             etcd_tls=args.etcd_tls,
                             config=default_config(args.backend, args.network,
                                                   ipv6_network=DEFAULT_IPV6_NETWORK if args.ipv6 else ""))
    else:
        lab = Lab(prefix=args.prefix, hosts=args.hosts, backend=args.backend, etcd_api=args.etcd_api,
                  etcd_prefix=args.etcd_prefix, workdir=args.workdir, ipv6=args.ipv6, etcd_tls=args.etcd_tls,
                  config=default_config(args.backend, args.network,
                                        ipv6_network=DEFAULT_IPV6_NETWORK if args.ipv6 else ""))
    lab.forward_etcd = True  # etcd on 127.0.0.1 of this namespace, where a user tries first
    if not args.json:
        print(f"starting lab {args.prefix}: etcd + {args.hosts} hosts, backend {lab.backend_shown()} ...", flush=True)
    from flannelpy.cli.flannelctl import interrupt_exit_code, interrupt_name

    try:
        lab.up()
    except KeyboardInterrupt:
        # Lab.up removed what it had made, unless a second signal cut that short: then say how to finish.
        from flannelpy.lab.leftovers import find_leftovers

        left = "" if find_leftovers(args.prefix).empty() and not os.path.exists(lab.state_file) else \
            f"; not all of it could be removed: run `{lab_command(args.prefix, args.workdir, 'down')}`"
        print(f"flannelctl: lab up interrupted ({interrupt_name()}); what it had made is removed{left}",
              file=sys.stderr)
        return interrupt_exit_code()
    try:
        results = lab.wait_all_pings()
        tried = dict(getattr(lab, "last_pings", {}))
        results6, tried6 = _pings6(lab)
    except KeyboardInterrupt:
        print(f"flannelctl: interrupted ({interrupt_name()}) while pinging; the lab is up: "
              f"`{lab_command(args.prefix, args.workdir, 'status --ping')}` to test it, "
              f"`{lab_command(args.prefix, args.workdir, 'down')}` to remove it", file=sys.stderr)
        return interrupt_exit_code()
    ok = all(results.values()) and all(results6.values())
    if args.json:
        json.dump({**lab.status(), "pings": _pings_json(results) + _pings_json(results6, "ipv6")}, sys.stdout,
                  indent=2)
        print()
    else:
        print_status(lab)
        for line in ping_lines(results, tried, len(lab.host_list)):
            print(line)
        if results6:
            for line in ping_lines(results6, tried6, len(lab.host_list), "IPv6"):
                print(line)
        verdict = "no pairs to ping" if not results else "all pings answered" if ok else "SOME PINGS FAILED"
        print(f"{verdict}; `{lab_command(args.prefix, args.workdir, 'status --ping')}` to re-test, "
              f"`{lab_command(args.prefix, args.workdir, 'down')}` to remove the lab")
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


def _state_kind(args: argparse.Namespace) -> str:
    from flannelpy.lab.machines import DEFAULT_WORKDIR as MACHINES_WORKDIR

    path = os.path.join(args.workdir or os.path.join(MACHINES_WORKDIR, args.prefix), "lab.json")
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return ""
    return str(doc.get("kind", "")) if isinstance(doc, dict) else ""


def _load(args: argparse.Namespace) -> Lab:
    from flannelpy.lab.machines import MachineLab

    # With --workdir both kinds keep their lab.json at the same path: only a machines lab's says "kind".
    if MachineLab.exists(args.prefix, args.workdir) and _state_kind(args) == "machines":
        return MachineLab.load(args.prefix, args.workdir)  # type: ignore[return-value]  # same verbs
    # Decide before loading: Lab(**doc) would reject a DockerLab's extra fields in lab.json.
    workdir = args.workdir or os.path.join(DEFAULT_WORKDIR, args.prefix)
    if os.path.exists(os.path.join(workdir, "docker")):
        from flannelpy.lab.docker_lab import DockerLab

        return DockerLab.load(args.prefix, args.workdir)
    return Lab.load(args.prefix, args.workdir)


def _down(args: argparse.Namespace) -> int:
    _require_root()
    try:
        lab = _load(args)
    except LabError as no_state:
        # No (readable) lab.json: an interrupted `lab up`, or a crash.  Remove the lab by its names.
        from flannelpy.lab.leftovers import remove_leftovers

        workdir = args.workdir or os.path.join(DEFAULT_WORKDIR, args.prefix)
        left = remove_leftovers(args.prefix, workdir)
        if left.empty():
            raise LabError(f"{no_state}; no namespace {args.prefix}-ul/-hN/-cN is left either") from None
        print(f"lab {args.prefix}: no state file; removed what was left: {left.describe()}")
        return 0
    removed = lab.down()
    print(f"lab {args.prefix} removed ({len(removed)} namespaces)")
    return 0


def _status(args: argparse.Namespace) -> int:
    lab = _load(args)
    results = lab.ping_matrix() if args.ping else {}
    tried = dict(getattr(lab, "last_pings", {}))
    results6, tried6 = _pings6(lab) if args.ping else ({}, {})
    if args.json:
        doc = lab.status()
        if args.ping:
            doc["pings"] = _pings_json(results) + _pings_json(results6, "ipv6")
        json.dump(doc, sys.stdout, indent=2)
        print()
    else:
        if isinstance(lab, Lab):
            print_status(lab)
            if args.ping:
                for line in ping_lines(results, tried, len(lab.host_list)):
                    print(line)
                if results6:
                    for line in ping_lines(results6, tried6, len(lab.host_list), "IPv6"):
                        print(line)
        else:
            from flannelpy.lab.machines import print_status as print_machines

            print_machines(lab)
            if args.ping:
                for (a, b), ok in sorted(results.items()):
                    print(f"  container on host {a} -> container on host {b}: {'ok' if ok else 'FAILED'}")
    return 0 if all(results.values()) and all(results6.values()) else 1
