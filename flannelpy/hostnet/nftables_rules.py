"""flanneld's nftables rules (EnableNFTables), as data: the table text, reading `nft list table`, and
what switching between iptables and nftables removes.

Everything here is pure.  flannelpy.hostnet.nftables runs `nft`; this module decides what it says.

The names are flanneld >= 0.25's (pkg/trafficmngr/nftables): table `ip flannel-ipv4` for Network and,
with EnableIPv6, table `ip6 flannel-ipv6` for IPv6Network, each with a `postrtg` chain (type nat, hook
postrouting, priority srcnat) and a `forward` chain (type filter, hook forward, priority filter).  The
IPv6 table is the IPv4 one with `ip6` matches and ff00::/8 for 224.0.0.0/4, as flanneld's ip6tables rules
are its iptables rules.  Every function takes an IPv6Network where it takes an IPv4Network; the family
and table follow from the network.  The rules have the effect of the iptables chains in iptables_rules.py,
rule for rule, with two deliberate differences from flanneld's nftables code, which there diverges from
its own iptables rules:

- the kube-proxy mark is matched under a mask (`meta mark & 0x4000 == 0x4000`, iptables' `--mark
  0x4000/0x4000`); flanneld writes `meta mark 0x4000`, which misses packets carrying other mark bits too;
- the external-traffic exception is `ip saddr != NETWORK ip daddr SUBNET return` (iptables' `! -s CLUSTER
  -d POD`); flanneld writes `ip saddr != SUBNET ip daddr NETWORK return`, which returns before the last
  rule, so host-to-overlay traffic is never masqueraded there.

Rule text is written exactly as `nft list table` prints it (nftables 1.0.6, tested against the real
`nft`; IPv6 addresses compressed, as str(IPv6Network) writes them), so "is this rule in place?" is a string comparison with the listing, and a rule someone else
put into one of these chains can be written back verbatim.
"""

from __future__ import annotations

import itertools
import re
import shlex
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from typing import NamedTuple

from . import iptables_rules as IR

from .nft_tables import FAMILY_V4, FAMILY_V6, TABLE_V4, TABLE_V6, listed_tables
MASQ_CHAIN = "postrtg"
FWD_CHAIN = "forward"
FLANNEL_CHAINS = (MASQ_CHAIN, FWD_CHAIN)
MASQ_HEADER = "type nat hook postrouting priority srcnat; policy accept;"
FWD_HEADER = "type filter hook forward priority filter; policy accept;"
MASQ_CHAIN_COMMENT = "chain to manage traffic masquerading by flannel"
FWD_CHAIN_COMMENT = "chain to accept flannel traffic"
KUBE_PROXY_MARK_RULE = "meta mark & 0x00004000 == 0x00004000 return"  # never masquerade twice

IPNetwork = IPv4Network | IPv6Network


def family_for(network: IPNetwork) -> str:
    """The nftables family of a network's table, which is also its address match (`ip saddr`, `ip6 saddr`)."""
    return FAMILY_V4 if network.version == 4 else FAMILY_V6


def table_for(network: IPNetwork) -> str:
    return TABLE_V4 if network.version == 4 else TABLE_V6


def _same_family(*networks: IPNetwork | None) -> None:
    versions = {n.version for n in networks if n is not None}
    if len(versions) > 1:
        raise ValueError(f"nftables rules mix IPv4 and IPv6 networks: {', '.join(str(n) for n in networks if n)}")


def table_comment(table: str) -> str:
    return f"rules for {table}"


class Chain(NamedTuple):
    """A base chain as we write it: its header line (type, hook, priority, policy) and rules."""

    name: str
    header: str
    comment: str
    rules: tuple[str, ...]


class Ruleset(NamedTuple):
    """What one flanneld wants in one table.  `own_networks` tells its rules from other instances'
    (several flanneld on one machine with different Networks share the table, as they share
    iptables' FLANNEL-* chains): a rule naming one of them is ours, even a stale variant."""

    family: str
    table: str
    chains: tuple[Chain, ...]
    own_networks: tuple[IPNetwork, ...] = ()

    def chain(self, name: str) -> Chain | None:
        return next((c for c in self.chains if c.name == name), None)


def _cidr(net: IPNetwork) -> str:
    # nft prints a /32 (IPv6: /128) bare
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


def masq_chain(network: IPNetwork, subnet: IPNetwork, *, random_fully: bool) -> Chain:
    """The postrtg chain: iptables_rules.masq_rules' FLANNEL-POSTRTG, in the same order (IPv6Network:
    its ip6tables chain, in table flannel-ipv6)."""
    _same_family(network, subnet)
    n, p, ip = _cidr(network), _cidr(subnet), family_for(network)
    masquerade = "masquerade fully-random" if random_fully else "masquerade"
    return Chain(MASQ_CHAIN, MASQ_HEADER, MASQ_CHAIN_COMMENT, (
        KUBE_PROXY_MARK_RULE,
        # traffic inside the overlay keeps its source address
        f"{ip} saddr {p} {ip} daddr {n} return",
        f"{ip} saddr {n} {ip} daddr {p} return",
        # external traffic arriving for one of our containers is not masqueraded
        f"{ip} saddr != {n} {ip} daddr {p} return",
        f"{ip} saddr {n} {ip} daddr != {IR.multicast_for(network)} {masquerade}",
        f"{ip} saddr != {n} {ip} daddr {n} {masquerade}",
    ))


def forward_chain(network: IPNetwork) -> Chain:
    """The forward chain: iptables_rules.forward_rules' FLANNEL-FWD."""
    n, ip = _cidr(network), family_for(network)
    return Chain(FWD_CHAIN, FWD_HEADER, FWD_CHAIN_COMMENT, (f"{ip} saddr {n} accept", f"{ip} daddr {n} accept"))


def desired_ruleset(
    network: IPNetwork, subnet: IPNetwork, *, masq: bool, forward: bool, random_fully: bool,
    previous_network: IPNetwork | None = None,
) -> Ruleset:
    """What one flanneld wants in its table for one family: Network and our subnet (flannel-ipv4)
    or, with EnableIPv6, IPv6Network and our IPv6 subnet (flannel-ipv6)."""
    _same_family(network, subnet, previous_network)
    chains: list[Chain] = []
    if masq:
        chains.append(masq_chain(network, subnet, random_fully=random_fully))
    if forward:
        chains.append(forward_chain(network))
    own = (network,) if previous_network in (None, network) else (network, previous_network)
    return Ruleset(family_for(network), table_for(network), tuple(chains), own)


def empty_ruleset(family: str, table: str, own_networks: tuple[IPNetwork, ...] = ()) -> Ruleset:
    """No chains: applying it keeps only other instances' rules, removing ours (the switch back)."""
    return Ruleset(family, table, (), own_networks)


# --- reading `nft list table` ------------------------------------------------------------------


@dataclass
class ListedChain:
    name: str
    header: str | None = None  # None: a regular chain (no hook)
    comment_line: str | None = None  # `comment "..."` as printed
    rules: list[str] = field(default_factory=list)


@dataclass
class ListedTable:
    """A table as `nft list table` printed it: chains parsed, other blocks (sets, maps) kept raw."""

    family: str
    name: str
    chains: dict[str, ListedChain] = field(default_factory=dict)
    other_blocks: list[list[str]] = field(default_factory=list)


_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')


def _depth_change(line: str) -> int:
    bare = _QUOTED.sub("", line)
    return bare.count("{") - bare.count("}")


def parse_listing(text: str) -> ListedTable | None:
    """Parse `nft list table FAMILY NAME`; None when the text holds no table."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return None
    head = lines[0].split()
    if len(head) < 4 or head[0] != "table" or head[-1] != "{":
        raise ValueError(f"nft listing does not start with a table: {lines[0]!r}")
    table = ListedTable(head[1], head[2])
    i = 1
    while i < len(lines):
        line = lines[i]
        if line == "}":
            break
        words = line.split()
        if line.endswith("{") and len(words) >= 3:
            # a block: collect it whole (its own braces balanced)
            depth, block = _depth_change(line), [line]
            i += 1
            while i < len(lines) and depth > 0:
                depth += _depth_change(lines[i])
                block.append(lines[i])
                i += 1
            if words[0] == "chain":
                table.chains[words[1]] = _parse_chain(words[1], block[1:-1])
            else:
                table.other_blocks.append(block)
            continue
        i += 1  # a table attribute (comment, flags): ours are rewritten, others are not kept
    return table


def _parse_chain(name: str, body: list[str]) -> ListedChain:
    chain = ListedChain(name)
    for line in body:
        if line.startswith("type ") and " hook " in line:
            chain.header = line
        elif line.startswith('comment "') and chain.comment_line is None and not chain.rules:
            chain.comment_line = line
        else:
            chain.rules.append(line)
    return chain


def tables_in(list_tables_output: str, family: str) -> set[str]:
    """Table names of `family` in `nft list tables` output."""
    return {name for fam, name in listed_tables(list_tables_output) if fam == family}


# --- ours or someone else's ----------------------------------------------------------------------

_IPV4_CIDR = re.compile(r"(?<![\w.:])(\d{1,3}(?:\.\d{1,3}){3})(?:/(\d{1,2}))?(?![\w.:])")
# hex groups with at least one colon (an IPv4 tail allowed: ::ffff:10.5.0.1); MACs and times fail to parse
_IPV6_CIDR = re.compile(r"(?<![\w.:])([0-9A-Fa-f]*:[0-9A-Fa-f:.]*)(?:/(\d{1,3}))?(?![\w.:/])")
_MULTICAST = (IR.MULTICAST_V4, IR.MULTICAST_V6)


def rule_networks(rule: str) -> list[IPNetwork]:
    """The networks (or addresses, as /32 or /128) a rule's text names, either family, in text order."""
    text = _QUOTED.sub("", rule)
    found: list[tuple[int, IPNetwork]] = []
    for pattern, cls, full in ((_IPV4_CIDR, IPv4Network, 32), (_IPV6_CIDR, IPv6Network, 128)):
        for m in pattern.finditer(text):
            try:
                found.append((m.start(), cls(f"{m[1]}/{m[2] or full}", strict=False)))
            except ValueError:
                pass
    return [net for _, net in sorted(found, key=lambda pair: pair[0])]


def is_ours(rule: str, ruleset: Ruleset) -> bool:
    """A rule we want anywhere in the table, or one naming our (current or previous) Network.
    The multicast range is everyone's, so it decides nothing."""
    if any(rule in c.rules for c in ruleset.chains):
        return True
    nets = [n for n in rule_networks(rule) if str(n) not in _MULTICAST]
    return any(net.version == own.version and net.subnet_of(own) for net in nets for own in ruleset.own_networks)


def differences(ruleset: Ruleset, listed: ListedTable | None) -> list[str]:
    """What differs from what we want (empty = in place): absent table or chain, a changed hook,
    priority or policy, our rules absent, out of order, repeated, or stale ones of ours present.
    Other instances' rules between ours are not a difference."""
    if not ruleset.chains:
        return []
    if listed is None:
        return [f"table {ruleset.family} {ruleset.table}"]
    out: list[str] = []
    for chain in ruleset.chains:
        found = listed.chains.get(chain.name)
        if found is None:
            out.append(f"chain {chain.name}")
            continue
        if found.header != chain.header:
            out.append(f"chain {chain.name}: {found.header or 'no hook'!r} instead of {chain.header!r}")
        ours = [r for r in found.rules if is_ours(r, ruleset)]
        if ours != list(chain.rules):
            absent = [r for r in chain.rules if r not in ours]
            stale = [r for r in ours if r not in chain.rules]
            if absent:
                out.append(f"chain {chain.name}: missing " + "; ".join(absent))
            if stale:
                out.append(f"chain {chain.name}: not ours to keep " + "; ".join(stale))
            if not absent and not stale:
                out.append(f"chain {chain.name}: rules out of order or repeated")
    return out


def _foreign_chains(ruleset: Ruleset, listed: ListedTable | None, ours=None) -> list[ListedChain]:
    """Each listed chain with only the rules that are not ours (`ours` decides, is_ours by
    default); chains we write come back with their foreign rules only, other flannel chains only
    if they keep some, other chains whole."""
    if listed is None:
        return []
    mine = ours or (lambda rule: is_ours(rule, ruleset))
    kept = []
    for chain in listed.chains.values():
        if chain.name in FLANNEL_CHAINS:
            rules = [r for r in chain.rules if not mine(r)]
            if not rules and ruleset.chain(chain.name) is None:
                continue
            kept.append(ListedChain(chain.name, chain.header, chain.comment_line, rules))
        else:
            kept.append(chain)
    return kept


def apply_script(ruleset: Ruleset, listed: ListedTable | None) -> str:
    """One `nft -f` transaction replacing the table: create-if-absent, delete, define in full.

    nft applies a file atomically, so packets see the old table or the new one, never no rules.
    Rules of other instances in our chains follow ours; other chains and sets come back verbatim.
    """
    return _render(ruleset, _foreign_chains(ruleset, listed), listed.other_blocks if listed else [])


def _render(ruleset: Ruleset, foreign_chains: list[ListedChain], other_blocks: list[list[str]]) -> str:
    fam, name = ruleset.family, ruleset.table
    foreign = {c.name: c for c in foreign_chains}
    out = [f"table {fam} {name} {{}}", f"delete table {fam} {name}", f"table {fam} {name} {{",
           f"\tcomment {_quote(table_comment(name))}"]
    for block in other_blocks:
        out += ["\t" + line for line in block]
    for chain in ruleset.chains:
        extra = foreign.pop(chain.name, None)
        rules = list(chain.rules) + (extra.rules if extra else [])
        out += _chain_lines(chain.name, f"comment {_quote(chain.comment)}", chain.header, rules)
    for chain in foreign.values():
        out += _chain_lines(chain.name, chain.comment_line, chain.header, chain.rules)
    out.append("}")
    return "\n".join(out) + "\n"


def removal_script(ruleset: Ruleset, listed: ListedTable | None) -> str:
    """The transaction removing our rules, '' when there is nothing to remove.

    The whole table goes when nothing else is in it, as flanneld deletes it.  When another
    instance's rules are there too, only the rules naming our Network go (the kube-proxy mark
    rule stays: the other instance wants it as well) and the rest is written back as found.
    `ruleset` is what we want in nftables mode (it tells our rules); for a table holding nothing
    of ours (flannel-ipv6 while IPv6 is off) pass empty_ruleset: it goes only if it is empty.
    """
    if listed is None:
        return ""
    fam, name = ruleset.family, ruleset.table
    if not listed.other_blocks and not any(c.rules or c.name not in FLANNEL_CHAINS
                                           for c in _foreign_chains(ruleset, listed)):
        return f"table {fam} {name} {{}}\ndelete table {fam} {name}\n"

    def naming_ours(rule: str) -> bool:
        return bool(rule_networks(rule)) and is_ours(rule, ruleset)

    if not any(naming_ours(r) for c in listed.chains.values() if c.name in FLANNEL_CHAINS for r in c.rules):
        return ""
    bare = empty_ruleset(fam, name, ruleset.own_networks)
    return _render(bare, _foreign_chains(bare, listed, naming_ours), listed.other_blocks)


def _chain_lines(name: str, comment_line: str | None, header: str | None, rules: list[str]) -> list[str]:
    out = [f"\tchain {name} {{"]
    if comment_line:
        out.append(f"\t\t{comment_line}")
    if header:
        out.append(f"\t\t{header}")
    out += [f"\t\t{r}" for r in rules]
    out.append("\t}")
    return out


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- switching from iptables: flannel's own chains go --------------------------------------------


def iptables_removal_payload(
    saved: IR.SavedTables, network: IPNetwork, subnet: IPNetwork,
    previous_network: IPNetwork | None = None,
) -> tuple[str, int]:
    """An iptables-restore --noflush batch removing this flanneld's FLANNEL-POSTRTG / FLANNEL-FWD
    rules, and, when no other instance's rules remain in them, the chains and the jumps to them.
    Returns (payload, rules removed); ('', 0) when there is nothing.  IPv6Network: `saved` is
    ip6tables-save's and the batch is for ip6tables-restore.

    Docker's DOCKER-USER is not touched: an nftables accept cannot undo a drop decided in
    iptables' own FORWARD chain, so that one rule is still what lets overlay traffic past Docker
    (see docker_user_payload).
    """
    desired = IR.desired_rules(network, subnet, masq=True, forward=True, random_fully=True,
                               previous_network=previous_network)
    by_table: dict[str, list[str]] = {}
    removed = 0
    for table, chain in (("nat", IR.MASQ_CHAIN), ("filter", IR.FWD_CHAIN)):
        specs = saved.chain(table, chain)
        if specs is None:
            continue
        mine = [s for s in specs if IR.is_ours(table, chain, s, desired)]
        others = [s for s in specs if not IR.is_ours(table, chain, s, desired)]
        lines = by_table.setdefault(table, [])
        if others:
            # another instance still uses the chain: only rules naming our Network go (the shared
            # kube-proxy mark rule stays, the other instance wants it too)
            for spec in mine:
                if IR.rule_networks(spec):
                    lines.append(f"-D {chain} {spec}")
                    removed += 1
            continue
        for other_chain, other_specs in saved.tables.get(table, {}).items():
            for spec in other_specs:
                if other_chain != chain and _jumps_to(spec, chain):
                    lines.append(f"-D {other_chain} {spec}")
                    removed += 1
        lines += [f"-F {chain}", f"-X {chain}"]
        removed += len(specs)
    payload = "".join(f"*{t}\n" + "".join(f"{ln}\n" for ln in lines) + "COMMIT\n"
                      for t, lines in by_table.items() if lines)
    return payload, removed


def _jumps_to(spec: str, chain: str) -> bool:
    try:
        toks = shlex.split(spec)
    except ValueError:
        return False
    return any(opt in ("-j", "--jump", "-g", "--goto") and target == chain
               for opt, target in itertools.pairwise(toks))


def docker_user_payload(saved: IR.SavedTables, network: IPNetwork) -> str:
    """The batch putting our Network-to-Network accept back into Docker's DOCKER-USER ('' when the
    chain does not exist or the rule is in place).

    nftables mode needs it as much as iptables mode: every base chain on a hook sees the packet, and
    an accept in our table ends only our chain, so Docker's FORWARD chain (policy DROP, and its own
    DROP of new traffic into a bridge) still decides.  Same rule, same placement as iptables mode
    (before Docker's closing RETURN, below what the administrator inserted).
    """
    rule = IR.docker_user_rule(network)
    chain = saved.chain("filter", IR.DOCKER_USER)
    if chain is None or IR.rule_reachable(chain, rule):
        return ""
    lines = [rule.line("-D")] * saved.count(rule) + [f"-I {IR.DOCKER_USER} 1 {rule.spec_text}"]
    return "*filter\n" + "".join(f"{ln}\n" for ln in lines) + "COMMIT\n"
