"""Applying flanneld's nftables rules (EnableNFTables): one `nft -f` transaction, a resync loop,
and the switch between iptables and nftables.

What the rules say is decided in flannelpy.hostnet.nftables_rules; this module only runs `nft` and,
for the switch, iptables-save/-restore.  Like the iptables rules (and unlike flanneld >= 0.25, which
deletes its tables when it stops), the table stays when the agent exits, so a restart never leaves
the overlay without masquerading.

One manager per family, as for iptables: Network's keeps `ip flannel-ipv4` and switches from
iptables; with EnableIPv6, IPv6Network's keeps `ip6 flannel-ipv6` and switches from ip6tables.  Each
table is replaced in a transaction of its own: the two hook different families, so no packet ever
sees one table's old rules beside the other's new ones, and a failure on one side (no IPv6 NAT in the
kernel, say) never holds back the other side's resync.
"""

from __future__ import annotations

import logging
import shutil
from ipaddress import IPv4Network, IPv6Network

import trio

from flannelpy.errors import FlannelError
from flannelpy.hostnet.rulelock import IPTABLES as IPTABLES_LOCK
from flannelpy.hostnet.rulelock import NFTABLES as NFT_LOCK
from flannelpy.hostnet.rulelock import host_lock
from flannelpy.hostnet.tools import list_nft_tables, netns_prefix, run_tool, save_nat_and_filter

from . import iptables_rules as IR
from . import nftables_rules as R

log = logging.getLogger(__name__)



def differs_msg(table: str) -> str:
    return f"nftables table {table} differs from flannel's rules; replacing it"


DIFFERS_MSG = differs_msg(R.TABLE_V4)


def check_tools() -> None:
    """`nft` is installed; the agent calls this before taking a lease when EnableNFTables is on."""
    if shutil.which("nft") is None:
        raise FlannelError("EnableNFTables: nft not found in PATH; install nftables (Debian: apt-get install "
                           "nftables), or set EnableNFTables to false in the network config")


class NftablesManager:
    """Keeps table `ip flannel-ipv4` (chains postrtg and forward) as flanneld's rules want it; given
    IPv6Network and our IPv6 subnet, table `ip6 flannel-ipv6`, and ip6tables for the switch.

    `netns` runs every command inside /var/run/netns/<netns> (tests); None = the current namespace.
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
        netns: str | None = None,
        random_fully_disable: bool = False,
    ) -> None:
        self.network = network
        self.subnet = subnet
        self.masq = masq
        self.forward = forward
        self.resync_s = resync_s
        self.previous_network = previous_network
        self.netns = netns
        self.ruleset = R.desired_ruleset(network, subnet, masq=masq, forward=forward,
                                         random_fully=not random_fully_disable, previous_network=previous_network)
        self.family, self.table = self.ruleset.family, self.ruleset.table
        self.ipv6 = network.version == 6
        self.xtables = "ip6tables" if self.ipv6 else "iptables"  # the mode switched from: its chains go
        self._prefix: list[str] = netns_prefix(netns)
        self._lock = trio.Lock()  # a resync and a removal must not interleave their list and apply
        self._bootstrapped = False
        self.applied = 0  # transactions run; lets callers and tests see a resync happened

    @property
    def enabled(self) -> bool:
        return self.masq or self.forward

    async def _run(self, args: list[str], stdin: bytes = b"") -> str:
        return await run_tool(self._prefix, args, stdin, package="nftables")

    async def listing(self, family: str | None = None, table: str | None = None) -> R.ListedTable | None:
        """The table (ours by default) as the kernel has it, or None when it does not exist."""
        family, table = family or self.family, table or self.table
        if table not in R.tables_in(await self._run(["nft", "list", "tables", family]), family):
            return None
        try:
            return R.parse_listing(await self._run(["nft", "list", "table", family, table]))
        except FlannelError as err:
            if "No such file or directory" in str(err):  # deleted between the two commands
                return None
            raise

    async def _apply(self, script: str) -> None:
        await self._run(["nft", "-f", "-"], script.encode())
        self.applied += 1

    async def missing(self) -> list[str]:
        return R.differences(self.ruleset, await self.listing())

    async def ensure(self) -> bool:
        """Replace the table in one transaction if it differs from ours (always the first time,
        which also drops stale rules of a previous subnet); True if a transaction ran."""
        if not self.enabled:
            return False
        async with self._lock, host_lock(NFT_LOCK):
            for attempt in (1, 2):
                listed = await self.listing()
                if self._bootstrapped and not R.differences(self.ruleset, listed):
                    return False
                try:
                    await self._apply(R.apply_script(self.ruleset, listed))
                    self._bootstrapped = True
                    return True
                except FlannelError:
                    # a transient failure (another instance changed the table between list and apply): look again once
                    if attempt == 2:
                        raise
        return False

    async def remove(self) -> bool:
        """Remove our rules from our table (the whole table unless another instance's rules are in
        it).  Network's manager also removes flannel-ipv6 if it is empty: flanneld >= 0.25 makes it
        even without IPv6, and one with rules is IPv6Network's manager's to judge.  True if anything
        was removed."""
        rulesets = [self.ruleset] if self.ipv6 else [self.ruleset, R.empty_ruleset(R.FAMILY_V6, R.TABLE_V6)]
        async with self._lock, host_lock(NFT_LOCK):
            removed = False
            for ruleset in rulesets:
                script = R.removal_script(ruleset, await self.listing(ruleset.family, ruleset.table))
                if script:
                    await self._apply(script)
                    removed = True
            self._bootstrapped = False
            return removed

    def _xtables_present(self) -> bool:
        return all(shutil.which(f"{self.xtables}-{verb}") is not None for verb in ("save", "restore"))

    async def remove_iptables_chains(self, why: str = "EnableNFTables") -> int:
        """Switching to nftables: remove this instance's FLANNEL-POSTRTG / FLANNEL-FWD rules (ip6tables'
        for IPv6Network), and the chains and their jumps when no other instance uses them.  Returns
        the rules removed; `why` opens the log line."""
        if not self._xtables_present():
            return 0  # no iptables on this host: nothing of ours can be there
        save, restore = f"{self.xtables}-save", f"{self.xtables}-restore"
        async with host_lock(IPTABLES_LOCK):
            text = await save_nat_and_filter(self._prefix, save)
            payload, count = R.iptables_removal_payload(IR.parse_save(text), self.network, self.subnet,
                                                        self.previous_network)
            if payload:
                await self._run([restore, "--noflush", "--wait"], payload.encode())
        if payload:
            log.info("%s: removed %d flannel %s rules (FLANNEL-POSTRTG, FLANNEL-FWD)", why, count, self.xtables)
        return count

    async def ensure_docker_user(self) -> bool:
        """With forward rules, keep our accept in Docker's DOCKER-USER (iptables; ip6tables for
        IPv6Network) where that chain exists: nftables cannot overrule Docker's drops.  True if a
        batch ran."""
        if not self.forward or not self._xtables_present():
            return False
        async with host_lock(IPTABLES_LOCK):
            saved = IR.parse_save(await self._run([f"{self.xtables}-save", "-t", "filter"]))
            payload = R.docker_user_payload(saved, self.network)
            if not payload:
                return False
            await self._run([f"{self.xtables}-restore", "--noflush", "--wait"], payload.encode())
            return True

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Switch from iptables, install, report started, then re-check every resync_s seconds."""
        if not self.enabled:
            task_status.started()
            return
        await self.ensure()
        # after ours are in place, so there is no moment with neither iptables nor nftables rules
        await self.remove_iptables_chains()
        await self.ensure_docker_user()
        log.info("nftables table %s %s in place (masq=%s, forward=%s)", self.family, self.table,
                 self.masq, self.forward)
        task_status.started()
        while True:
            await trio.sleep(self.resync_s)
            try:
                differs = await self.missing()
                if differs:
                    log.warning("%s: %s", differs_msg(self.table), "; ".join(differs))
                    await self.ensure()
                if await self.ensure_docker_user():
                    log.warning("flannel's rule in Docker's %s (%s) was missing or unreachable; put it back",
                                IR.DOCKER_USER, self.xtables)
            except FlannelError as err:
                # a transient failure (another instance mid-transaction) must not end the agent
                log.error("nftables resync failed: %s", err)


async def remove_flannel_tables(network: IPv4Network | IPv6Network, subnet: IPv4Network | IPv6Network,
                                previous_network: IPv4Network | IPv6Network | None = None,
                                netns: str | None = None) -> bool:
    """Switching back to iptables: remove what nftables mode left for this family, from flannel-ipv4
    or, given IPv6Network, flannel-ipv6."""
    from flannelpy.hostnet.iptables import remove_listed_flannel_tables

    return await remove_listed_flannel_tables(network, subnet, await list_nft_tables(netns), previous_network, netns)


async def remove_found_flannel_tables(network: IPv4Network | IPv6Network, subnet: IPv4Network | IPv6Network,
                                      previous_network: IPv4Network | IPv6Network | None = None,
                                      netns: str | None = None) -> bool:
    """iptables.remove_listed_flannel_tables once the listing showed a table of ours."""
    manager = NftablesManager(network, subnet, masq=True, forward=True, previous_network=previous_network,
                              netns=netns)
    removed = await manager.remove()
    if removed:
        log.info("EnableNFTables is off: removed flannel's nftables rules (table %s %s)", manager.family,
                 manager.table)
    return removed
