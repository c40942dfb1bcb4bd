"""nftables_rules for IPv6Network (EnableIPv6 with EnableNFTables, issue #14): table `ip6 flannel-ipv6`,
the same chains as flannel-ipv4 with `ip6` matches and ff00::/8; rendering, parsing, ours versus another
instance's, the switch from ip6tables (pure)."""

from ipaddress import IPv4Network
from ipaddress import IPv6Network as N6

import pytest

from flannelpy.hostnet import iptables_rules as IR
from flannelpy.hostnet import nftables_rules as R

NET6, POD6, OLD_POD6 = N6("fd42::/48"), N6("fd42:0:0:1f::/64"), N6("fd42:0:0:9::/64")
NET6_B, POD6_B = N6("fd43::/48"), N6("fd43:0:0:3::/64")
NET, POD = IPv4Network("10.5.0.0/16"), IPv4Network("10.5.72.0/24")


def ruleset(net=NET6, pod=POD6, **kw):
    kw.setdefault("masq", True)
    kw.setdefault("forward", True)
    kw.setdefault("random_fully", True)
    return R.desired_ruleset(net, pod, **kw)


def listing_of(script: str) -> R.ListedTable:
    """What `nft list table` prints after `script` ran (its last table definition)."""
    return R.parse_listing(script[script.rindex("table ip6 flannel-ipv6 {\n"):])


# What nftables 1.0.6 printed for `nft list table ip6 flannel-ipv6` after our script (tab indents).
LISTING = """table ip6 flannel-ipv6 {
\tcomment "rules for flannel-ipv6"
\tchain postrtg {
\t\tcomment "chain to manage traffic masquerading by flannel"
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tmeta mark & 0x00004000 == 0x00004000 return
\t\tip6 saddr fd42:0:0:1f::/64 ip6 daddr fd42::/48 return
\t\tip6 saddr fd42::/48 ip6 daddr fd42:0:0:1f::/64 return
\t\tip6 saddr != fd42::/48 ip6 daddr fd42:0:0:1f::/64 return
\t\tip6 saddr fd42::/48 ip6 daddr != ff00::/8 masquerade fully-random
\t\tip6 saddr != fd42::/48 ip6 daddr fd42::/48 masquerade fully-random
\t}

\tchain forward {
\t\tcomment "chain to accept flannel traffic"
\t\ttype filter hook forward priority filter; policy accept;
\t\tip6 saddr fd42::/48 accept
\t\tip6 daddr fd42::/48 accept
\t}
}
"""


def test_ipv6_masq_chain_mirrors_the_ip6tables_chain_rule_for_rule():
    chain = R.masq_chain(NET6, POD6, random_fully=True)
    assert chain.rules == (
        "meta mark & 0x00004000 == 0x00004000 return",
        "ip6 saddr fd42:0:0:1f::/64 ip6 daddr fd42::/48 return",
        "ip6 saddr fd42::/48 ip6 daddr fd42:0:0:1f::/64 return",
        "ip6 saddr != fd42::/48 ip6 daddr fd42:0:0:1f::/64 return",
        "ip6 saddr fd42::/48 ip6 daddr != ff00::/8 masquerade fully-random",
        "ip6 saddr != fd42::/48 ip6 daddr fd42::/48 masquerade fully-random",
    )
    ip6tables = [r.spec_text for r in IR.masq_rules(NET6, POD6, random_fully=True) if r.chain == IR.MASQ_CHAIN]
    assert len(ip6tables) == len(chain.rules) and "ff00::/8" in ip6tables[4]
    assert (chain.name, chain.header, chain.comment) == ("postrtg", R.MASQ_HEADER, R.MASQ_CHAIN_COMMENT)
    assert R.masq_chain(NET6, POD6, random_fully=False).rules[-1] == "ip6 saddr != fd42::/48 ip6 daddr fd42::/48 masquerade"


def test_ipv6_forward_chain_table_and_family():
    assert R.forward_chain(NET6).rules == ("ip6 saddr fd42::/48 accept", "ip6 daddr fd42::/48 accept")
    rs = ruleset()
    assert (rs.family, rs.table, [c.name for c in rs.chains]) == ("ip6", "flannel-ipv6", ["postrtg", "forward"])
    assert [(c.name, c.header) for c in rs.chains] == [(c.name, c.header) for c in R.desired_ruleset(
        NET, POD, masq=True, forward=True, random_fully=True).chains]  # the IPv4 table's chains, hooks, priorities
    assert [c.name for c in ruleset(masq=False).chains] == ["forward"]
    assert (R.family_for(NET6), R.table_for(NET6), R.family_for(NET), R.table_for(NET)) == (
        "ip6", "flannel-ipv6", "ip", "flannel-ipv4")
    # a /128 is printed bare by nft, as a /32 is
    assert R.forward_chain(N6("fd42::7/128")).rules[0] == "ip6 saddr fd42::7 accept"


def test_families_do_not_mix():
    with pytest.raises(ValueError, match="mix IPv4 and IPv6"):
        R.desired_ruleset(NET6, POD, masq=True, forward=True, random_fully=True)
    with pytest.raises(ValueError, match="mix IPv4 and IPv6"):
        ruleset(previous_network=NET)


def test_ipv6_apply_script_is_the_listing_nft_prints():
    script = R.apply_script(ruleset(), None)
    lines = script.splitlines()
    assert lines[:4] == ["table ip6 flannel-ipv6 {}", "delete table ip6 flannel-ipv6", "table ip6 flannel-ipv6 {",
                         '\tcomment "rules for flannel-ipv6"']
    assert R.differences(ruleset(), R.parse_listing(LISTING)) == []
    assert listing_of(script).chains == R.parse_listing(LISTING).chains
    assert R.differences(ruleset(), None) == ["table ip6 flannel-ipv6"]
    t = R.parse_listing(LISTING)
    del t.chains["postrtg"].rules[4]
    assert R.differences(ruleset(), t) == [
        "chain postrtg: missing ip6 saddr fd42::/48 ip6 daddr != ff00::/8 masquerade fully-random"]


def test_ipv6_rule_networks_and_is_ours():
    assert R.rule_networks("ip6 saddr != fd42::/48 ip6 daddr fd42:0:0:1f::1 return") == [
        NET6, N6("fd42:0:0:1f::1/128")]
    assert R.rule_networks('ether saddr aa:bb:cc:dd:ee:ff accept comment "fd42::/48"') == []
    assert R.rule_networks("ip6 saddr { fd42::/48, fd43::1 } accept") == [NET6, N6("fd43::1/128")]
    rs = ruleset()
    assert R.is_ours("ip6 saddr fd42:0:0:5::/64 ip6 daddr fd42::/48 return", rs)  # a stale subnet of ours
    assert not R.is_ours("ip6 saddr fd43::/48 ip6 daddr != ff00::/8 masquerade", rs)  # ff00::/8 is everyone's
    assert R.is_ours(R.KUBE_PROXY_MARK_RULE, rs)
    # one family's networks never claim the other's rules (and comparing them is no error)
    v4 = R.desired_ruleset(NET, POD, masq=True, forward=True, random_fully=True)
    assert not R.is_ours("ip6 saddr fd42::/48 accept", v4) and not R.is_ours("ip saddr 10.5.0.0/16 accept", rs)
    assert R.rule_networks("ip6 saddr ::ffff:10.5.0.1 accept") == [N6("::ffff:10.5.0.1/128")]


def test_ipv6_two_instances_previous_subnet_and_removal():
    a, b = ruleset(), ruleset(NET6_B, POD6_B)
    after_b = listing_of(R.apply_script(b, listing_of(R.apply_script(a, None))))
    assert R.differences(a, after_b) == [] and R.differences(b, after_b) == []
    after_a2 = listing_of(R.apply_script(a, after_b))
    assert R.differences(a, after_a2) == [] and R.differences(b, after_a2) == []
    assert after_a2.chains["postrtg"].rules.count(R.KUBE_PROXY_MARK_RULE) == 1
    # a rebuild for a new subnet drops the old subnet's rules, keeps b's
    old = listing_of(R.apply_script(ruleset(pod=OLD_POD6), after_b))
    new = listing_of(R.apply_script(a, old))
    assert "fd42:0:0:9::" not in "\n".join(new.chains["postrtg"].rules) and R.differences(b, new) == []
    # removal: only ours while b is there, then the whole table
    left = listing_of(R.removal_script(a, after_a2))
    assert R.differences(b, left) == [] and "fd42:" not in "\n".join(r for c in left.chains.values() for r in c.rules)
    assert R.removal_script(a, left) == ""
    assert R.removal_script(b, left) == "table ip6 flannel-ipv6 {}\ndelete table ip6 flannel-ipv6\n"
    # flannel-ipv6 as Network's (IPv4) manager sees it: ours only when empty
    assert R.removal_script(R.empty_ruleset("ip6", "flannel-ipv6"), R.parse_listing(LISTING)) == ""


SAVE6 = """*nat
:POSTROUTING ACCEPT [0:0]
:FLANNEL-POSTRTG - [0:0]
-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
-A POSTROUTING -s fd00:99::/64 -j MASQUERADE
{masq}COMMIT
*filter
:FORWARD ACCEPT [0:0]
:FLANNEL-FWD - [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD
-A DOCKER-USER -j RETURN
{fwd}COMMIT
"""


def _save6(nets):
    masq = "".join(f"-A FLANNEL-POSTRTG {r.spec_text}\n" for net, pod in nets
                   for r in IR.masq_rules(net, pod, random_fully=True) if r.chain == IR.MASQ_CHAIN)
    fwd = "".join(f"-A FLANNEL-FWD {r.spec_text}\n" for net, _ in nets
                  for r in IR.forward_rules(net) if r.chain == IR.FWD_CHAIN)
    return IR.parse_save(SAVE6.format(masq=masq, fwd=fwd))


def test_ip6tables_removal_payload_alone_and_beside_another_instance():
    payload, count = R.iptables_removal_payload(_save6([(NET6, POD6)]), NET6, POD6)
    assert "-X FLANNEL-POSTRTG" in payload and "-X FLANNEL-FWD" in payload
    assert '-D POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG' in payload
    assert "fd00:99::/64" not in payload and "DOCKER-USER" not in payload and count == 2 + 6 + 2
    payload, count = R.iptables_removal_payload(_save6([(NET6, POD6), (NET6_B, POD6_B)]), NET6, POD6)
    assert "-X" not in payload and "fd43:" not in payload and "0x4000/0x4000" not in payload and count == 5 + 2


def test_ip6tables_docker_user_payload():
    rule = IR.docker_user_rule(NET6).spec_text
    assert rule == '-s fd42::/48 -d fd42::/48 -m comment --comment "flanneld forward" -j ACCEPT'
    assert R.docker_user_payload(_save6([]), NET6) == f"*filter\n-I DOCKER-USER 1 {rule}\nCOMMIT\n"
