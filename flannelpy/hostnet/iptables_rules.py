"""iptables rules flanneld installs, as data: building restore payloads and reading iptables-save.

Everything here is pure.  flannelpy.hostnet.iptables runs the commands; this module decides what they say.

Rule text is kept in iptables-save form (`-m comment --comment "flanneld masq"`), which is also what
iptables-restore reads, so "is this rule present?" is a string comparison against iptables-save output.

IPv6 (dual stack): flanneld builds the same chains, jumps and comments for IPv6Network and our IPv6
subnet, with ff00::/8 in place of 224.0.0.0/4, and applies them with ip6tables-restore.  Every
function here takes an IPv6Network where it takes an IPv4Network; the rules of one family go to that
family's tool (ip6tables-save prints addresses compressed, as str(IPv6Network) does).
"""

from __future__ import annotations

import itertools
import shlex
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import NamedTuple

MASQ_CHAIN = "FLANNEL-POSTRTG"
FWD_CHAIN = "FLANNEL-FWD"
DOCKER_USER = "DOCKER-USER"
MASQ_COMMENT = "flanneld masq"
FWD_COMMENT = "flanneld forward"
KUBE_PROXY_MARK = "0x4000/0x4000"  # kube-proxy's masquerade mark: never masquerade twice
MULTICAST_V4 = "224.0.0.0/4"
MULTICAST_V6 = "ff00::/8"

IPNetwork = IPv4Network | IPv6Network


def multicast_for(network: IPNetwork) -> str:
    """The multicast range flanneld leaves unmasqueraded for this family."""
    return MULTICAST_V4 if network.version == 4 else MULTICAST_V6


def _same_family(*networks: IPNetwork | None) -> None:
    versions = {n.version for n in networks if n is not None}
    if len(versions) > 1:
        raise ValueError(f"iptables rules mix IPv4 and IPv6 networks: {', '.join(str(n) for n in networks if n)}")


class Rule(NamedTuple):
    """One rule: `-A <chain> <spec>` in table `table`; spec tokens are unquoted."""

    table: str
    chain: str
    spec: tuple[str, ...]

    @property
    def spec_text(self) -> str:
        """The spec as iptables-save prints it (the comment argument double-quoted)."""
        out = []
        for i, tok in enumerate(self.spec):
            out.append(f'"{tok}"' if i > 0 and self.spec[i - 1] == "--comment" else tok)
        return " ".join(out)

    def line(self, action: str = "-A") -> str:
        return f"{action} {self.chain} {self.spec_text}"


def _c(comment: str) -> tuple[str, ...]:
    return ("-m", "comment", "--comment", comment)


def masq_rules(network: IPNetwork, subnet: IPNetwork, *, random_fully: bool) -> list[Rule]:
    """flanneld HEAD's --ip-masq rules, in order: the POSTROUTING jump first, then the chain.
    IPv6Network and IPv6 subnet: masqIP6Rules, for ip6tables.

    `random_fully` = iptables supports --random-fully and --ip-masq-fully-random-disable is not set.
    """
    _same_family(network, subnet)
    n, p = str(network), str(subnet)
    rf = ("--random-fully",) if random_fully else ()
    c = _c(MASQ_COMMENT)
    return [
        Rule("nat", "POSTROUTING", (*c, "-j", MASQ_CHAIN)),
        Rule("nat", MASQ_CHAIN, ("-m", "mark", "--mark", KUBE_PROXY_MARK, *c, "-j", "RETURN")),
        # traffic inside the overlay keeps its source address
        Rule("nat", MASQ_CHAIN, ("-s", p, "-d", n, *c, "-j", "RETURN")),
        Rule("nat", MASQ_CHAIN, ("-s", n, "-d", p, *c, "-j", "RETURN")),
        # external traffic arriving for one of our containers is not masqueraded
        Rule("nat", MASQ_CHAIN, ("!", "-s", n, "-d", p, *c, "-j", "RETURN")),
        Rule("nat", MASQ_CHAIN, ("-s", n, "!", "-d", multicast_for(network), *c, "-j", "MASQUERADE", *rf)),
        Rule("nat", MASQ_CHAIN, ("!", "-s", n, "-d", n, *c, "-j", "MASQUERADE", *rf)),
    ]


def forward_rules(network: IPNetwork) -> list[Rule]:
    """flanneld HEAD's --iptables-forward-rules: accept anything to or from the flannel network."""
    n = str(network)
    c = _c(FWD_COMMENT)
    return [
        Rule("filter", "FORWARD", (*c, "-j", FWD_CHAIN)),
        Rule("filter", FWD_CHAIN, ("-s", n, *c, "-j", "ACCEPT")),
        Rule("filter", FWD_CHAIN, ("-d", n, *c, "-j", "ACCEPT")),
    ]


# Docker >= 17.06 jumps to DOCKER-USER first in FORWARD, before its own rules (isolation between its
# bridges, published ports, and since Docker 28 a DROP of anything else entering a bridge), so the
# FLANNEL-FWD jump appended to FORWARD, as flanneld does it, is never reached there by overlay traffic.
# What flannel needs is only traffic from the Network to the Network; everything else (published ports,
# user-defined bridges, traffic to and from outside) stays Docker's decision, so this rule accepts
# exactly that and no more.  It goes before Docker's closing `-j RETURN` but never above rules the
# administrator inserted later: DOCKER-USER is theirs, and what they put first must keep winning.
def docker_user_rule(network: IPNetwork) -> Rule:
    n = str(network)
    return Rule("filter", DOCKER_USER, ("-s", n, "-d", n, *_c(FWD_COMMENT), "-j", "ACCEPT"))


# What flannelpy inserted before: an unconditional jump into FLANNEL-FWD at the top of DOCKER-USER.
# FLANNEL-FWD accepts anything *from* or *to* the Network, so it overrode Docker's isolation of
# user-defined bridges and any DROP the administrator put in DOCKER-USER; removed at start-up.
LEGACY_DOCKER_USER_JUMP = Rule("filter", DOCKER_USER, (*_c(FWD_COMMENT), "-j", FWD_CHAIN))

# Targets that end a chain's evaluation for every packet when the rule has no match
_TERMINAL = ("RETURN", "ACCEPT", "DROP", "REJECT")


def _unconditional_end(spec: str) -> bool:
    """A rule every packet that reaches it stops at (`-j RETURN`, Docker's last DOCKER-USER rule)."""
    parsed = _strip_extras(spec)
    return parsed is not None and len(parsed[0]) >= 2 and parsed[0][0] == "-j" and parsed[0][1] in _TERMINAL


def rule_reachable(chain_specs: list[str], rule: Rule) -> bool:
    """`rule` is in the chain before any rule that stops every packet (so packets can reach it)."""
    for spec in chain_specs:
        if spec == rule.spec_text:
            return True
        if _unconditional_end(spec):
            return False
    return False


# --- reading iptables-save ---------------------------------------------------------------------


class SavedTables:
    """What iptables-save shows: table -> chain -> rule specs in order (without `-A CHAIN `).
    (Plain classes here, not dataclasses: this module is loaded at every start.)"""

    __slots__ = ("tables",)

    def __init__(self, tables: dict[str, dict[str, list[str]]] | None = None) -> None:
        self.tables = {} if tables is None else tables

    def __repr__(self) -> str:
        return f"SavedTables({self.tables!r})"

    def chain(self, table: str, chain: str) -> list[str] | None:
        return self.tables.get(table, {}).get(chain)

    def has_chain(self, table: str, chain: str) -> bool:
        return self.chain(table, chain) is not None

    def count(self, rule: Rule) -> int:
        return (self.chain(rule.table, rule.chain) or []).count(rule.spec_text)


def parse_save(text: str) -> SavedTables:
    """Parse iptables-save output (any number of tables)."""
    saved = SavedTables()
    table: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or line == "COMMIT":
            continue
        if line.startswith("*"):
            table = saved.tables.setdefault(line[1:], {})
        elif table is None:
            raise ValueError(f"iptables-save output has a rule before any table: {line!r}")
        elif line.startswith(":"):
            table.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            _, chain, *rest = line.split(" ", 2)
            table.setdefault(chain, []).append(rest[0] if rest else "")
    return saved


# --- what we want, what is missing, how to get there -----------------------------------------------


class Desired(NamedTuple):
    """All rules one flanneld wants: chains it fills (rebuilt in order), and jumps into them.

    Several flanneld instances on one machine (different -etcd-prefix and Network) share
    flanneld's chain names, so a rebuild keeps every rule of the chain that is not ours: ours are
    the rules we want and any flanneld-commented rule naming one of `own_networks` (a stale
    variant of ours, e.g. of a previous subnet).  The rules themselves stay byte-identical to
    flanneld's, so tooling that reads them, and an upgrade from flanneld, see what they expect.
    """

    rules: tuple[Rule, ...]
    docker_user: Rule | None  # our rule in DOCKER-USER, kept reachable when that chain exists
    own_networks: tuple[IPNetwork, ...] = ()

    @property
    def chains(self) -> list[tuple[str, str]]:
        owned = {MASQ_CHAIN, FWD_CHAIN}
        seen: list[tuple[str, str]] = []
        for r in self.rules:
            if r.chain in owned and (r.table, r.chain) not in seen:
                seen.append((r.table, r.chain))
        return seen


def desired_rules(
    network: IPNetwork, subnet: IPNetwork, *, masq: bool, forward: bool, random_fully: bool,
    previous_network: IPNetwork | None = None,
) -> Desired:
    """Everything one flanneld wants for one family: call it once for Network and our subnet
    (iptables) and, with dual stack, once for IPv6Network and our IPv6 subnet (ip6tables)."""
    _same_family(network, subnet, previous_network)
    rules: list[Rule] = []
    if masq:
        rules += masq_rules(network, subnet, random_fully=random_fully)
    if forward:
        rules += forward_rules(network)
    own = (network,) if previous_network in (None, network) else (network, previous_network)
    return Desired(tuple(rules), docker_user=docker_user_rule(network) if forward else None, own_networks=own)


_OUR_COMMENTS = (MASQ_COMMENT, FWD_COMMENT)
_ADDRESS_OPTIONS = ("-s", "--source", "-d", "--destination")


def rule_networks(spec: str) -> list[IPNetwork]:
    """The networks a rule's -s/-d options name (negated or not), in iptables-save form."""
    try:
        toks = shlex.split(spec)
    except ValueError:
        return []
    found = []
    for opt, value in itertools.pairwise(toks):
        if opt in _ADDRESS_OPTIONS:
            try:
                found.append(ip_network(value, strict=False))
            except ValueError:
                pass
    return found


def is_ours(table: str, chain: str, spec: str, desired: Desired) -> bool:
    """Whether a rule found in one of our chains belongs to this flanneld (see Desired)."""
    if any(r.table == table and r.chain == chain and r.spec_text == spec for r in desired.rules):
        return True
    parsed = _strip_extras(spec)
    if parsed is None or parsed[1] not in _OUR_COMMENTS:
        return False
    return any(net.version == own.version and net.subnet_of(own)
               for net in rule_networks(spec) for own in desired.own_networks)


def foreign_rules(desired: Desired, saved: SavedTables) -> list[tuple[str, str, str]]:
    """(table, chain, spec as iptables-save printed it) of each rule in our chains that another
    instance (or someone else) put there, in their order; the spec is re-added verbatim."""
    out: list[tuple[str, str, str]] = []
    for table, chain in desired.chains:
        for spec in saved.chain(table, chain) or []:
            if not is_ours(table, chain, spec, desired):
                out.append((table, chain, spec))
    return out


def missing_rules(desired: Desired, saved: SavedTables) -> list[str]:
    """Human-readable list of what is absent (empty = all in place)."""
    missing: list[str] = []
    for table, chain in desired.chains:
        if not saved.has_chain(table, chain):
            missing.append(f"chain {table}/{chain}")
    for rule in desired.rules:
        if saved.has_chain(rule.table, rule.chain) and saved.count(rule) == 0:
            missing.append(f"{rule.table}: {rule.line()}")
    if desired.docker_user is not None:
        du = saved.chain("filter", DOCKER_USER)
        if du is not None and not rule_reachable(du, desired.docker_user):
            missing.append(f"filter: -I {DOCKER_USER} 1 {desired.docker_user.spec_text} "
                           f"(absent, or after a rule that ends the chain)")
    return missing


def settled(desired: Desired, saved: SavedTables) -> bool:
    """Whether the tables already are what a rebuild (restore_payload) would make them: nothing
    missing, each chain of ours holding our rules in order followed by the other instances', and
    each jump into them present once.  A restart that finds this writes nothing."""
    if missing_rules(desired, saved):
        return False
    foreign = foreign_rules(desired, saved)
    for table, chain in desired.chains:
        rebuilt = [r.spec_text for r in desired.rules if (r.table, r.chain) == (table, chain)]
        rebuilt += [spec for t, c, spec in foreign if (t, c) == (table, chain)]
        if saved.chain(table, chain) != rebuilt:
            return False
    owned = set(desired.chains)
    return all(saved.count(r) == 1 for r in desired.rules if (r.table, r.chain) not in owned)


def restore_payload(desired: Desired, saved: SavedTables, cleanup: list[Rule] = ()) -> str:
    """One iptables-restore --noflush batch that (re)builds everything in order, atomically.

    Declaring `:CHAIN` creates our chain or flushes it (with --noflush, only declared chains are
    flushed), so chain rules come back in order; the rules of other instances found there are
    re-added after ours in the same batch, so they never disappear, even for an instant.  Jumps
    living in chains that are not ours are deleted (every copy) and re-added, which also fixes
    their position.  `cleanup` rules are deleted if present.  `saved` must be fresh: deleting an
    absent rule fails the whole batch.
    """
    by_table: dict[str, list[str]] = {}

    def add(table: str, line: str) -> None:
        by_table.setdefault(table, []).append(line)

    owned = set(desired.chains)
    for table, chain in desired.chains:
        add(table, f":{chain} - [0:0]")
    for rule in cleanup:
        if (rule.table, rule.chain) in owned:
            continue  # flushed anyway
        for _ in range(saved.count(rule)):
            add(rule.table, rule.line("-D"))
    for rule in desired.rules:
        if (rule.table, rule.chain) not in owned:
            for _ in range(saved.count(rule)):
                add(rule.table, rule.line("-D"))
        add(rule.table, rule.line("-A"))
    for table, chain, spec in foreign_rules(desired, saved):
        add(table, f"-A {chain} {spec}")
    du = saved.chain("filter", DOCKER_USER)
    if desired.docker_user is not None and du is not None and not rule_reachable(du, desired.docker_user):
        # Only when Docker's chain lacks it or it sits where no packet reaches it: a rule that is in
        # place stays there, below whatever the administrator inserted above it since.
        for _ in range(saved.count(desired.docker_user)):
            add("filter", desired.docker_user.line("-D"))
        add("filter", f"-I {DOCKER_USER} 1 {desired.docker_user.spec_text}")
    return "".join(f"*{t}\n" + "".join(f"{l}\n" for l in lines) + "COMMIT\n" for t, lines in by_table.items())


def delete_payload(rules: list[Rule], saved: SavedTables) -> str:
    """A batch deleting each of `rules` that is present (every copy); '' if none is."""
    by_table: dict[str, list[str]] = {}
    for rule in rules:
        for _ in range(saved.count(rule)):
            by_table.setdefault(rule.table, []).append(rule.line("-D"))
    return "".join(f"*{t}\n" + "".join(f"{l}\n" for l in lines) + "COMMIT\n" for t, lines in by_table.items())


def previous_masq_rules(
    prev_network: IPNetwork | None,
    prev_subnet: IPNetwork | None,
    network: IPNetwork,
    subnet: IPNetwork,
) -> list[Rule]:
    """Masq rules built from the previous subnet.env values, when those differ from the current ones.

    Like flanneld: if network or subnet changed, the rules for (previous network, previous subnet)
    are removed before ours go in.  Both random-fully variants are listed; absent ones are skipped.
    """
    if prev_network is None or prev_subnet is None:
        return []
    if {prev_network.version, prev_subnet.version} != {network.version}:
        return []  # another family's rules live in the other tool
    if prev_network == network and prev_subnet == subnet:
        return []
    out: list[Rule] = []
    for rf in (True, False):
        for r in masq_rules(prev_network, prev_subnet, random_fully=rf):
            if r not in out:
                out.append(r)
    return out


# Rule bodies (comment and --random-fully stripped) that flanneld v0.7-v0.19 put straight into
# POSTROUTING and FORWARD, before it had its own chains.
def _legacy_bodies(network: IPNetwork, subnet: IPNetwork | None) -> dict[str, list[tuple[str, ...]]]:
    n = str(network)
    post = [
        ("-s", n, "-d", n, "-j", "RETURN"),
        ("-s", n, "!", "-d", multicast_for(network), "-j", "MASQUERADE"),
        ("!", "-s", n, "-d", n, "-j", "MASQUERADE"),
    ]
    if subnet is not None:
        post.append(("!", "-s", n, "-d", str(subnet), "-j", "RETURN"))
    fwd = [("-s", n, "-j", "ACCEPT"), ("-d", n, "-j", "ACCEPT")]
    return {"POSTROUTING": post, "FORWARD": fwd}


def _strip_extras(spec: str) -> tuple[tuple[str, ...], str | None] | None:
    try:
        toks = shlex.split(spec)
    except ValueError:
        return None
    comment = None
    out: list[str] = []
    i = 0
    while i < len(toks):
        if toks[i : i + 4][:3] == ["-m", "comment", "--comment"] and i + 3 < len(toks):
            comment = toks[i + 3]
            i += 4
            continue
        if toks[i] == "--random-fully":
            i += 1
            continue
        out.append(toks[i])
        i += 1
    return tuple(out), comment


def legacy_rules(saved: SavedTables, networks: list[tuple[IPNetwork, IPNetwork | None]]) -> list[Rule]:
    """Rules left in POSTROUTING/FORWARD by pre-v0.20 flanneld for any of `networks`, as found, and
    earlier flannelpy's unconditional jump in DOCKER-USER (LEGACY_DOCKER_USER_JUMP).

    Matches the old rule shapes with or without their comment and --random-fully; a rule carrying
    some other comment belongs to someone else and is left alone.
    """
    found: list[Rule] = []
    if saved.count(LEGACY_DOCKER_USER_JUMP):
        found.append(LEGACY_DOCKER_USER_JUMP)
    for network, subnet in networks:
        for chain, bodies in _legacy_bodies(network, subnet).items():
            table = "nat" if chain == "POSTROUTING" else "filter"
            want_comment = MASQ_COMMENT if table == "nat" else FWD_COMMENT
            for spec in saved.chain(table, chain) or []:
                parsed = _strip_extras(spec)
                if parsed is None:
                    continue
                body, comment = parsed
                if body in bodies and comment in (None, want_comment):
                    rule = Rule(table, chain, tuple(shlex.split(spec)))
                    if rule not in found:
                        found.append(rule)
    return found


def parse_version(text: str) -> tuple[int, int, int] | None:
    """'iptables v1.8.9 (nf_tables)' -> (1, 8, 9)."""
    import re

    m = re.search(r"v(\d+)\.(\d+)\.(\d+)", text)
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def save_header_version(text: str) -> str | None:
    """The first line of iptables-save's output, '# Generated by iptables-save v1.8.9 (nf_tables)
    on ...', when it names a version (iptables-save and iptables come from one package); None
    without one.  parse_version reads it as it reads `iptables --version`."""
    first = text[:text.find("\n")] if "\n" in text else text
    if first.startswith("# Generated by ") and parse_version(first) is not None:
        return first
    return None


def has_random_fully(version: tuple[int, int, int] | None) -> bool:
    """--random-fully (and iptables-restore --wait) exist from iptables 1.6.2, as go-iptables checks."""
    return version is not None and version >= (1, 6, 2)
