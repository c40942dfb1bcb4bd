"""Applying flanneld's iptables rules: one iptables-restore batch, a resync loop, old-rule cleanup.

Rules are decided in flannelpy.hostnet.iptables_rules; this module only runs iptables-save/-restore.
Like flanneld, rules are kept when the agent exits.  One manager per family: given IPv6Network and
our IPv6 subnet (EnableIPv6) it runs ip6tables-save/-restore instead, under the same host-wide lock.
"""

from __future__ import annotations

import logging
import shutil
from ipaddress import IPv4Network, IPv6Network

import trio

from flannelpy.errors import FlannelError
from flannelpy.hostnet.rulelock import IPTABLES as RULES_LOCK
from flannelpy.hostnet.rulelock import host_lock
from flannelpy.hostnet.nft_tables import listed_tables, tables_to_switch_off
from flannelpy.hostnet.tools import list_nft_tables, netns_prefix, run_together, run_tool, save_nat_and_filter

from . import iptables_rules as R

log = logging.getLogger(__name__)

MISSING_MSG = "Some iptables rules are missing; deleting and recreating rules"
# A read of the tables older than this when the lease arrives (etcd was slow) is not trusted: the
# start reads them again under the lock.  A restart's lease comes within tens of milliseconds.
BEFORE_LEASE_MAX_AGE_S = 2.0


def check_tools(ipv6: bool = False) -> None:
    """The commands the rules need are installed (ipv6: ip6tables' too); the agent calls this
    before taking a lease."""
    tools = ["iptables", "iptables-save", "iptables-restore"]
    if ipv6:
        tools += ["ip6tables", "ip6tables-save", "ip6tables-restore"]
    for tool in tools:
        if shutil.which(tool) is None:
            raise FlannelError(
                f"{tool} not found in PATH; install iptables, or run with "
                "--ip-masq=false --iptables-forward-rules=false"
            )


class TablesBeforeLease:
    """The firewall as a start reads it before its lease (a subnet is needed to know the rules,
    not to read the tables): every table with one `iptables-save`, whose header line also names
    the iptables version, and `nft list tables`, read at once while the interface, the backend and
    the lease are being set up.  Two processes, not four: each one started while the agent sets up
    the interface and the device cost that path ~2 ms on a 2-core machine.

    The read takes no lock: a start that finds everything in place and in order from it writes
    nothing (as a read under the lock that wrote nothing would); anything to change is read
    again under the lock, and so is everything when the read is older than
    BEFORE_LEASE_MAX_AGE_S by then."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns  # tests: /var/run/netns/<netns>; None: ours
        self._done = trio.Event()
        self.version: str | None = None
        self.saved: R.SavedTables | None = None
        self.nft_tables: str | None = None  # None: nft absent
        self.error: FlannelError | None = None
        self.read_at: float | None = None  # trio.current_time() when the read completed

    async def read(self) -> None:
        """Read everything at once; a failure is kept (the start's own path then reports it)."""
        netns = self.netns
        prefix = netns_prefix(netns)
        try:
            saved, self.nft_tables = await run_together(
                lambda: run_tool(prefix, ["iptables-save"], package="iptables"),
                lambda: list_nft_tables(netns))
            # Without a header (no table loaded yet) the version is asked for, as before.
            self.version = R.save_header_version(saved) or await run_tool(
                prefix, ["iptables", "--version"], package="iptables")
            self.saved = R.parse_save(saved)
            self.read_at = trio.current_time()
        except (FlannelError, ValueError) as err:
            self.error = err if isinstance(err, FlannelError) else FlannelError(f"iptables-save: {err}")
        finally:
            self._done.set()

    async def wait(self) -> None:
        await self._done.wait()


class IptablesManager:
    """Keeps flanneld's masq (nat FLANNEL-POSTRTG) and forward (filter FLANNEL-FWD) rules in place.

    `netns` runs every command inside /var/run/netns/<netns> (tests); None = the current namespace.
    IPv6Network and subnet: the same rules for IPv6, through ip6tables.
    """

    def __init__(
        self,
        network: IPv4Network | IPv6Network,
        subnet: IPv4Network | IPv6Network,
        *,
        masq: bool,
        forward: bool,
        resync_s: int = 5,
        previous_network: IPv4Network | IPv6Network | None = None,
        previous_subnet: IPv4Network | IPv6Network | None = None,
        netns: str | None = None,
        random_fully_disable: bool = False,
    ) -> None:
        self.network = network
        self.subnet = subnet
        self.ipv6 = isinstance(network, IPv6Network)
        self.family = "ip6tables" if self.ipv6 else "iptables"  # the tool family: ip6tables-save, ...
        self.masq = masq
        self.forward = forward
        self.resync_s = resync_s
        self.previous_network = previous_network
        self.previous_subnet = previous_subnet
        self.netns = netns
        self.random_fully_disable = random_fully_disable
        self._desired: R.Desired | None = None
        self._prefix: list[str] = netns_prefix(netns)
        self._lock = trio.Lock()  # two overlapping batches could re-add what the other removed
        self._bootstrapped = False
        self._wait = False
        self.applied = 0  # batches run; lets callers and tests see a resync happened

    @property
    def enabled(self) -> bool:
        return self.masq or self.forward

    async def _run(self, args: list[str], stdin: bytes = b"") -> str:
        # args name the IPv4 tools; the IPv6 manager runs ip6tables, ip6tables-save, ip6tables-restore
        if self.ipv6:
            args = [self.family + args[0][len("iptables"):]] + args[1:]
        return await run_tool(self._prefix, args, stdin, package="iptables")

    def _check_binaries(self) -> None:
        check_tools(self.ipv6)

    async def _desired_rules(self, version_text: str | None = None) -> R.Desired:
        """Our rules; `version_text`: `iptables --version` as already read (None: run it)."""
        if self._desired is None:
            self._check_binaries()
            if version_text is None:
                version_text = await self._run(["iptables", "--version"])
            version = R.parse_version(version_text)
            self._wait = R.has_random_fully(version)  # --wait arrived in the same release (1.6.2)
            self._desired = R.desired_rules(
                self.network,
                self.subnet,
                masq=self.masq,
                forward=self.forward,
                random_fully=R.has_random_fully(version) and not self.random_fully_disable,
                previous_network=self.previous_network,
            )
        return self._desired

    async def save(self) -> R.SavedTables:
        return R.parse_save(await save_nat_and_filter(self._prefix, f"{self.family}-save"))

    async def _restore(self, payload: str) -> None:
        args = ["iptables-restore", "--noflush"] + (["--wait"] if self._wait else [])
        await self._run(args, payload.encode())
        self.applied += 1

    async def missing(self) -> list[str]:
        return R.missing_rules(await self._desired_rules(), await self.save())

    async def cleanup_previous(self) -> list[R.Rule]:
        """Delete masq rules of the previous network/subnet, and pre-v0.20 flannel rules left in
        POSTROUTING/FORWARD for the previous or current network.  Returns what was deleted."""
        await self._desired_rules()
        async with self._lock, host_lock(RULES_LOCK):
            present, _saved = await self._cleanup_locked(await self.save())
            return present

    def _cleanup_rules(self, saved: R.SavedTables) -> list[R.Rule]:
        """The rules cleanup_previous deletes from these tables (those present)."""
        rules = R.previous_masq_rules(self.previous_network, self.previous_subnet, self.network, self.subnet)
        nets = [(self.network, self.subnet)]
        if self.previous_network is not None:
            nets.append((self.previous_network, self.previous_subnet))
        rules += [r for r in R.legacy_rules(saved, nets) if r not in rules]
        return [r for r in rules if saved.count(r)]

    async def _cleanup_locked(self, saved: R.SavedTables) -> tuple[list[R.Rule], R.SavedTables | None]:
        """cleanup_previous with the tables already read; also returns them as they are now
        (None when this deleted something: read them again)."""
        present = self._cleanup_rules(saved)
        payload = R.delete_payload(present, saved)
        if not payload:
            return present, saved
        log.info(
            "Current network or subnet (%s, %s) differs from previous (%s, %s) or old rules exist; "
            "removing %d old iptables rules",
            self.network, self.subnet, self.previous_network, self.previous_subnet, len(present),
        )
        await self._restore(payload)
        return present, None

    async def apply_at_start(self, before: TablesBeforeLease | None = None) -> None:
        """cleanup_previous, then ensure, under one hold of the locks and from one reading of the
        tables when the clean-up finds nothing to delete; `iptables --version` runs alongside
        that reading.  (Each tool run is a process; this is the agent's start path.)  `before`:
        the tables as read before the lease; when they show nothing to clean up and everything in
        place and in order (a restart), nothing is run at all."""
        if before is not None and not self.ipv6 and before.netns == self.netns:
            await before.wait()
            if before.version is not None:
                desired = await self._desired_rules(before.version)  # a version does not age
                saved = before.saved
                fresh = before.read_at is not None and trio.current_time() - before.read_at <= BEFORE_LEASE_MAX_AGE_S
                if fresh and saved is not None and not self._cleanup_rules(saved) and R.settled(desired, saved):
                    self._bootstrapped = True
                    return
        async with self._lock, host_lock(RULES_LOCK):
            desired, saved = await run_together(self._desired_rules, self.save)
            _present, still = await self._cleanup_locked(saved)
            await self._ensure_locked(desired, still)

    async def ensure(self) -> bool:
        """Install every rule, in order, as one atomic batch if anything is missing; True if it ran."""
        if not self.enabled:
            return False
        desired = await self._desired_rules()
        async with self._lock, host_lock(RULES_LOCK):
            return await self._ensure_locked(desired, None)

    async def _ensure_locked(self, desired: R.Desired, saved_now: R.SavedTables | None) -> bool:
        """ensure() with the locks held; `saved_now`: the tables as just read (None: read them)."""
        for attempt in (1, 2):
            saved = saved_now if saved_now is not None and attempt == 1 else await self.save()
            # The first time, rebuild unless all is present and in order (a restart); after
            # that, only what is missing matters (rebuilding for order would fight other instances).
            if self._bootstrapped and not R.missing_rules(desired, saved) or (
                    not self._bootstrapped and R.settled(desired, saved)):
                self._bootstrapped = True
                return False
            try:
                await self._restore(R.restore_payload(desired, saved))
                self._bootstrapped = True
                return True
            except FlannelError:
                # someone (Docker) changed the tables between save and restore; -D of a
                # vanished rule fails the batch, so look again once
                if attempt == 2:
                    raise
        return False

    async def run(self, before: TablesBeforeLease | None = None, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Clean up, install, report started, then re-check every resync_s seconds forever.
        `before`: the tables as the start read them before its lease (apply_at_start)."""
        if not self.enabled:
            task_status.started()
            return
        await self.apply_at_start(before)
        log.info("%s rules in place (masq=%s, forward=%s)", self.family, self.masq, self.forward)
        task_status.started()
        while True:
            await trio.sleep(self.resync_s)
            try:
                missing = await self.missing()
                if missing:
                    log.warning("%s: %s", MISSING_MSG, "; ".join(missing))
                    await self.ensure()
            except FlannelError as err:
                # a transient failure (xtables lock, Docker rewriting rules) must not kill the agent
                log.error("%s resync failed: %s", self.family, err)


async def remove_listed_flannel_tables(network: IPv4Network | IPv6Network, subnet: IPv4Network | IPv6Network,
                                       listed: str | None,
                                       previous_network: IPv4Network | IPv6Network | None = None,
                                       netns: str | None = None) -> bool:
    """Switching (back) to iptables, given `nft list tables` (None: nft is absent): remove what
    nftables mode left for this family, as flanneld does at start-up.  True when something was
    removed.  The usual start finds none of ours and never loads the nftables code."""
    if listed is None or not tables_to_switch_off(network) & listed_tables(listed):
        return False
    from flannelpy.hostnet.nftables import remove_found_flannel_tables

    return await remove_found_flannel_tables(network, subnet, previous_network, netns)
