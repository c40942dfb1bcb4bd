"""Lease admission (subnet/admission.py): which peer leases reach the backend, and why not (pure, no root).

The rules one by one, the order-dependent ones (first holder keeps a subnet or a VtepMAC, a refused
lease is judged again when its blocker goes), and hypothesis properties over random event sequences:
the backend never sees overlapping subnets, a duplicate MAC or a subnet outside Network, and
removing a refused lease never removes anything the backend has.
"""

from __future__ import annotations

import time
from ipaddress import IPv4Address, IPv4Network, IPv6Network

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flannelpy.etcd.store import WatchBatch
from flannelpy.hostnet.underlay import Underlay
from flannelpy.subnet import admission as adm
from flannelpy.subnet.admission import Admission, AdmissionRules, PrefixIndex, judge_listing, underlay_warnings
from flannelpy.subnet.lease import EventKind, Lease, LeaseAttrs, LeaseEvent
from flannelpy.subnet.tracker import LeaseTracker

NETWORK = IPv4Network("10.5.0.0/16")
OWN = IPv4Network("10.5.1.0/24")
OWN_IP = IPv4Address("10.250.0.11")
OWN_MAC = "02:aa:aa:aa:aa:aa"
UNDERLAY = Underlay(
    connected=((IPv4Network("10.250.0.0/24"), "eth0"), (OWN, "cbr0")),
    addresses=((OWN_IP, "eth0"), (IPv4Address("10.5.1.1"), "cbr0")),
    gateways=((IPv4Address("10.250.0.1"), IPv4Network("0.0.0.0/0")),),
)
RULES = AdmissionRules(network=NETWORK, own_subnet=OWN, own_public_ip=OWN_IP, own_vtep_mac=OWN_MAC,
                       underlay=UNDERLAY)


def lease(net: str, ip: str = "10.250.0.12", mac: str | None = "02:00:00:00:00:02", btype: str = "vxlan") -> Lease:
    data = {"VNI": 1, "VtepMAC": mac} if mac is not None else None
    return Lease(IPv4Network(net), LeaseAttrs(IPv4Address(ip), btype, data), time.time() + 3600)


def added(x: Lease) -> LeaseEvent:
    return LeaseEvent(EventKind.ADDED, x)


def removed(x: Lease) -> LeaseEvent:
    return LeaseEvent(EventKind.REMOVED, x)


def kinds(step) -> list[tuple[str, str]]:
    return [(e.kind.value, str(e.lease.subnet)) for e in step.events]


# --- one lease against the rules ----------------------------------------------------------------

REFUSED = [
    # (lease, code, text in the reason)
    (lease("10.250.0.0/24"), adm.OUTSIDE_NETWORK, "outside Network 10.5.0.0/16"),  # the underlay's subnet
    (lease("0.0.0.0/0"), adm.OUTSIDE_NETWORK, "outside Network"),  # the default route
    (lease("192.168.77.0/24"), adm.OUTSIDE_NETWORK, "outside Network"),
    (lease("10.0.0.0/8"), adm.OUTSIDE_NETWORK, "outside Network"),  # a supernet of the Network
    (lease("10.5.0.0/16"), adm.PREFIX_LENGTH, "/18 or longer"),  # the whole Network
    (lease("10.5.0.0/17"), adm.PREFIX_LENGTH, "larger than any SubnetLen"),
    (lease("10.5.1.0/24", mac="02:00:00:00:00:09"), adm.OWN_SUBNET, "our own subnet 10.5.1.0/24"),
    (lease("10.5.1.2/32"), adm.OWN_SUBNET, "overlaps our own subnet"),  # one container's address
    (lease("10.5.0.0/18"), adm.OWN_SUBNET, "overlaps our own subnet"),  # a supernet of ours
    (lease("10.5.2.0/24", ip="127.0.0.1"), adm.PUBLIC_IP, "loopback"),
    (lease("10.5.2.0/24", ip="0.0.0.0"), adm.PUBLIC_IP, "unspecified"),
    (lease("10.5.2.0/24", ip="0.1.2.3"), adm.PUBLIC_IP, "unspecified"),
    (lease("10.5.2.0/24", ip="224.0.0.1"), adm.PUBLIC_IP, "multicast"),
    (lease("10.5.2.0/24", ip="239.255.255.250"), adm.PUBLIC_IP, "multicast"),
    (lease("10.5.2.0/24", ip="255.255.255.255"), adm.PUBLIC_IP, "the broadcast address"),
    (lease("10.5.2.0/24", ip="250.1.1.1"), adm.PUBLIC_IP, "reserved"),
    (lease("10.5.2.0/24", ip="169.254.1.1"), adm.PUBLIC_IP, "link-local"),
    (lease("10.5.2.0/24", ip="10.250.0.255"), adm.PUBLIC_IP, "broadcast address of 10.250.0.0/24 on eth0"),
    (lease("10.5.2.0/24", ip="10.250.0.0"), adm.PUBLIC_IP, "network or broadcast"),
    (lease("10.5.2.0/24", ip="10.250.0.11"), adm.OWN_ADDRESS, "an address of this host"),
    (lease("10.5.2.0/24", ip="10.5.1.1"), adm.OWN_ADDRESS, "address of this host"),
    (lease("10.5.2.0/24", ip="10.5.2.7"), adm.PUBLIC_IP, "inside the lease's own subnet"),
    (lease("10.5.2.0/24", ip="10.5.1.77"), adm.PUBLIC_IP, "inside our own subnet"),
    (lease("10.5.2.0/24", mac=None), adm.VTEP_MAC, "without a VtepMAC"),
    (lease("10.5.2.0/24", mac="00:00:00:00:00:00"), adm.VTEP_MAC, "zero"),
    (lease("10.5.2.0/24", mac="01:00:5e:00:00:01"), adm.VTEP_MAC, "multicast"),
    (lease("10.5.2.0/24", mac="ff:ff:ff:ff:ff:ff"), adm.VTEP_MAC, "broadcast"),
    (lease("10.5.2.0/24", mac=OWN_MAC), adm.VTEP_MAC, "our own device"),
]


@pytest.mark.parametrize("bad, code, text", REFUSED, ids=[f"{b.subnet}-{b.attrs.public_ip}-{c}" for b, c, _ in REFUSED])
def test_refused_with_a_reason(bad, code, text):
    step = Admission(RULES).apply([added(bad)])
    assert step.events == []
    assert len(step.refused) == 1
    refusal = step.refused[0]
    assert (refusal.code, refusal.subnet) == (code, bad.subnet)
    assert text in refusal.reason, refusal.reason


@pytest.mark.parametrize("good", [
    lease("10.5.2.0/24"),
    lease("10.5.2.0/25"),  # another SubnetLen than ours: flanneld allows SubnetLen to change with a restart
    lease("10.5.2.7/32"),
    lease("10.5.64.0/18"),
    lease("10.5.2.0/24", ip="192.0.2.9"),  # routed, not on our link: fine for vxlan
    lease("10.5.2.0/24", ip="10.250.0.99", mac=None, btype="host-gw"),
    lease("10.5.2.0/24", ip="10.250.0.99", mac=None, btype=""),  # udp
])
def test_accepted(good):
    step = Admission(RULES).apply([added(good)])
    assert step.events == [added(good)] and step.refused == []


def test_host_gw_peer_must_be_on_a_connected_network():
    rules = AdmissionRules(network=NETWORK, own_subnet=OWN, own_public_ip=OWN_IP, underlay=UNDERLAY,
                           onlink_backend="host-gw")
    far = lease("10.5.2.0/24", ip="198.51.100.7", mac=None, btype="host-gw")
    step = Admission(rules).apply([added(far)])
    assert step.events == [] and step.refused[0].code == adm.UNREACHABLE
    # The same address in a vxlan lease is not host-gw's business (a host-gw agent ignores it anyway).
    assert Admission(rules).apply([added(lease("10.5.3.0/24", ip="198.51.100.7"))]).refused == []


def test_underlay_inside_the_network_is_protected():
    """Network 10.0.0.0/8 contains the underlay 10.250.0.0/24: leases there would hijack it."""
    rules = AdmissionRules(network=IPv4Network("10.0.0.0/8"), own_subnet=OWN, own_public_ip=OWN_IP,
                           underlay=UNDERLAY)
    for net, text in [("10.250.0.0/24", "connected on eth0"), ("10.250.0.12/32", "connected on eth0"),
                      ("10.250.0.0/16", "connected on eth0"), ("10.250.0.0/25", "connected on eth0")]:
        step = Admission(rules).apply([added(lease(net, ip="192.0.2.9"))])
        assert step.events == [] and step.refused[0].code == adm.UNDERLAY and text in step.refused[0].reason
    assert Admission(rules).apply([added(lease("10.251.0.0/24"))]).refused == []
    warnings = underlay_warnings(IPv4Network("10.0.0.0/8"), UNDERLAY, "eth0", OWN_IP)
    assert warnings == [
        "Network 10.0.0.0/8 contains the network 10.250.0.0/24 connected on eth0; leases overlapping it will be refused",
        "Network 10.0.0.0/8 contains this host's address 10.250.0.11 on eth0; leases overlapping it will be refused",
        "Network 10.0.0.0/8 contains the gateway 10.250.0.1 of the default route; leases overlapping it will be refused",
    ]
    # Our own container bridge (cbr0, inside the Network) is the normal case: no warning.
    assert underlay_warnings(NETWORK, UNDERLAY, "eth0", OWN_IP) == []


def test_a_connected_network_around_the_whole_network_is_the_operators_choice():
    flat = Underlay(connected=((IPv4Network("10.0.0.0/8"), "eth0"),), addresses=((IPv4Address("10.0.0.5"), "eth0"),),
                    gateways=((IPv4Address("10.0.0.1"), IPv4Network("0.0.0.0/0")),))
    rules = AdmissionRules(network=IPv4Network("10.244.0.0/16"), underlay=flat)
    assert Admission(rules).apply([added(lease("10.244.5.0/24", ip="10.0.0.6"))]).refused == []


# --- order: first holder keeps, refused leases wait for their blocker -----------------------------


def test_overlapping_lease_is_refused_and_its_removal_removes_nothing():
    a = Admission(RULES)
    real = lease("10.5.2.0/24")
    hostile = lease("10.5.2.0/25", ip="10.250.0.66", mac="02:00:00:00:00:66")
    host32 = lease("10.5.2.5/32", ip="10.250.0.67", mac="02:00:00:00:00:67")
    assert kinds(a.apply([added(real)])) == [("added", "10.5.2.0/24")]
    step = a.apply([added(hostile), added(host32)])
    assert step.events == [] and [r.code for r in step.refused] == [adm.OVERLAP, adm.OVERLAP]
    assert step.refused[0].blocker == real.subnet
    step = a.apply([removed(hostile), removed(host32)])
    assert step.events == [] and sorted(map(str, step.cleared)) == ["10.5.2.0/25", "10.5.2.5/32"]
    assert a.accepted == {real.subnet: real}


def test_copied_vtep_mac_first_holder_keeps_it():
    a = Admission(RULES)
    real = lease("10.5.2.0/24", ip="10.250.0.12", mac="02:00:00:00:00:02")
    copy = lease("10.5.9.0/24", ip="10.250.0.66", mac="02:00:00:00:00:02")
    a.apply([added(real)])
    step = a.apply([added(copy)])
    assert step.events == [] and step.refused[0].code == adm.DUPLICATE_VTEP_MAC
    assert "belongs to the accepted lease 10.5.2.0/24" in step.refused[0].reason
    # Deleting the copy must not touch the real peer's FDB entry: nothing for the backend.
    assert a.apply([removed(copy)]).events == []
    # Now the real peer goes: a copy put meanwhile is judged again and takes the free MAC.
    a.apply([added(copy)])
    step = a.apply([removed(real)])
    assert kinds(step) == [("removed", "10.5.2.0/24"), ("added", "10.5.9.0/24")]
    assert step.readmitted == [copy] and step.cleared == [copy.subnet]


def test_refusal_is_reported_once_per_value():
    a = Admission(RULES)
    bad = lease("10.5.2.0/24", ip="127.0.0.1")
    assert len(a.apply([added(bad)]).refused) == 1
    assert a.apply([added(bad)]).refused == []  # a re-put (renewal) of the same value: quiet
    worse = lease("10.5.2.0/24", ip="224.0.0.1")
    assert len(a.apply([removed(bad), added(worse)]).refused) == 1  # a new value is news


def test_changed_value_of_an_accepted_lease_keeps_its_subnet():
    """The tracker turns a changed value into REMOVED(old), ADDED(new); a lease waiting for the
    subnet must not slip in between."""
    a = Admission(RULES)
    real = lease("10.5.2.0/24", mac="02:00:00:00:00:02")
    waiting = lease("10.5.2.0/25", ip="10.250.0.66", mac="02:00:00:00:00:66")
    a.apply([added(real)])
    a.apply([added(waiting)])
    renewed = lease("10.5.2.0/24", mac="02:00:00:00:00:22")
    step = a.apply([removed(real), added(renewed)])
    assert kinds(step) == [("removed", "10.5.2.0/24"), ("added", "10.5.2.0/24")]
    assert a.accepted == {renewed.subnet: renewed} and waiting.subnet in a.refused
    # Its old MAC is free now: a lease refused for holding it is accepted.
    b = Admission(RULES)
    b.apply([added(real)])
    b.apply([added(lease("10.5.9.0/24", ip="10.250.0.66", mac="02:00:00:00:00:02"))])
    step = b.apply([removed(real), added(renewed)])
    assert kinds(step) == [("removed", "10.5.2.0/24"), ("added", "10.5.2.0/24"), ("added", "10.5.9.0/24")]


def test_public_ip_inside_an_accepted_lease_and_subnet_containing_a_peer():
    a = Admission(RULES)
    a.apply([added(lease("10.5.2.0/24", ip="192.0.2.9"))])
    step = a.apply([added(lease("10.5.3.0/24", ip="10.5.2.50", mac="02:00:00:00:00:03"))])
    assert step.refused[0].code == adm.PUBLIC_IP and "inside the accepted lease 10.5.2.0/24" in step.refused[0].reason
    b = Admission(AdmissionRules(network=IPv4Network("10.0.0.0/8")))
    b.apply([added(lease("10.5.2.0/24", ip="10.9.0.7"))])
    step = b.apply([added(lease("10.9.0.0/24", ip="192.0.2.1", mac="02:00:00:00:00:03"))])
    assert step.refused[0].code == adm.OVERLAP and "contains PublicIP 10.9.0.7" in step.refused[0].reason


def test_judge_listing_without_own_lease():
    rules = AdmissionRules(network=NETWORK)
    listing = [lease("10.5.1.0/24", ip="10.250.0.11", mac="02:00:00:00:00:01"),
               lease("10.5.2.0/24", ip="10.250.0.12", mac="02:00:00:00:00:01"),
               lease("10.5.3.0/24", ip="127.0.0.1", mac="02:00:00:00:00:03")]
    refused = judge_listing(rules, listing)
    assert {str(k): v.code for k, v in refused.items()} == {"10.5.2.0/24": adm.DUPLICATE_VTEP_MAC,
                                                            "10.5.3.0/24": adm.PUBLIC_IP}


# --- the prefix index --------------------------------------------------------------------------

nets = st.builds(lambda addr, length: IPv4Network((addr & ((0xFFFFFFFF << (32 - length)) & 0xFFFFFFFF), length)),
                 st.integers(0, 2**32 - 1), st.integers(0, 32))


def _index_agrees_with_brute_force(bits: int, ops, probe) -> None:
    """Prefixes added and removed (each its own owner); the answers about `probe` match a scan."""
    index: PrefixIndex = PrefixIndex(bits)
    present: set = set()
    for add, net in ops:
        if add:
            index.add(net, net)
            present.add(net)
        elif net in present:
            index.remove(net, net)
            present.discard(net)
    containing = index.containing(probe)
    assert (containing is not None) == any(probe.subnet_of(n) for n in present)
    assert containing is None or probe.subnet_of(containing)
    inside = index.inside(probe)
    assert (inside is not None) == any(n != probe and n.subnet_of(probe) for n in present)
    assert inside is None or (inside.subnet_of(probe) and inside != probe)


@given(st.lists(st.tuples(st.booleans(), nets), max_size=40), nets)
def test_prefix_index_matches_brute_force(ops, probe):
    _index_agrees_with_brute_force(32, ops, probe)


@given(st.lists(st.tuples(st.booleans(), nets, st.sampled_from("abc")), max_size=40), nets)
def test_prefix_index_with_shared_prefixes_matches_brute_force(ops, probe):
    """Several owners may put the same prefix: it stays until the last of them removes it, and
    every answer names an owner that holds such an entry now."""
    index: PrefixIndex[str] = PrefixIndex()
    present: set[tuple[IPv4Network, str]] = set()
    for add, net, owner in ops:
        if add:
            index.add(net, owner)
            present.add((net, owner))
        else:
            index.remove(net, owner)
            present.discard((net, owner))
    assert len(index) == len({net for net, _ in present})
    containing = index.containing(probe)
    assert (containing is not None) == any(probe.subnet_of(n) for n, _ in present)
    assert containing is None or any(probe.subnet_of(n) and o == containing for n, o in present)
    inside = index.inside(probe)
    assert (inside is not None) == any(n != probe and n.subnet_of(probe) for n, _ in present)
    assert inside is None or any(n != probe and n.subnet_of(probe) and o == inside for n, o in present)


nets6 = st.builds(lambda addr, length: IPv6Network((addr & ((2**128 - 1) << (128 - length)) & (2**128 - 1), length)),
                  st.sampled_from([0, 2**127, 0xfd00 << 112, (0xfd00 << 112) | (0xff << 56), 2**128 - 1])
                  | st.integers(0, 2**128 - 1), st.integers(0, 128))


@given(st.lists(st.tuples(st.booleans(), nets6), max_size=40), nets6)
def test_prefix_index_v6_matches_brute_force(ops, probe):
    _index_agrees_with_brute_force(128, ops, probe)


# --- properties over random event sequences ---------------------------------------------------------

SUBNETS = ["10.5.2.0/24", "10.5.2.0/25", "10.5.2.128/25", "10.5.2.5/32", "10.5.3.0/24", "10.5.0.0/16",
           "10.5.0.0/22", "10.5.1.0/24", "10.5.1.9/32", "10.250.0.0/24", "0.0.0.0/0", "192.168.77.0/24",
           "10.5.200.0/24", "10.5.201.0/24"]
IPS = ["10.250.0.12", "10.250.0.13", "10.250.0.11", "127.0.0.1", "10.5.2.9", "10.5.200.1", "224.0.0.5"]
MACS = ["02:00:00:00:00:01", "02:00:00:00:00:02", "02:00:00:00:00:03", "01:00:5e:00:00:01", None]

etcd_ops = st.lists(st.tuples(st.sampled_from(["put", "put", "delete"]), st.sampled_from(SUBNETS),
                              st.sampled_from(IPS), st.sampled_from(MACS)), min_size=1, max_size=60)


class Backend:
    """What a backend would hold after applying the admitted events, checking each one makes sense."""

    def __init__(self) -> None:
        self.peers: dict[IPv4Network, Lease] = {}

    def apply(self, events) -> None:
        for e in events:
            if e.kind is EventKind.ADDED:
                self.peers[e.lease.subnet] = e.lease
            else:
                # A removal is always of exactly what the backend holds (never of another lease's entries).
                assert self.peers.get(e.lease.subnet) == e.lease, (e, self.peers)
                del self.peers[e.lease.subnet]

    def check_invariants(self) -> None:
        subnets = sorted(self.peers, key=lambda n: (int(n.network_address), n.prefixlen))
        for n in subnets:
            assert n.subnet_of(NETWORK) and n.prefixlen >= NETWORK.prefixlen + 2
            assert not n.overlaps(OWN)
        for x, y in zip(subnets, subnets[1:]):
            assert not x.overlaps(y), (x, y)
        macs = [p.attrs.vtep_mac for p in self.peers.values() if p.attrs.vtep_mac]
        assert len(macs) == len(set(macs)), macs
        assert all(not (int(m[:2], 16) & 1) for m in macs)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(etcd_ops, st.booleans())
def test_no_event_sequence_breaks_the_invariants(ops, batched):
    tracker = LeaseTracker(OWN)
    admission = Admission(RULES)
    backend = Backend()
    etcd: dict[IPv4Network, Lease] = {}
    batches: list[list[LeaseEvent]] = [[]]
    for op, net, ip, mac in ops:
        subnet = IPv4Network(net)
        if op == "put":
            etcd[subnet] = lease(net, ip=ip, mac=mac)
            batches[-1].append(added(etcd[subnet]))
        elif subnet in etcd:
            batches[-1].append(removed(etcd.pop(subnet)))
        if not batched:
            batches.append([])
    for batch in batches:
        step = admission.apply(tracker.update(WatchBatch(events=tuple(batch))))
        touched = {e.lease.subnet for e in batch}
        for e in step.events:
            # A removal comes only from a change at that very key (a refused lease taking over after
            # its blocker went is an addition); Backend.apply checks it removes exactly what it holds.
            if e.kind is EventKind.REMOVED:
                assert e.lease.subnet in touched
        backend.apply(step.events)
        backend.check_invariants()
        assert backend.peers == admission.accepted
    # Every lease etcd holds (but ours) is accepted or refused, and no refusal is stale.
    assert set(admission.accepted) | set(admission.refused) == set(etcd) - {OWN}
    assert not set(admission.accepted) & set(admission.refused)
    for refusal in admission.refused.values():
        assert admission.judge(refusal.lease) is not None, refusal


@settings(max_examples=100)
@given(etcd_ops)
def test_a_snapshot_agrees_with_the_events(ops):
    """After a re-list (compaction), the backend holds a consistent set again."""
    tracker, admission, backend = LeaseTracker(OWN), Admission(RULES), Backend()
    etcd: dict[IPv4Network, Lease] = {}
    for op, net, ip, mac in ops:
        subnet = IPv4Network(net)
        if op == "put":
            etcd[subnet] = lease(net, ip=ip, mac=mac)
        else:
            etcd.pop(subnet, None)
        if len(etcd) % 3 == 0:
            backend.apply(admission.apply(tracker.update(WatchBatch(snapshot=tuple(etcd.values())))).events)
            backend.check_invariants()
    backend.apply(admission.apply(tracker.update(WatchBatch(snapshot=tuple(etcd.values())))).events)
    backend.check_invariants()
    assert set(admission.accepted) | set(admission.refused) == set(etcd) - {OWN}


def _calls_per_hostile_event(peer_count: int) -> float:
    """Python and C function calls the admission makes per hostile event with `peer_count` accepted
    peers: a count, not a time, so a busy machine cannot make it fail or pass."""
    import sys

    rules = AdmissionRules(network=IPv4Network("10.0.0.0/8"), own_subnet=IPv4Network("10.0.0.0/24"))
    a = Admission(rules)
    peers = [lease(f"10.{1 + i // 256}.{i % 256}.0/24", ip=f"192.0.{i // 250}.{1 + i % 250}",
                   mac=f"02:00:00:00:{i // 256:02x}:{i % 256:02x}") for i in range(peer_count)]
    a.apply([added(p) for p in peers])
    assert len(a.accepted) == peer_count
    # each hostile lease overlaps an accepted one (a /25 inside its /24)
    hostile = [lease(f"10.{1 + i // 256}.{i % 256}.128/25", ip="192.0.100.1", mac="02:ff:00:00:00:01")
               for i in range(min(peer_count, 100))]
    events = [[added(h)] for h in hostile] + [[removed(h)] for h in hostile]
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(count)
    try:
        for batch in events:
            a.apply(batch)
    finally:
        sys.setprofile(None)
    assert len(a.accepted) == peer_count and not a.refused
    return calls / len(events)


def test_cost_per_event_does_not_grow_with_the_peers():
    """100 vs 4,000 accepted peers, then hostile events: each is a few dict look-ups, not a walk of
    the peers (a walk would multiply the calls per event by ~40)."""
    small, large = _calls_per_hostile_event(100), _calls_per_hostile_event(4000)
    assert large <= small * 1.5 + 10, f"{small:.0f} calls per event with 100 peers, {large:.0f} with 4000"


def test_refusals_show_in_status_and_metrics():
    from flannelpy.ops.metrics import Metrics
    from flannelpy.ops.state import AgentState

    state = AgentState()
    metrics = Metrics(state)
    a = Admission(RULES)
    bad = lease("10.5.2.0/24", ip="127.0.0.1")
    state.record_admission(a.apply([added(bad), added(lease("10.250.0.0/24"))]))
    doc = state.to_dict()
    assert doc["leases_refused"] == 2 and doc["leases_seen"] == 2
    assert doc["refused"]["10.5.2.0/24"] == "PublicIP 127.0.0.1 is loopback"
    text = metrics.render().decode()
    assert 'flannel_leases_refused_total{reason="public_ip"} 1.0' in text
    assert 'flannel_leases_refused_total{reason="outside_network"} 1.0' in text
    assert "flannel_peers_refused 2.0" in text
    state.record_admission(a.apply([removed(bad)]))
    assert state.to_dict()["leases_refused"] == 1
    assert "flannel_peers_refused 1.0" in metrics.render().decode()


def test_status_counts_the_peers_admission_holds():
    """leases_seen and peers_programmed come from admission's accepted leases (not a second copy
    in the state): a lease of another backend type is seen but not programmed, a refused one is
    seen, a removed one is neither, and a peer that changes backend type moves between them."""
    from flannelpy.ops.state import AgentState

    class VxlanOnly:
        @staticmethod
        def accepts(x: Lease) -> bool:
            return x.attrs.backend_type == "vxlan"

    state, a, backend = AgentState(), Admission(RULES), VxlanOnly()
    state.accepted_count = lambda: len(a.accepted)

    def feed(*events: LeaseEvent) -> None:
        step = a.apply(list(events))
        state.record_admission(step)
        state.record_events(step.events, backend)

    vx, gw = lease("10.5.2.0/24"), lease("10.5.3.0/24", ip="10.250.0.13", mac=None, btype="host-gw")
    bad = lease("10.5.4.0/24", ip="127.0.0.1", mac="02:00:00:00:00:04")
    feed(added(vx), added(gw), added(bad))
    assert (state.leases_seen, state.peers_programmed) == (3, 1)
    feed(added(vx), added(gw))  # renewals change no count
    assert (state.leases_seen, state.peers_programmed) == (3, 1)
    gw_now_vxlan = lease("10.5.3.0/24", ip="10.250.0.13", mac="02:00:00:00:00:03")
    feed(added(gw_now_vxlan))
    assert (state.leases_seen, state.peers_programmed) == (3, 2)
    feed(removed(vx), removed(bad))
    assert (state.leases_seen, state.peers_programmed) == (1, 1)
    feed(added(gw))  # back to host-gw: ignored again
    assert (state.leases_seen, state.peers_programmed) == (1, 0)
    feed(removed(gw))
    assert (state.leases_seen, state.peers_programmed) == (0, 0)


@given(st.one_of(st.integers(0, 2**32 - 1),
                 st.sampled_from([int(n.network_address) + d for n, _ in adm._SPECIAL_PUBLIC_IPS
                                  for d in (-1, 0, n.num_addresses - 1, n.num_addresses)])
                 .filter(lambda x: 0 <= x < 2**32)))
def test_the_special_address_ranges_are_the_special_networks(ip):
    # Admission checks integer ranges made from _SPECIAL_PUBLIC_IPS: the same first answer, always.
    by_network = next((what for net, what in adm._SPECIAL_PUBLIC_IPS if IPv4Address(ip) in net), None)
    by_range = next((what for first, last, what in adm._SPECIAL_PUBLIC_IP_RANGES if first <= ip <= last), None)
    assert by_range == by_network
