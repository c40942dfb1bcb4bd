"""nftables_rules: the table text, reading listings, ours versus other instances', the switch (pure)."""

from ipaddress import IPv4Network as N

import pytest

from flannelpy.hostnet import iptables_rules as IR
from flannelpy.hostnet import nftables_rules as R

NET, POD, OLD_POD = N("10.5.0.0/16"), N("10.5.72.0/24"), N("10.5.9.0/24")
NET_B, POD_B = N("10.6.0.0/16"), N("10.6.3.0/24")


def ruleset(net=NET, pod=POD, **kw):
    kw.setdefault("masq", True)
    kw.setdefault("forward", True)
    kw.setdefault("random_fully", True)
    return R.desired_ruleset(net, pod, **kw)


def listing_of(script: str) -> R.ListedTable:
    """What `nft list table` prints after `script` ran (its last table definition, nft's indent)."""
    body = script[script.index("table ip flannel-ipv4 {\n"):]
    return R.parse_listing(body)


def test_masq_chain_mirrors_the_iptables_chain_rule_for_rule():
    chain = R.masq_chain(NET, POD, random_fully=True)
    assert chain.rules == (
        "meta mark & 0x00004000 == 0x00004000 return",
        "ip saddr 10.5.72.0/24 ip daddr 10.5.0.0/16 return",
        "ip saddr 10.5.0.0/16 ip daddr 10.5.72.0/24 return",
        "ip saddr != 10.5.0.0/16 ip daddr 10.5.72.0/24 return",
        "ip saddr 10.5.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random",
        "ip saddr != 10.5.0.0/16 ip daddr 10.5.0.0/16 masquerade fully-random",
    )
    iptables = [r.spec_text for r in IR.masq_rules(NET, POD, random_fully=True) if r.chain == IR.MASQ_CHAIN]
    assert len(iptables) == len(chain.rules)
    assert chain.header == "type nat hook postrouting priority srcnat; policy accept;"
    assert R.masq_chain(NET, POD, random_fully=False).rules[-1] == "ip saddr != 10.5.0.0/16 ip daddr 10.5.0.0/16 masquerade"


def test_forward_chain_and_flanneld_names():
    chain = R.forward_chain(NET)
    assert chain.rules == ("ip saddr 10.5.0.0/16 accept", "ip daddr 10.5.0.0/16 accept")
    assert chain.header == "type filter hook forward priority filter; policy accept;"
    rs = ruleset()
    assert (rs.family, rs.table, [c.name for c in rs.chains]) == ("ip", "flannel-ipv4", ["postrtg", "forward"])
    assert [c.name for c in ruleset(masq=False).chains] == ["forward"]
    assert [c.name for c in ruleset(forward=False).chains] == ["postrtg"]


def test_apply_script_creates_deletes_and_defines_in_one_file():
    script = R.apply_script(ruleset(), None)
    lines = script.splitlines()
    assert lines[:3] == ["table ip flannel-ipv4 {}", "delete table ip flannel-ipv4", "table ip flannel-ipv4 {"]
    assert lines[3] == '\tcomment "rules for flannel-ipv4"'
    assert "\tchain postrtg {" in lines and "\tchain forward {" in lines
    assert '\t\tcomment "chain to manage traffic masquerading by flannel"' in lines
    assert lines[-1] == "}"


LISTING = """table ip flannel-ipv4 {
\tcomment "rules for flannel-ipv4"
\tset blocked {
\t\ttype ipv4_addr
\t\telements = { 192.0.2.1,
\t\t\t     192.0.2.2 }
\t}

\tchain postrtg {
\t\tcomment "chain to manage traffic masquerading by flannel"
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tmeta mark & 0x00004000 == 0x00004000 return
\t\tip saddr 10.5.72.0/24 ip daddr 10.5.0.0/16 return
\t}

\tchain mine {
\t\tip saddr @blocked drop comment "{not a block}"
\t}
}
"""


def test_parse_listing_chains_headers_and_other_blocks():
    t = R.parse_listing(LISTING)
    assert (t.family, t.name) == ("ip", "flannel-ipv4")
    assert set(t.chains) == {"postrtg", "mine"}
    assert t.chains["postrtg"].header == R.MASQ_HEADER
    assert t.chains["postrtg"].rules == ["meta mark & 0x00004000 == 0x00004000 return",
                                         "ip saddr 10.5.72.0/24 ip daddr 10.5.0.0/16 return"]
    assert t.chains["mine"].header is None and t.chains["mine"].rules == ['ip saddr @blocked drop comment "{not a block}"']
    assert len(t.other_blocks) == 1 and t.other_blocks[0][0] == "set blocked {"
    assert R.parse_listing("") is None
    with pytest.raises(ValueError):
        R.parse_listing("chain x {\n}\n")


def test_tables_in():
    out = "table ip nat\ntable ip flannel-ipv4\ntable ip6 flannel-ipv6\n"
    assert R.tables_in(out, "ip") == {"nat", "flannel-ipv4"}
    assert R.tables_in(out, "ip6") == {"flannel-ipv6"}


def test_listed_tables_and_which_ones_an_iptables_start_switches_off():
    from ipaddress import IPv6Network

    from flannelpy.hostnet import nft_tables as T

    listing = "table inet filter\ntable ip flannel-ipv4\ntable ip6 flannel-ipv6\ntable ip nat\n\ngarbage\ntable\n"
    assert T.listed_tables(listing) == {("inet", "filter"), ("ip", "flannel-ipv4"), ("ip6", "flannel-ipv6"),
                                        ("ip", "nat")}
    assert T.listed_tables("") == set()
    v4, v6 = T.tables_to_switch_off(N("10.5.0.0/16")), T.tables_to_switch_off(IPv6Network("fd00::/56"))
    assert v4 == {(R.FAMILY_V4, R.TABLE_V4), (R.FAMILY_V6, R.TABLE_V6)} and v6 == {(R.FAMILY_V6, R.TABLE_V6)}
    # the usual iptables start: a host with other tables only has nothing to remove
    assert not v4 & T.listed_tables("table inet filter\ntable ip nat\ntable ip flannel-ipv5\n")
    # a table of the same name in another family is not ours
    assert not v6 & T.listed_tables("table ip flannel-ipv6\n")
    assert v4 & T.listed_tables("table ip6 flannel-ipv6\n")  # an IPv6 table left by a dual-stack run


def test_differences_absent_wrong_hook_missing_stale():
    rs = ruleset()
    assert R.differences(rs, None) == ["table ip flannel-ipv4"]
    assert R.differences(rs, listing_of(R.apply_script(rs, None))) == []
    t = listing_of(R.apply_script(rs, None))
    t.chains["forward"].header = "type filter hook forward priority filter; policy drop;"
    del t.chains["postrtg"].rules[2]
    assert len(R.differences(rs, t)) == 2
    t = listing_of(R.apply_script(rs, None))
    t.chains["postrtg"].rules.insert(0, "ip saddr 10.5.9.0/24 ip daddr 10.5.0.0/16 return")  # previous subnet
    assert any("not ours to keep" in d for d in R.differences(rs, t))
    t = listing_of(R.apply_script(rs, None))
    t.chains["forward"].rules.reverse()
    assert R.differences(rs, t) == ["chain forward: rules out of order or repeated"]
    t = listing_of(R.apply_script(rs, None))
    del t.chains["forward"]
    assert R.differences(rs, t) == ["chain forward"]


def test_two_instances_share_the_table_without_fighting():
    a, b = ruleset(), ruleset(NET_B, POD_B)
    after_a = listing_of(R.apply_script(a, None))
    after_b = listing_of(R.apply_script(b, after_a))  # b rebuilds: a's rules kept, after b's
    assert R.differences(a, after_b) == [] and R.differences(b, after_b) == []
    after_a2 = listing_of(R.apply_script(a, after_b))
    assert R.differences(a, after_a2) == [] and R.differences(b, after_a2) == []
    post = after_a2.chains["postrtg"].rules
    assert post.count(R.KUBE_PROXY_MARK_RULE) == 1 and len(post) == 11


def test_previous_subnet_and_network_rules_are_dropped_on_rebuild():
    old = listing_of(R.apply_script(ruleset(pod=OLD_POD), None))
    new = listing_of(R.apply_script(ruleset(), old))
    assert "10.5.9.0/24" not in "\n".join(new.chains["postrtg"].rules)
    old_net = listing_of(R.apply_script(ruleset(N("10.4.0.0/16"), N("10.4.1.0/24")), None))
    new = listing_of(R.apply_script(ruleset(previous_network=N("10.4.0.0/16")), old_net))
    assert "10.4." not in "\n".join(r for c in new.chains.values() for r in c.rules)


def test_other_chains_and_sets_come_back_verbatim():
    t = R.parse_listing(LISTING)
    again = listing_of(R.apply_script(ruleset(), t))
    assert again.chains["mine"].rules == t.chains["mine"].rules
    assert again.other_blocks == t.other_blocks


def test_removal_whole_table_or_only_ours():
    a, b = ruleset(), ruleset(NET_B, POD_B)
    alone = listing_of(R.apply_script(a, None))
    assert R.removal_script(a, alone) == "table ip flannel-ipv4 {}\ndelete table ip flannel-ipv4\n"
    assert R.removal_script(a, None) == ""
    shared = listing_of(R.apply_script(b, alone))
    left = listing_of(R.removal_script(a, shared))
    assert R.differences(b, left) == []
    assert "10.5." not in "\n".join(r for c in left.chains.values() for r in c.rules)
    assert R.removal_script(a, left) == ""  # nothing of ours left: no transaction
    v6 = R.empty_ruleset("ip6", "flannel-ipv6")
    assert R.removal_script(v6, R.parse_listing("table ip6 flannel-ipv6 {\n}\n")).endswith("delete table ip6 flannel-ipv6\n")
    with_rules = R.parse_listing("table ip6 flannel-ipv6 {\nchain forward {\n"
                                 "type filter hook forward priority filter; policy accept;\nip6 saddr fd42::/48 accept\n}\n}\n")
    assert R.removal_script(v6, with_rules) == ""


def test_rule_networks_and_is_ours():
    assert R.rule_networks("ip saddr != 10.5.0.0/16 ip daddr 10.5.72.1 return") == [NET, N("10.5.72.1/32")]
    assert R.rule_networks('meta mark & 0x00004000 == 0x00004000 return comment "10.5.0.0/16"') == []
    rs = ruleset()
    assert R.is_ours("ip saddr 10.5.0.0/16 ip daddr != 224.0.0.0/4 masquerade", rs)
    assert not R.is_ours("ip saddr 10.6.0.0/16 ip daddr != 224.0.0.0/4 masquerade", rs)
    assert R.is_ours(R.KUBE_PROXY_MARK_RULE, rs)


SAVE = """*nat
:POSTROUTING ACCEPT [0:0]
:FLANNEL-POSTRTG - [0:0]
-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
-A POSTROUTING -s 192.168.0.0/16 -j MASQUERADE
{masq}COMMIT
*filter
:FORWARD ACCEPT [0:0]
:FLANNEL-FWD - [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD
-A DOCKER-USER -s 10.5.0.0/16 -d 10.5.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT
{fwd}COMMIT
"""


def _save(nets):
    masq = "".join(f"-A FLANNEL-POSTRTG {r.spec_text}\n" for net, pod in nets
                   for r in IR.masq_rules(net, pod, random_fully=True) if r.chain == IR.MASQ_CHAIN)
    fwd = "".join(f"-A FLANNEL-FWD {r.spec_text}\n" for net, _ in nets
                  for r in IR.forward_rules(net) if r.chain == IR.FWD_CHAIN)
    return IR.parse_save(SAVE.format(masq=masq, fwd=fwd))


def test_iptables_removal_alone_takes_chains_and_jumps_but_not_docker_user():
    payload, count = R.iptables_removal_payload(_save([(NET, POD)]), NET, POD)
    assert "-D POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG" in payload
    assert "-X FLANNEL-POSTRTG" in payload and "-X FLANNEL-FWD" in payload
    assert "192.168.0.0/16" not in payload and "DOCKER-USER" not in payload
    assert count == 2 + 6 + 2


def test_iptables_removal_with_another_instance_takes_only_ours():
    payload, count = R.iptables_removal_payload(_save([(NET, POD), (NET_B, POD_B)]), NET, POD)
    assert "-X" not in payload and "-j FLANNEL-POSTRTG" not in payload and "10.6." not in payload
    assert "0x4000/0x4000" not in payload  # the shared mark rule stays for the other instance
    assert count == 5 + 2
    assert R.iptables_removal_payload(IR.parse_save("*nat\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n"), NET, POD) == ("", 0)


def test_docker_user_payload_only_where_docker_user_exists_and_lacks_the_rule():
    rule = IR.docker_user_rule(NET).spec_text
    assert R.docker_user_payload(IR.parse_save("*filter\n:FORWARD ACCEPT [0:0]\nCOMMIT\n"), NET) == ""
    absent = IR.parse_save("*filter\n:DOCKER-USER - [0:0]\n-A DOCKER-USER -j RETURN\nCOMMIT\n")
    assert R.docker_user_payload(absent, NET) == f"*filter\n-I DOCKER-USER 1 {rule}\nCOMMIT\n"
    present = IR.parse_save(f"*filter\n:DOCKER-USER - [0:0]\n-A DOCKER-USER -s 10.5.9.7/32 -j DROP\n"
                            f"-A DOCKER-USER {rule}\n-A DOCKER-USER -j RETURN\nCOMMIT\n")
    assert R.docker_user_payload(present, NET) == ""  # below the administrator's DROP: left there
    unreachable = IR.parse_save(f"*filter\n:DOCKER-USER - [0:0]\n-A DOCKER-USER -j RETURN\n-A DOCKER-USER {rule}\nCOMMIT\n")
    assert R.docker_user_payload(unreachable, NET) == f"*filter\n-D DOCKER-USER {rule}\n-I DOCKER-USER 1 {rule}\nCOMMIT\n"
