"""The agent's wiring, top to bottom: one trio nursery, each long-running loop a task.

Start-up follows flanneld's order: config from etcd, external interface, backend device,
lease, iptables, subnet.env, data plane, READY=1, then the renewal/watch loops.  SIGTERM and
SIGINT cancel the nursery and the process exits 0, keeping the lease and (except for udp,
whose TUN goes with the process) the data plane, so a restart is seamless.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from ipaddress import IPv4Interface
from typing import Sequence

import trio

from flannelpy.backends import backend_class
from flannelpy.config.flags import ParsedFlags
from flannelpy.config.network import NetworkConfig, parse_config
from flannelpy.errors import FlannelError, UsageError, first_flannel_error
from flannelpy.etcd.select import wait_for_config
from flannelpy.etcd.store import EtcdOptions
from flannelpy.hostnet.interface import select_interface
from flannelpy.hostnet.netlink import NetlinkThread
from flannelpy.subnet.envfile import SubnetEnv, read_previous, write_subnet_env
from flannelpy.subnet.lease import Lease, LeaseEvent
from flannelpy.subnet.manager import LeaseManager

log = logging.getLogger("flanneld")


@dataclass(frozen=True)
class AgentOptions:
    etcd: EtcdOptions
    etcd_api: str
    ifaces: tuple[str, ...]
    iface_regexes: tuple[str, ...]
    iface_can_reach: str
    public_ip: str
    subnet_file: str
    renew_margin_min: int
    ip_masq: bool
    ip_masq_random_fully: bool
    healthz_ip: str
    healthz_port: int
    status_socket: str
    iptables_resync_s: int
    iptables_forward_rules: bool
    docker_daemon_json: str
    docker_restart: bool

    @classmethod
    def from_flags(cls, flags: ParsedFlags) -> "AgentOptions":
        margin = flags["subnet-lease-renew-margin"]
        if not 1 <= margin <= 1439:
            raise FlannelError(f"-subnet-lease-renew-margin={margin}: must be between 1 and 1439 minutes")
        if flags["iptables-resync"] < 1:
            raise FlannelError(f"-iptables-resync={flags['iptables-resync']}: must be at least 1 second")
        if not 0 <= flags["healthz-port"] <= 65535:
            raise FlannelError(f"-healthz-port={flags['healthz-port']}: not a TCP port")
        if flags["kube-subnet-mgr"]:
            raise FlannelError("-kube-subnet-mgr: Kubernetes mode is not supported; flannelpy runs in etcd mode")
        api = flags["etcd-api"]
        if api not in ("v3", "v2", "auto"):
            raise UsageError(f'invalid value "{api}" for flag -etcd-api: must be v3, v2 or auto')
        endpoints = tuple(e.strip() for e in flags["etcd-endpoints"].split(",") if e.strip())
        if not endpoints:
            raise UsageError("-etcd-endpoints: empty; give at least one http(s)://host:port")
        return cls(
            etcd=EtcdOptions(
                endpoints=endpoints,
                prefix=flags["etcd-prefix"],
                keyfile=flags["etcd-keyfile"],
                certfile=flags["etcd-certfile"],
                cafile=flags["etcd-cafile"],
                username=flags["etcd-username"],
                password=flags["etcd-password"],
            ),
            etcd_api=api,
            ifaces=tuple(flags["iface"]),
            iface_regexes=tuple(flags["iface-regex"]),
            iface_can_reach=flags["iface-can-reach"],
            public_ip=flags["public-ip"],
            subnet_file=flags["subnet-file"],
            renew_margin_min=margin,
            ip_masq=flags["ip-masq"],
            ip_masq_random_fully=not flags["ip-masq-fully-random-disable"],
            healthz_ip=flags["healthz-ip"],
            healthz_port=flags["healthz-port"],
            status_socket=flags["status-socket"],
            iptables_resync_s=flags["iptables-resync"],
            iptables_forward_rules=flags["iptables-forward-rules"],
            docker_daemon_json=flags["docker-daemon-json"],
            docker_restart=flags["docker-restart"],
        )


async def _stop_on_signal(cancel_scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s, shutting down (lease and data plane are kept)", signal.Signals(signum).name)
            cancel_scope.cancel()
            return


async def run_agent(opts: AgentOptions) -> None:
    """Run until a signal (returns) or a fatal error (raises FlannelError)."""
    from flannelpy.ops import sdnotify
    from flannelpy.ops.health import serve_health
    from flannelpy.ops.metrics import Metrics
    from flannelpy.ops.state import AgentState

    previous_network, previous_subnet = read_previous(opts.subnet_file)
    state = AgentState()
    metrics = Metrics()
    netlink = NetlinkThread()
    backend = None
    running = False
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
            await nursery.start(serve_health, state, metrics, opts.healthz_ip, opts.healthz_port, opts.status_socket or None)

            store, raw_config = await wait_for_config(opts.etcd, opts.etcd_api, log=log)
            store.on_watch_reconnect = metrics.watch_reconnects.inc
            config = parse_config(raw_config)
            log.info("network config: Network %s, SubnetLen %d, SubnetMin %s, SubnetMax %s, backend %s%s",
                     config.network, config.subnet_len, config.subnet_min, config.subnet_max, config.backend_type,
                     " (no Backend in config: udp, as flanneld)" if config.backend_defaulted else "")

            ext = await select_interface(netlink, list(opts.ifaces), list(opts.iface_regexes),
                                         opts.iface_can_reach, opts.public_ip)
            backend = backend_class(config.backend_type)(ext, config, netlink)
            lease_data = await backend.prepare()

            def lease_changed(new: Lease) -> None:
                if state.subnet is not None:
                    state.lease_renewed(new)

            leases = LeaseManager(store, config, ext.public_ip, lease_data, previous_subnet,
                                  opts.renew_margin_min * 60, on_change=lease_changed, on_renewal=metrics.renewal)
            leases.on_resync = metrics.watch_resyncs.inc
            lease = await leases.acquire()
            log.info("acquired lease %s (expires %s)", lease.subnet, _when(lease))
            await backend.start(lease)
            metrics.attach_backend(backend)

            if opts.ip_masq or opts.iptables_forward_rules:
                await nursery.start(_run_iptables, opts, config, lease, previous_network, previous_subnet)

            env = SubnetEnv(network=config.network, subnet=lease.subnet, mtu=backend.mtu(), ipmasq=opts.ip_masq)
            write_subnet_env(opts.subnet_file, env)
            log.info("wrote %s (FLANNEL_SUBNET=%s, FLANNEL_MTU=%d)", opts.subnet_file,
                     IPv4Interface((int(lease.subnet.network_address) + 1, lease.subnet.prefixlen)), env.mtu)
            if opts.docker_daemon_json:
                _update_docker(opts, env)

            await nursery.start(backend.run)

            async def apply_peer_events(events: Sequence[LeaseEvent]) -> None:
                started = time.monotonic()
                await backend.apply(events)
                metrics.observe_events(events, time.monotonic() - started, backend)
                state.record_events(events, backend)

            await nursery.start(leases.watch_peers, apply_peer_events)
            # The whole peer set is applied: kernel entries no lease explains are stale now.
            backend.peers_synced()
            await nursery.start(leases.keep_lease)

            state.set_lease(config, ext, lease, backend.mtu(), config.backend_type)
            state.backend = backend  # /readyz and /status ask it about its data plane
            state.ready = True
            running = True
            sdnotify.notify("READY=1", f"STATUS=leased {lease.subnet}, backend {config.backend_type}")
            log.info("running: subnet %s, backend %s", lease.subnet, config.backend_type)
    except BaseExceptionGroup as group:
        # Tasks fail inside the nursery; callers (and the exit code) want the plain error.
        fatal = first_flannel_error(group)
        if fatal is not None:
            raise fatal from None
        raise
    finally:
        sdnotify.notify("STOPPING=1")
        if backend is not None:
            with trio.CancelScope(shield=True):
                if not running:
                    await backend.abandon()
                await backend.close()
        netlink.stop()


async def _run_iptables(opts: AgentOptions, config: NetworkConfig, lease: Lease, previous_network, previous_subnet,
                        *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    from flannelpy.hostnet.iptables import IptablesManager

    manager = IptablesManager(
        config.network, lease.subnet,
        masq=opts.ip_masq, forward=opts.iptables_forward_rules, random_fully_disable=not opts.ip_masq_random_fully,
        netns=None,
        resync_s=opts.iptables_resync_s, previous_network=previous_network, previous_subnet=previous_subnet,
    )
    await manager.run(task_status=task_status)


def _update_docker(opts: AgentOptions, env: SubnetEnv) -> None:
    from flannelpy.docker import daemon_json

    bip = str(IPv4Interface((int(env.subnet.network_address) + 1, env.subnet.prefixlen)))
    change = daemon_json.update_daemon_json(opts.docker_daemon_json, bip, env.mtu)
    for conflict in daemon_json.detect_conflicts():
        log.warning("%s", conflict)
    if change.changed:
        log.info("updated %s: bip=%s mtu=%d", opts.docker_daemon_json, bip, env.mtu)
        if opts.docker_restart:
            message = daemon_json.restart_docker_if_changed(change)
            if message:
                log.warning("%s", message)


def _when(lease: Lease) -> str:
    if lease.expiration is None:
        return "never (reservation)"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(lease.expiration))
