"""LeaseTracker: what to apply for watch batches and snapshots (pure, no etcd)."""

from ipaddress import IPv4Address, IPv4Network

from flannelpy.etcd.store import WatchBatch
from flannelpy.etcd.v3 import REMOVED_ATTRS
from flannelpy.subnet.lease import EventKind, Lease, LeaseAttrs, LeaseEvent
from flannelpy.subnet.tracker import LeaseTracker

OWN = IPv4Network("10.5.1.0/24")


def lease(net: str, ip: str = "10.0.0.1", mac: str = "02:00:00:00:00:01", exp: float | None = 100.0) -> Lease:
    return Lease(IPv4Network(net), LeaseAttrs(IPv4Address(ip), "vxlan", {"VNI": 1, "VtepMAC": mac}), exp)


def added(x: Lease) -> LeaseEvent:
    return LeaseEvent(EventKind.ADDED, x)


def removed(net: str) -> LeaseEvent:
    return LeaseEvent(EventKind.REMOVED, Lease(IPv4Network(net), REMOVED_ATTRS))


def summary(events):
    return [(e.kind.value, str(e.lease.subnet), str(e.lease.attrs.public_ip)) for e in events]


def test_reset_adds_peers_and_skips_own():
    t = LeaseTracker(OWN)
    out = t.reset([lease("10.5.1.0/24", "10.0.0.9"), lease("10.5.2.0/24"), lease("10.5.3.0/24", "10.0.0.3")])
    assert summary(out) == [("added", "10.5.2.0/24", "10.0.0.1"), ("added", "10.5.3.0/24", "10.0.0.3")]
    assert [p.subnet for p in t.peers] == [IPv4Network("10.5.2.0/24"), IPv4Network("10.5.3.0/24")]


def test_removal_carries_last_known_attrs():
    t = LeaseTracker(OWN)
    t.reset([lease("10.5.2.0/24", "10.0.0.2", "02:00:00:00:00:02")])
    out = t.update(WatchBatch(events=(removed("10.5.2.0/24"),)))
    assert len(out) == 1 and out[0].kind is EventKind.REMOVED
    assert out[0].lease.attrs.vtep_mac == "02:00:00:00:00:02"
    assert t.peers == []


def test_removal_of_unknown_or_own_is_dropped():
    t = LeaseTracker(OWN)
    assert t.update(WatchBatch(events=(removed("10.5.9.0/24"), removed("10.5.1.0/24")))) == []


def test_own_subnet_events_are_filtered():
    t = LeaseTracker(OWN)
    assert t.update(WatchBatch(events=(added(lease("10.5.1.0/24", "10.0.0.9")),))) == []


def test_renewal_is_reapplied_and_changed_attrs_replace():
    t = LeaseTracker(OWN)
    t.reset([lease("10.5.2.0/24")])
    # Same attrs, new expiry: ADDED again (idempotent re-program, as flanneld).
    out = t.update(WatchBatch(events=(added(lease("10.5.2.0/24", exp=200.0)),)))
    assert summary(out) == [("added", "10.5.2.0/24", "10.0.0.1")]
    assert t.get(IPv4Network("10.5.2.0/24")).expiration == 200.0
    # New MAC: REMOVED with the old attrs first, so the stale FDB entry goes.
    out = t.update(WatchBatch(events=(added(lease("10.5.2.0/24", mac="02:00:00:00:00:99")),)))
    assert [e.kind for e in out] == [EventKind.REMOVED, EventKind.ADDED]
    assert out[0].lease.attrs.vtep_mac == "02:00:00:00:00:01"
    assert out[1].lease.attrs.vtep_mac == "02:00:00:00:00:99"


def test_snapshot_diff():
    t = LeaseTracker(OWN)
    t.reset([lease("10.5.2.0/24"), lease("10.5.3.0/24", "10.0.0.3"), lease("10.5.4.0/24", "10.0.0.4")])
    snap = (
        lease("10.5.2.0/24", exp=999.0),  # only renewed: nothing to do
        lease("10.5.3.0/24", "10.0.0.33"),  # changed owner
        lease("10.5.5.0/24", "10.0.0.5"),  # new
        lease("10.5.1.0/24", "10.0.0.9"),  # our own
    )  # 10.5.4.0/24 is gone
    out = t.update(WatchBatch(snapshot=snap, revision=10))
    assert sorted(summary(out)) == sorted([
        ("removed", "10.5.3.0/24", "10.0.0.3"),
        ("added", "10.5.3.0/24", "10.0.0.33"),
        ("added", "10.5.5.0/24", "10.0.0.5"),
        ("removed", "10.5.4.0/24", "10.0.0.4"),
    ])
    assert [str(p.subnet) for p in t.peers] == ["10.5.2.0/24", "10.5.3.0/24", "10.5.5.0/24"]
    assert t.get(IPv4Network("10.5.2.0/24")).expiration == 999.0
    # A second identical snapshot changes nothing.
    assert t.update(WatchBatch(snapshot=snap)) == []


def test_empty_snapshot_removes_everything():
    t = LeaseTracker(None)
    t.reset([lease("10.5.2.0/24"), lease("10.5.3.0/24")])
    assert [e.kind for e in t.update(WatchBatch(snapshot=()))] == [EventKind.REMOVED] * 2


def test_backlog_is_applied_by_its_net_effect():
    """issue #19: batches that piled up while the backend worked are folded per subnet."""
    t = LeaseTracker(OWN)
    t.reset([lease("10.5.2.0/24", "10.0.0.2"), lease("10.5.3.0/24", "10.0.0.3")])
    backlog = [
        WatchBatch(events=(added(lease("10.5.9.0/24", "10.0.0.9")), added(lease("10.5.4.0/24", "10.0.0.4")))),
        WatchBatch(events=(removed("10.5.9.0/24"), removed("10.5.2.0/24"))),  # 9 came and went: nothing
        WatchBatch(events=(added(lease("10.5.4.0/24", "10.0.0.4")),)),  # put twice: one ADDED
        WatchBatch(events=(removed("10.5.3.0/24"), added(lease("10.5.3.0/24", "10.0.0.33", "02:00:00:00:00:33")))),
        WatchBatch(events=(added(lease("10.5.1.0/24", "10.0.0.99")),)),  # our own: never reported
    ]
    out = t.update_many(backlog)
    assert summary(out) == [  # in the order of each subnet's last change
        ("removed", "10.5.2.0/24", "10.0.0.2"),
        ("added", "10.5.4.0/24", "10.0.0.4"),
        # deleted and re-put with new attrs: the old entries go, then the new ones come
        ("removed", "10.5.3.0/24", "10.0.0.3"),
        ("added", "10.5.3.0/24", "10.0.0.33"),
    ]
    assert [str(p.subnet) for p in t.peers] == ["10.5.3.0/24", "10.5.4.0/24"]


def test_backlog_with_a_snapshot_diffs_what_came_before():
    t = LeaseTracker(OWN)
    t.reset([lease("10.5.2.0/24", "10.0.0.2")])
    out = t.update_many([
        WatchBatch(events=(added(lease("10.5.4.0/24", "10.0.0.4")),)),
        WatchBatch(snapshot=(lease("10.5.5.0/24", "10.0.0.5"),)),
        WatchBatch(events=(added(lease("10.5.6.0/24", "10.0.0.6")), removed("10.5.6.0/24"))),
    ])
    assert summary(out) == [("added", "10.5.4.0/24", "10.0.0.4"), ("added", "10.5.5.0/24", "10.0.0.5"),
                            ("removed", "10.5.2.0/24", "10.0.0.2"), ("removed", "10.5.4.0/24", "10.0.0.4")]
    assert [str(p.subnet) for p in t.peers] == ["10.5.5.0/24"]
