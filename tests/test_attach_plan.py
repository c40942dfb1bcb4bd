"""flannelctl attach's decisions: which address, and the one-line refusals (pure, no root)."""

from ipaddress import IPv4Address as A
from ipaddress import IPv4Interface
from ipaddress import IPv4Network as N

import pytest

from flannelpy.docker import attach_plan as P

SUBNET, NETWORK = N("10.5.69.0/24"), N("10.5.0.0/16")


def test_halves_split_the_lease_between_docker_and_attach():
    assert P.docker_half(SUBNET) == N("10.5.69.0/25")
    assert P.attach_half(SUBNET) == N("10.5.69.128/25")
    assert P.attach_half(N("10.5.64.0/20")) == N("10.5.72.0/21")
    assert P.gateway(SUBNET) == A("10.5.69.1")
    with pytest.raises(P.AttachError, match="too small"):
        P.attach_half(N("10.5.69.0/29"))


def test_link_names_encode_the_address_and_decode_back():
    name = P.host_link_name(A("10.5.69.200"))
    assert name == "fpa0a0545c8" and len(name) <= 15  # IFNAMSIZ
    assert P.address_of_link(name) == A("10.5.69.200")
    assert P.peer_link_name(A("10.5.69.200")) == "fpb0a0545c8"
    for other in ("docker0", "fpa", "fpa0a0545c", "fpa0a0545c8x", "fpazzzzzzzz", "veth0a0545c8"):
        assert P.address_of_link(other) is None


def test_container_ifname_is_the_first_free_eth():
    assert P.container_ifname(["lo", "eth0"]) == "eth1"
    assert P.container_ifname(["lo"]) == "eth1"
    assert P.container_ifname(["lo", "eth0", "eth1", "eth3"]) == "eth2"


def test_lowest_free_address_of_the_upper_half_when_none_is_asked():
    assert P.choose_address(SUBNET, None, {}) == A("10.5.69.128")
    taken = {A("10.5.69.128"): "x", A("10.5.69.129"): "y"}
    assert P.choose_address(SUBNET, None, taken) == A("10.5.69.130")
    full = {a: "x" for a in P.attach_half(SUBNET) if a != A("10.5.69.255")}
    with pytest.raises(P.AttachError, match=r"^no free address left in 10.5.69.128/25"):
        P.choose_address(SUBNET, None, full)


@pytest.mark.parametrize("requested, message", [
    ("10.6.1.5", r"^10.6.1.5 is outside this host's subnet 10.5.69.0/24 \(FLANNEL_SUBNET in s.env\); "
                 r"attach gives addresses from 10.5.69.128/25$"),
    ("10.5.69.20", r"^10.5.69.20 is in Docker's half of the subnet, 10.5.69.0/25 \(fixed-cidr\)"),
    ("10.5.69.1", r"^10.5.69.1 is the bridge's own address"),
    ("10.5.69.0", r"^10.5.69.0 is the network address of 10.5.69.0/24$"),
    ("10.5.69.255", r"^10.5.69.255 is the broadcast address of 10.5.69.0/24$"),
    ("10.5.69.200", r"^10.5.69.200 is already in use: attached to web$"),
    ("banana", r"^'banana' is not an IPv4 address$"),
    ("10.5.69.300", r"is not an IPv4 address"),
    ("10.5.69.201/16", r"^10.5.69.201/16: an attached address has this host's subnet's prefix length \(/24\)"),
])
def test_refusals_name_the_address_and_the_reason_in_one_line(requested, message):
    with pytest.raises(P.AttachError, match=message) as err:
        P.choose_address(SUBNET, requested, {A("10.5.69.200"): "attached to web"}, where="FLANNEL_SUBNET in s.env")
    assert "\n" not in str(err.value)


def test_requested_address_with_the_subnets_prefix_length_is_accepted():
    assert P.choose_address(SUBNET, "10.5.69.201/24", {}) == A("10.5.69.201")
    assert P.choose_address(SUBNET, "10.5.69.254", {}) == A("10.5.69.254")


def test_docker_pool_overlapping_the_attach_half_is_refused_with_the_fix():
    P.check_docker_pool(SUBNET, N("10.5.69.0/25"), "docker0")
    P.check_docker_pool(SUBNET, N("10.5.69.0/26"), "docker0")
    P.check_docker_pool(SUBNET, None, "docker0")  # no Docker to ask
    with pytest.raises(P.AttachError, match=r"^Docker allocates addresses on docker0 from 10.5.69.0/24, which "
                                            r"overlaps 10.5.69.128/25.*-docker-fixed-cidr.*10.5.69.0/25"):
        P.check_docker_pool(SUBNET, SUBNET, "docker0")


def test_plan_routes_the_network_via_the_bridge_and_adds_a_default_route_only_when_missing():
    plan = P.make_plan(A("10.5.69.130"), SUBNET, NETWORK, bridge="docker0", mtu=1450,
                       container_links=["lo", "eth0"], container_has_default_route=True)
    assert plan.address == IPv4Interface("10.5.69.130/24")
    assert (plan.gateway, plan.network, plan.container_ifname) == (A("10.5.69.1"), NETWORK, "eth1")
    assert (plan.host_link, plan.peer_link, plan.mtu, plan.default_route) == ("fpa0a054582", "fpb0a054582", 1450, False)
    bare = P.make_plan(A("10.5.69.130"), SUBNET, NETWORK, bridge="docker0", mtu=1450,
                       container_links=["lo"], container_has_default_route=False)
    assert bare.default_route and bare.container_ifname == "eth1"
