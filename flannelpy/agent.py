"""The agent's wiring, top to bottom: one trio nursery, each long-running loop a task.

Start-up follows flanneld's order: config from etcd, external interface, backend device,
lease, iptables (the tables read before the lease; the rules put in place beside the backend's
start on it), subnet.env, data plane, READY=1, then the renewal/watch loops.  SIGTERM and
SIGINT cancel the nursery and the process exits 0, keeping the lease and (except for udp,
whose TUN goes with the process) the data plane, so a restart is seamless.

Whatever can be checked is checked before the lease is taken (the files to write, the tools,
the status socket, whether the backend can work with this interface), so a refused start leaves
nothing in etcd.  When a step after the lease still fails, what this run made is undone (the
lease if this run created it, subnet.env, daemon.json, the device) before the one-line error.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import time
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network
from typing import TYPE_CHECKING, Awaitable, Callable, NamedTuple, Sequence

import trio

from flannelpy.backends import backend_class
from flannelpy.config.flags import ParsedFlags
from flannelpy.config.network import NetworkConfig, parse_config
from flannelpy.errors import FlannelError, UsageError, first_flannel_error
from flannelpy.etcd.select import config_key, wait_for_config
from flannelpy.etcd.store import EtcdOptions
from flannelpy.fileutil import atomic_write
from flannelpy.hostnet.interface import ExternalInterface, select_interface
from flannelpy.hostnet.netlink import NetlinkThread
from flannelpy.subnet.envfile import (
    SubnetEnv,
    check_subnet_file,
    read_previous_env,
    subnet_env_matches,
    write_subnet_env,
)
from flannelpy.subnet.lease import Lease, LeaseEvent
from flannelpy.subnet.manager import LeaseManager

if TYPE_CHECKING:
    from flannelpy.hostnet.iptables import TablesBeforeLease

log = logging.getLogger("flanneld")

IPNetwork = IPv4Network | IPv6Network

SUBNET_ENV_CHECK_S = 2.0  # how often a removed or altered subnet.env is noticed and rewritten
UNDO_STEP_TIMEOUT_S = 5.0  # one undo step (e.g. deleting the lease while etcd is away) gives up after this
# After READY, the start's burst is over: the backends' first kernel check with the whole peer set,
# which peers_synced() wakes, begins 0.05 s later and takes under half a second for 5000 peers.
START_SETTLE_S = 2.0


class AgentOptions(NamedTuple):
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
    docker_fixed_cidr: bool
    udp_forwarder: str = "auto"  # -udp-forwarder: the udp backend's data plane (auto, bpf, python)
    public_ipv6: str = ""  # -public-ipv6 (EnableIPv6): the IPv6 address peers reach this host at
    # -status-socket was not given: if another flanneld on this machine serves the default path,
    # run without it (flanneld has no such socket, so a second instance must not fail over it)
    status_socket_optional: bool = False

    @classmethod
    def from_flags(cls, flags: ParsedFlags) -> "AgentOptions":
        margin = flags["subnet-lease-renew-margin"]
        if not 1 <= margin <= 1439:
            raise FlannelError(f"-subnet-lease-renew-margin={margin}: must be between 1 and 1439 minutes")
        if flags["iptables-resync"] < 1:
            raise FlannelError(f"-iptables-resync={flags['iptables-resync']}: must be at least 1 second")
        if not 0 <= flags["healthz-port"] <= 65535:
            raise FlannelError(f"-healthz-port={flags['healthz-port']}: not a TCP port")
        if flags["docker-fixed-cidr"] and not flags["docker-daemon-json"]:
            raise UsageError("-docker-fixed-cidr: only with -docker-daemon-json (it sets fixed-cidr there)")
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
                transport=flags["etcd-transport"],
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
            docker_fixed_cidr=flags["docker-fixed-cidr"],
            udp_forwarder=flags["udp-forwarder"],
            public_ipv6=flags["public-ipv6"],
            status_socket_optional="status-socket" not in flags.given,
        )


async def _stop_on_signal(cancel_scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s, shutting down (lease and data plane are kept)", signal.Signals(signum).name)
            cancel_scope.cancel()
            return


def check_before_lease(opts: AgentOptions, config: NetworkConfig | None = None) -> None:
    """Everything about the local files and tools that a start needs, checked before etcd is
    touched: a refused start must not leave a lease behind (FlannelError names what is wrong).
    With the config (read from etcd, before the lease): what EnableIPv6 needs too (ip6tables, unless
    EnableNFTables puts the IPv6 rules in nftables table flannel-ipv6)."""
    if config is not None:
        if config.enable_ipv6 and (opts.ip_masq or opts.iptables_forward_rules) and not config.enable_nftables:
            from flannelpy.hostnet.iptables import check_tools as check_iptables

            check_iptables(ipv6=True)
        return
    if opts.docker_daemon_json:
        from flannelpy.docker import daemon_json

        try:
            daemon_json.check_daemon_json(opts.docker_daemon_json)
        except FlannelError as err:
            raise FlannelError(f"-docker-daemon-json={err}") from None
    check_subnet_file(opts.subnet_file)
    if opts.ip_masq or opts.iptables_forward_rules:
        from flannelpy.hostnet.iptables import check_tools

        check_tools()


def backend_refusal(backend_type: str, ext: ExternalInterface) -> str | None:
    """Why the backend cannot run with this external interface, or None; decided before the
    lease (flanneld's hostgw.New refuses at the same point, before RegisterNetwork)."""
    if backend_type == "host-gw" and ext.public_ip != ext.ip:
        return (f"host-gw backend: public IP {ext.public_ip} differs from interface {ext.name} "
                f"address {ext.ip}; host-gw cannot work through NAT (peers route to the public IP directly)")
    if backend_type == "host-gw" and ext.public_ipv6 != ext.ip6:
        return (f"host-gw backend: public IPv6 {ext.public_ipv6} differs from interface {ext.name} "
                f"address {ext.ip6}; host-gw cannot work through NAT (peers route to the public IPv6 directly)")
    return None


class StartupUndo:
    """What this start-up made, undone in reverse order if start-up fails before running."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], Awaitable[object]]]] = []

    def push(self, what: str, step: Callable[[], Awaitable[object]]) -> None:
        self._steps.append((what, step))

    def clear(self) -> None:
        self._steps.clear()

    async def run(self) -> None:
        """Best effort: a step that fails or hangs is logged and the next one still runs."""
        while self._steps:
            what, step = self._steps.pop()
            try:
                with trio.move_on_after(UNDO_STEP_TIMEOUT_S) as scope:
                    await step()
                if scope.cancelled_caught:
                    log.warning("start-up failed; could not %s within %gs", what, UNDO_STEP_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - undo must go on whatever one step raises
                log.warning("start-up failed; could not %s: %s", what, exc)


# A start-up slower than this (no config yet, etcd unreachable) serves health before subnet.env.
HEALTH_SERVE_AFTER_S = 1.0


async def _set_after(event: trio.Event, seconds: float) -> None:
    await trio.sleep(seconds)
    event.set()


async def run_agent(opts: AgentOptions) -> None:
    """Run until a signal (returns) or a fatal error (raises FlannelError)."""
    from flannelpy.ops import sdnotify
    from flannelpy.ops.health import serve_health
    from flannelpy.ops.metrics import Metrics
    from flannelpy.ops.state import AgentState

    previous = read_previous_env(opts.subnet_file)
    previous_network, previous_subnet = previous.network, previous.subnet
    check_before_lease(opts)
    state = AgentState()
    metrics = Metrics()
    netlink = NetlinkThread()
    backend = None
    running = False
    failed = True  # until the nursery ends without an error (a signal ends it cleanly)
    undo = StartupUndo()
    # The health server's sockets listen from the start; hypercorn is loaded once subnet.env is
    # written, off the start-up path (ops/health.py).
    serve_now = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
            await nursery.start(functools.partial(
                serve_health, state, metrics, opts.healthz_ip, opts.healthz_port, opts.status_socket or None,
                unix_socket_optional=opts.status_socket_optional, after=serve_now))
            # ...or after a moment, so /healthz answers (and /readyz says 503) while the agent waits
            # for its config or for etcd, as flanneld's health server does.
            nursery.start_soon(_set_after, serve_now, HEALTH_SERVE_AFTER_S)

            # systemd clears a unit's status line at each start; say what this attempt waits for (a missing
            # config or an unreachable etcd is retried, so the start can last until TimeoutStartSec).
            key = config_key(opts.etcd).replace("\n", " ")  # STATUS= is one line
            sdnotify.notify(f"STATUS=reading the network config at {key} (retrying while etcd or the key is missing)")
            store, raw_config = await wait_for_config(opts.etcd, opts.etcd_api, log=log)
            store.on_watch_reconnect = metrics.watch_reconnects.inc
            config = parse_config(raw_config)
            store.dual_stack = config.enable_ipv6  # dual-stack lease keys are read from here on
            log.info("network config: Network %s, SubnetLen %d, SubnetMin %s, SubnetMax %s, backend %s%s",
                     config.network, config.subnet_len, config.subnet_min, config.subnet_max, config.backend_type,
                     " (no Backend in config: udp, as flanneld)" if config.backend_defaulted else "")
            if config.enable_ipv6:
                log.info("network config: EnableIPv6, IPv6Network %s, IPv6SubnetLen %d, IPv6SubnetMin %s, "
                         "IPv6SubnetMax %s", config.ipv6_network, config.ipv6_subnet_len, config.ipv6_subnet_min,
                         config.ipv6_subnet_max)
            check_before_lease(opts, config)
            if config.enable_nftables and (opts.ip_masq or opts.iptables_forward_rules):
                from flannelpy.hostnet.nftables import check_tools as check_nft

                check_nft()  # before the lease: a refused start leaves nothing in etcd
            tables_before = None
            if not config.enable_nftables and (opts.ip_masq or opts.iptables_forward_rules):
                # Read while the interface, backend and lease are set up: a restart whose rules
                # are all in place then has nothing left to run between its lease and subnet.env.
                from flannelpy.hostnet.iptables import TablesBeforeLease

                tables_before = TablesBeforeLease()
                nursery.start_soon(tables_before.read)

            ext = await select_interface(netlink, list(opts.ifaces), list(opts.iface_regexes),
                                         opts.iface_can_reach, opts.public_ip,
                                         public_ipv6=opts.public_ipv6, ipv6=config.enable_ipv6)
            refusal = backend_refusal(config.backend_type, ext)
            if refusal is not None:
                raise FlannelError(refusal)
            backend = backend_class(config.backend_type)(ext, config, netlink)
            backend.use_agent_flags(udp_forwarder=opts.udp_forwarder)
            lease_data = await backend.prepare()

            def lease_changed(new: Lease) -> None:
                if state.subnet is not None:
                    state.lease_renewed(new)

            # Lease admission: the host's own networks, which no peer lease may claim (read once).
            from flannelpy.hostnet.underlay import read_host_underlay
            from flannelpy.subnet.admission import underlay_warnings
            underlay = await read_host_underlay(netlink)
            for warning in underlay_warnings(config.network, underlay, ext.name, ext.public_ip):
                log.warning("%s", warning)
            leases = LeaseManager(store, config, ext.public_ip, lease_data, previous_subnet,
                                  opts.renew_margin_min * 60, on_change=lease_changed, on_renewal=metrics.renewal,
                                  underlay=underlay, on_admission=state.record_admission,
                                  public_ipv6=ext.public_ipv6, previous_ipv6_subnet=previous.ipv6_subnet)
            leases.on_resync = metrics.watch_resyncs.inc
            state.accepted_count = leases.accepted_count  # /status and the metrics count its peers
            lease = await leases.acquire()
            undo.push(f"delete lease {lease.subnet}", leases.release)
            log.info("acquired lease %s (expires %s)", lease.subnet, _when(lease))

            async def put_rules_in_place() -> None:
                # Started beside the backend's start (they share nothing; the tools are processes
                # to wait for), and done before subnet.env: subnet.env and READY=1 mean the rules
                # are in place.  Each family's rules task then keeps them, in this nursery.
                if opts.ip_masq or opts.iptables_forward_rules:
                    await nursery.start(_run_rules, opts, config, config.network, lease.subnet,
                                        previous_network, previous_subnet, tables_before)
                    if lease.ipv6_subnet is not None and config.ipv6_network is not None:
                        await nursery.start(_run_rules, opts, config, config.ipv6_network, lease.ipv6_subnet,
                                            previous.ipv6_network, previous.ipv6_subnet)
                if lease.ipv6_subnet is None and previous.ipv6_network is not None and previous.ipv6_subnet is not None:
                    # EnableIPv6 was on in the run that wrote subnet.env and is off now: its IPv6 rules must go
                    await _drop_previous_ipv6_rules(previous.ipv6_network, previous.ipv6_subnet)

            async with trio.open_nursery() as beside:
                beside.start_soon(put_rules_in_place)
                await backend.start(lease)
            metrics.attach_backend(backend)

            env = SubnetEnv(network=config.network, subnet=lease.subnet, mtu=backend.mtu(), ipmasq=opts.ip_masq,
                            ipv6_network=config.ipv6_network if lease.ipv6_subnet is not None else None,
                            ipv6_subnet=lease.ipv6_subnet)
            _write_subnet_env(opts.subnet_file, env, undo)
            log.info("wrote %s (FLANNEL_SUBNET=%s%s, FLANNEL_MTU=%d)", opts.subnet_file,
                     IPv4Interface((int(lease.subnet.network_address) + 1, lease.subnet.prefixlen)),
                     "" if lease.ipv6_subnet is None else ", FLANNEL_IPV6_SUBNET=" + str(
                         IPv6Interface((int(lease.ipv6_subnet.network_address) + 1, lease.ipv6_subnet.prefixlen))),
                     env.mtu)
            if opts.docker_daemon_json:
                _update_docker(opts, env, undo)
            serve_now.set()

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
            nursery.start_soon(keep_subnet_env, opts.subnet_file, env)

            state.set_lease(config, ext, lease, backend.mtu(), config.backend_type)
            state.backend = backend  # /readyz and /status ask it about its data plane
            state.ready = True
            running = True
            undo.clear()
            sdnotify.notify("READY=1", f"STATUS=leased {lease.subnet}, backend {config.backend_type}")
            log.info("running: subnet %s, backend %s", lease.subnet, config.backend_type)
            nursery.start_soon(_release_start_memory)
        failed = False
    except BaseExceptionGroup as group:
        # Tasks fail inside the nursery; callers (and the exit code) want the plain error.
        fatal = first_flannel_error(group)
        if fatal is not None:
            raise fatal from None
        raise
    finally:
        sdnotify.notify("STOPPING=1")
        with trio.CancelScope(shield=True):
            # Only a failure undoes; a signal during start-up keeps what is made, as after start-up.
            if failed and not running:
                await undo.run()
            if backend is not None:
                if failed and not running:
                    await backend.abandon()
                await backend.close()
        netlink.stop()


def _write_subnet_env(path: str, env: SubnetEnv, undo: StartupUndo) -> None:
    try:
        with open(path, "rb") as fh:
            previous: bytes | None = fh.read()
    except OSError:
        previous = None
    write_subnet_env(path, env)

    async def put_back() -> None:
        if previous is None:
            os.unlink(path)
        else:
            atomic_write(path, previous, mode=0o644)

    undo.push(f"{'restore' if previous is not None else 'remove'} {path}", put_back)


async def keep_subnet_env(path: str, env: SubnetEnv, period: float = SUBNET_ENV_CHECK_S) -> None:
    """Rewrite subnet.env (same bytes, atomically) whenever it is removed or altered: Docker units
    and mk-docker-opts.sh read it at their own start, possibly long after ours."""
    failing = False
    while True:
        await trio.sleep(period)
        if subnet_env_matches(path, env):
            failing = False
            continue
        try:
            write_subnet_env(path, env)
        except FlannelError as err:
            if not failing:  # once per outage, not every period
                log.error("%s; retrying every %gs", err, period)
            failing = True
            continue
        failing = False
        log.warning("%s was removed or altered; rewrote it", path)


async def _run_rules(opts: AgentOptions, config: NetworkConfig, network: IPNetwork, subnet: IPNetwork,
                     previous_network: IPNetwork | None, previous_subnet: IPNetwork | None,
                     before: TablesBeforeLease | None = None,
                     *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """The masquerade and forward rules of one family: Network and our subnet, or (EnableIPv6)
    IPv6Network and our IPv6 subnet.  iptables (ip6tables) by default, nftables table flannel-ipv4
    (flannel-ipv6) with EnableNFTables.  Each mode removes what the other left for this family (as
    flanneld does at start-up), after its own rules are in place, so the host is never without either.
    `before`: the IPv4 tables as read before the lease (iptables mode)."""
    if config.enable_nftables:
        from flannelpy.hostnet.nftables import NftablesManager

        nft = NftablesManager(
            network, subnet,
            masq=opts.ip_masq, forward=opts.iptables_forward_rules, random_fully_disable=not opts.ip_masq_random_fully,
            resync_s=opts.iptables_resync_s, previous_network=previous_network,
        )
        await nft.run(task_status=task_status)
        return

    from flannelpy.hostnet.iptables import IptablesManager, remove_listed_flannel_tables
    from flannelpy.hostnet.tools import list_nft_tables, run_together

    manager = IptablesManager(
        network, subnet,
        masq=opts.ip_masq, forward=opts.iptables_forward_rules, random_fully_disable=not opts.ip_masq_random_fully,
        netns=None,
        resync_s=opts.iptables_resync_s, previous_network=previous_network, previous_subnet=previous_subnet,
    )

    async def nft_tables_listed() -> str | None | FlannelError:
        if before is not None:
            await before.wait()
            if before.error is None:
                return before.nft_tables
        try:
            return await list_nft_tables()
        except FlannelError as err:
            return err

    async with trio.open_nursery() as rules:
        # nftables' tables are listed while the rules are put in place (a process each), and
        # removed, if any of ours is there, only once the iptables rules are.
        _started, listed = await run_together(lambda: rules.start(manager.run, before), nft_tables_listed)
        try:
            if isinstance(listed, FlannelError):
                raise listed
            await remove_listed_flannel_tables(network, subnet, listed, previous_network)
        except FlannelError as err:
            log.error("could not remove flannel's nftables tables (EnableNFTables is off): %s", err)
        task_status.started()


async def _drop_previous_ipv6_rules(network6: IPNetwork, subnet6: IPNetwork) -> None:
    """Remove the masquerade/forward rules a dual-stack run left for IPv6Network and its IPv6 subnet (ip6tables
    chains and nftables table flannel-ipv6; other instances' rules stay).  A failure is logged, not fatal: the
    IPv4 network runs whatever IPv6 rules are left."""
    from flannelpy.hostnet.nftables import NftablesManager, remove_flannel_tables

    why = f"EnableIPv6 is off (the previous run had IPv6 subnet {subnet6})"
    try:
        await NftablesManager(network6, subnet6, masq=True, forward=True).remove_iptables_chains(why)
        await remove_flannel_tables(network6, subnet6)
    except FlannelError as err:
        log.error("%s: could not remove its IPv6 rules: %s", why, err)


def _update_docker(opts: AgentOptions, env: SubnetEnv, undo: StartupUndo) -> None:
    from flannelpy.docker import daemon_json

    bip = str(IPv4Interface((int(env.subnet.network_address) + 1, env.subnet.prefixlen)))
    fixed_cidr = daemon_json.fixed_cidr_for(bip) if opts.docker_fixed_cidr else None
    try:
        change = daemon_json.update_daemon_json(
            opts.docker_daemon_json, bip, env.mtu, fixed_cidr=fixed_cidr,
            # flanneld masquerades: Docker's own rule, first in POSTROUTING, would NAT overlay traffic too
            ip_masq=False if opts.ip_masq else None,
            fixed_cidr_v6=daemon_json.fixed_cidr_v6_for(env.ipv6_subnet) if env.ipv6_subnet is not None else None)
    except FlannelError as err:
        raise FlannelError(f"-docker-daemon-json={err}") from None
    if change.written:
        async def put_back() -> None:
            daemon_json.restore_daemon_json(change)

        undo.push(f"restore {opts.docker_daemon_json}", put_back)
    for conflict in daemon_json.detect_conflicts():
        log.warning("%s", conflict)
    if change.warning:
        log.warning("%s: %s", opts.docker_daemon_json, change.warning)
    if change.changed:
        log.info("updated %s: %s", opts.docker_daemon_json, change.describe())
        if opts.docker_restart:
            message = daemon_json.restart_docker_if_changed(change)
            if message:
                log.warning("%s", message)


async def _release_start_memory() -> None:
    """Once, after the start: give back the C heap's pages the start freed (ops/heap.py)."""
    from flannelpy.ops.heap import release_free_memory

    await trio.sleep(START_SETTLE_S)
    release_free_memory()


def _when(lease: Lease) -> str:
    if lease.expiration is None:
        return "never (reservation)"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(lease.expiration))
