"""Issue #7's catalogue of malformed input, without root: bad configs, garbage leases, fuzzing.

- every malformed config gives a ConfigError whose message names the offending field;
- every garbage lease key or value gives a LeaseValueError naming what is wrong, and the
  stores' listings (real etcd on loopback, both APIs) skip it with a log line;
- property tests (hypothesis) for what tests/test_allocation.py and tests/test_lease_codec.py
  do not already cover: arbitrary input never raises anything but the named errors,
  successive allocations never overlap and never leave SubnetMin..SubnetMax (and run out
  exactly when the range is full), key and subnet.env codecs round-trip.

The lab-based half of the catalogue (the agent exiting on a bad config in etcd, skipping
garbage leases while it runs) is in tests/test_reliability.py.
"""

from __future__ import annotations

import json
import logging
import random
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flannelpy.backends import backend_class
from flannelpy.config.network import forbidden_overlap, parse_config, validate_config
from flannelpy.errors import ConfigError, LeaseValueError, OutOfSubnets
from flannelpy.subnet.allocation import plan_acquisition
from flannelpy.subnet.envfile import SubnetEnv, parse_env_file, read_previous, render_subnet_env, write_subnet_env
from flannelpy.subnet.lease import Lease, LeaseAttrs, decode_attrs, parse_subnet_key, subnet_key


def cfg(**fields) -> str:
    doc = {"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}}
    doc.update(fields)
    return json.dumps({k: v for k, v in doc.items() if v is not DROP})


DROP = object()

# (config text, text the error must contain: the field's name, and the value where it helps)
BAD_CONFIGS = [
    # not JSON / not an object
    ("", "not valid JSON"),
    ("{", "not valid JSON"),
    ('{"Network":"10.5.0.0/16",}', "not valid JSON"),
    ("\ufeff{}", "not valid JSON"),
    ('"10.5.0.0/16"', "must be a JSON object, got string"),
    ("null", "must be a JSON object, got null"),
    ("42", "must be a JSON object, got number"),
    # Network
    (cfg(Network=DROP), "Network: missing"),
    (cfg(Network=""), "Network: '' is not a CIDR"),
    (cfg(Network=["10.5.0.0/16"]), "Network: expected a string, got array"),
    (cfg(Network={"ip": "10.5.0.0"}), "Network: expected a string, got object"),
    (cfg(Network=True), "Network: expected a string, got bool"),
    (cfg(Network="10.5.0.0/33"), "Network: '10.5.0.0/33' is not a CIDR"),
    (cfg(Network="10.5.0/16"), "Network: '10.5.0/16' is not a CIDR"),
    (cfg(Network="ten.five/16"), "Network: 'ten.five/16' is not a CIDR"),
    (cfg(Network="10.5.0.0 /16"), "Network"),
    (cfg(Network="10.5.0.0/30"), "Network: 10.5.0.0/30 is too small"),
    (cfg(Network="::/0"), "Network: '::/0' is not IPv4"),
    # SubnetLen
    (cfg(SubnetLen=32), "SubnetLen: 32 is too long"),
    (cfg(SubnetLen=8), "SubnetLen: /8 is too short"),
    (cfg(SubnetLen=-24), "SubnetLen: expected a non-negative integer, got -24"),
    (cfg(SubnetLen=24.5), "SubnetLen: expected a non-negative integer, got 24.5"),
    (cfg(SubnetLen=True), "SubnetLen: expected a non-negative integer, got true"),
    (cfg(SubnetLen=[24]), "SubnetLen: expected a non-negative integer"),
    (cfg(Network="10.5.0.0/24", SubnetLen=25), "SubnetLen: /25 is too short for Network 10.5.0.0/24"),
    # SubnetMin / SubnetMax
    (cfg(SubnetMin="10.5.1.128"), "SubnetMin is not on a SubnetLen boundary: 10.5.1.128"),
    (cfg(SubnetLen=26, SubnetMin="10.5.1.32"), "SubnetMin is not on a SubnetLen boundary: 10.5.1.32 (SubnetLen /26)"),
    (cfg(SubnetMax="10.5.255.255"), "SubnetMax is not on a SubnetLen boundary: 10.5.255.255"),
    (cfg(SubnetMin="10.4.255.0"), "SubnetMin: 10.4.255.0 is not in Network 10.5.0.0/16"),
    (cfg(SubnetMax="10.6.0.0"), "SubnetMax: 10.6.0.0 is not in Network"),
    (cfg(SubnetMin="10.5.1"), "SubnetMin: '10.5.1' is not an IPv4 address"),
    (cfg(SubnetMax="10.5.1.0/24"), "SubnetMax: '10.5.1.0/24' is not an IPv4 address"),
    (cfg(SubnetMin=167051520), "SubnetMin: expected a string, got number"),
    (cfg(SubnetMax=["10.5.9.0"]), "SubnetMax: expected a string, got array"),
    (cfg(SubnetMin="10.5.20.0", SubnetMax="10.5.10.0"), "SubnetMin: 10.5.20.0 is above SubnetMax 10.5.10.0"),
    # Backend
    (cfg(Backend=DROP, backend="udp"), "Backend: expected an object"),  # the lower-case key is the same field
    (cfg(Backend=["vxlan"]), "Backend: expected an object"),
    (cfg(Backend={"VNI": 1}), "Backend.Type: missing"),
    (cfg(Backend={"Type": ""}), "Backend.Type: missing"),
    (cfg(Backend={"Type": None}), "Backend.Type: missing"),
    (cfg(Backend={"Type": ["vxlan"]}), "Backend.Type: expected a string"),
    (cfg(Backend={"Type": {"name": "vxlan"}}), "Backend.Type: expected a string"),
    # Enable* switches
    (cfg(EnableIPv4="yes"), "EnableIPv4: expected true or false"),
    (cfg(EnableIPv6=1), "EnableIPv6: expected true or false"),
    (cfg(EnableNFTables="false"), "EnableNFTables: expected true or false"),
    # Issue 12: what no config may do, however it is spelt
    ('{"Network":"10.5.0.0/16","SubnetLen":1e400}', "SubnetLen: expected a non-negative integer, got 1e400"),
    ('{"Network":"10.5.0.0/16","SubnetLen":-1e400}', "SubnetLen: expected a non-negative integer, got -1e400"),
    ('{"Network":"10.5.0.0/16","SubnetLen":NaN}', "NaN is not a JSON number"),
    ('{"Network":"10.5.0.0/16","SubnetLen":Infinity}', "Infinity is not a JSON number"),
    ('{"Network":"10.5.0.0/16","SubnetLen":' + "9" * 5000 + "}", "SubnetLen: expected a non-negative integer, got 999"),
    ('{"Network":"10.5.0.0/16","SubnetLen":' + "9" * 19 + "}", "SubnetLen: 9999999999999999999 is too long"),
    ('{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","VNI":1e400}}', "Backend.VNI: expected an integer, got 1e400"),
    (cfg(Backend={"Type": "vxlan", "VNI": 16777216}), "Backend.VNI: 16777216 is out of range (0..16777215)"),
    (cfg(Backend={"Type": "vxlan", "VNI": -1}), "Backend.VNI: -1 is out of range"),
    (cfg(Backend={"Type": "vxlan", "MTU": 100000}), "Backend.MTU: 100000 is out of range (0..65535)"),
    (cfg(Backend={"Type": "vxlan", "MTU": 100}), "Backend.MTU: 100 leaves 50 for the vxlan device"),
    (cfg(Backend={"Type": "vxlan", "Port": 65536}), "Backend.Port: 65536 is out of range (0..65535)"),
    (cfg(Backend={"Type": "vxlan", "GBP": "true"}), "Backend.GBP: expected true or false"),
    (cfg(Backend={"Type": "udp", "Port": 0}), "Backend.Port: 0 is out of range (1..65535)"),
    (cfg(Backend={"Type": "udp", "Port": 70000}), "Backend.Port: 70000 is out of range"),
    ('{"Network":"10.5.0.0/16","Deep":' + "[" * 100_000 + "]" * 100_000 + "}", "config is 200033 bytes long"),
    ('{"Network":"10.5.0.0/16","Deep":' + "[" * 1000 + "]" * 1000 + "}", "config nests 1001 levels deep"),
    ('{"Network":"10.5.0.0/16","Backend":' + '{"x":' * 40 + "1" + "}" * 40 + "}", "nests 41 levels"),
    (cfg(Network="0.0.0.0/0"), "Network: 0.0.0.0/0 overlaps \"this network\""),
    (cfg(Network="127.0.0.0/16"), "Network: 127.0.0.0/16 overlaps loopback"),
    (cfg(Network="224.1.0.0/16"), "Network: 224.1.0.0/16 overlaps multicast"),
    (cfg(Network="169.254.0.0/16"), "Network: 169.254.0.0/16 overlaps link-local"),
    (cfg(Network="240.0.0.0/8"), "Network: 240.0.0.0/8 overlaps reserved"),
    (cfg(Network="64.0.0.0/2"), "Network: 64.0.0.0/2 overlaps loopback"),
    (cfg(Network="x" * 100_000), "config is 100"),
    (cfg(Network="x" * 1000), "... (1000 characters)"),
]


def test_catalogue_is_big_enough():
    assert len(BAD_CONFIGS) >= 30


@pytest.mark.parametrize("text, message", BAD_CONFIGS, ids=range(len(BAD_CONFIGS)))
def test_bad_config_gives_a_named_config_error(text, message):
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert message in str(info.value)
    # `flannelctl config validate` reports the same problem (among possibly others).
    assert any(message in str(err) for err in validate_config(text))


@pytest.mark.parametrize("btype", ["geneve", "aws-vpc", "VXLAN2", "host_gw", "ipip", "wireguard", " vxlan"])
def test_unknown_backend_names_the_type(btype):
    config = parse_config(cfg(Backend={"Type": btype}))
    with pytest.raises(ConfigError) as info:
        backend_class(config.backend_type)
    assert "Backend.Type: unknown backend type" in str(info.value) and repr(btype.lower()) in str(info.value)


def test_bad_backend_options_name_the_option():
    # A known backend's options are checked with the config (so `flannelctl config validate` sees
    # them), each error naming Backend.<option>.
    problems = [str(e) for e in validate_config(
        cfg(Backend={"Type": "vxlan", "VNI": "one", "Port": 1.5, "DirectRouting": "yes"}))]
    assert problems == ['Backend.VNI: expected an integer, got "one"', "Backend.Port: expected an integer, got 1.5",
                        'Backend.DirectRouting: expected true or false, got "yes"']
    # An unknown backend's options are its own business (flanneld passes Backend on raw).
    config = parse_config(cfg(Backend={"Type": "geneve", "VNI": "one"}))
    with pytest.raises(ConfigError, match=r"Backend\.VNI: expected an integer"):
        config.backend_option("VNI", int, None)


# --- garbage leases ------------------------------------------------------------------------------

# Keys under <prefix>/subnets/ that are not lease keys.
BAD_KEYS = [
    "not-a-subnet", "", "10.5.1.0", "10.5.1.0-", "10.5.1.0-24-1", "10.5.1.0_24", "10.5.1.0/24",
    "10.5.1.1-24",  # host bits set
    "10.5.1.0-33", "300.5.1.0-24", "10.5.1.0-24&FC00::-64", " 10.5.1.0-24", "10.5.1.0-024x",
    # Issue 12: other spellings of a real subnet, which could replace or remove its peer's routes
    "10.5.1.0-24&fc00::-64", "010.5.1.0-24", "10.5.1.0-024", "10.5.1.0-24\n", "\u0661\u0660.5.1.0-24",
    "x" * 1000,
]

# Values at a well-formed key that are not lease values: (value, what the error says).
BAD_VALUES = [
    ("", "not valid JSON"),
    ("garbage", "not valid JSON"),
    ('{"PublicIP":"10.0.0.1"', "not valid JSON"),
    (b"\xc3\x28", "not valid JSON"),
    ("null", "must be a JSON object"),
    ('"10.0.0.1"', "must be a JSON object"),
    ('["PublicIP","10.0.0.1"]', "must be a JSON object"),
    ("{}", "PublicIP missing or not a string"),
    ('{"PublicIP":null}', "PublicIP missing or not a string"),
    ('{"PublicIP":167772161}', "PublicIP missing or not a string"),
    ('{"PublicIP":"10.0.0.256"}', "PublicIP '10.0.0.256' is not an IPv4 address"),
    ('{"PublicIP":"fd00::1"}', "is not an IPv4 address"),
    ('{"PublicIP":"10.0.0.1","BackendType":7}', "BackendType must be a string"),
    ('{"PublicIP":"10.0.0.1","BackendData":"VNI=1"}', "BackendData must be an object"),
    ('{"PublicIP":"10.0.0.1","BackendData":{"VNI":"1"}}', "BackendData.VNI '1' is not a VNI"),
    # Issue 12: values that used to escape as RecursionError, ValueError or an infinite float
    ('{"PublicIP":"10.0.0.1","x":' + "[" * 5000 + "]" * 5000 + "}", "nests 5001 levels deep"),
    ('{"PublicIP":"10.0.0.1","BackendData":{"VNI":1e400}}', "holds a number beyond any field's range"),
    ('{"PublicIP":"10.0.0.1","BackendData":{"VNI":' + "1" * 5000 + "}}", "holds a number beyond any field's range"),
    ('{"PublicIP":"10.0.0.1","BackendData":{"VNI":NaN}}', "NaN is not a JSON number"),
    ('{"PublicIP":"10.0.0.1","Pad":"' + "x" * 20000 + '"}', "bytes long, more than the limit"),
    ('{"PublicIP":"10.0.0.1","BackendData":{"VNI":true}}', "BackendData.VNI True is not a VNI"),
    ('{"PublicIP":"10.0.0.1","BackendData":{"VtepMAC":"c6:d2:32:6f:8f"}}', "VtepMAC 'c6:d2:32:6f:8f' is not a MAC"),
    ('{"PublicIP":"10.0.0.1","BackendData":{"VtepMAC":7}}', "VtepMAC 7 is not a MAC"),
    ('{"PublicIP":"10.0.0.1","PublicIPv6":["fd00::1"]}', "PublicIPv6 must be a string or null"),
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_lease_key_names_the_key(key):
    with pytest.raises(LeaseValueError) as info:
        parse_subnet_key(f"/coreos.com/network/subnets/{key}")
    assert "lease key" in str(info.value)


@pytest.mark.parametrize("raw, message", BAD_VALUES, ids=range(len(BAD_VALUES)))
def test_bad_lease_value_names_key_and_problem(raw, message):
    key = "/coreos.com/network/subnets/10.5.1.0-24"
    with pytest.raises(LeaseValueError) as info:
        decode_attrs(raw, key)
    assert message in str(info.value) and repr(key) in str(info.value)


@pytest.mark.etcd
@pytest.mark.parametrize("api", ["v3", "v2"])
async def test_store_listing_skips_every_garbage_lease_with_a_log_line(etcd, api, caplog):
    from flannelpy.etcd.select import make_store
    from flannelpy.etcd.store import EtcdOptions

    prefix = "/coreos.com/network"
    garbage: dict[str, str] = {}
    for i, (raw, _msg) in enumerate(BAD_VALUES):
        if isinstance(raw, bytes) or raw == "":
            continue  # etcdctl cannot pass these on a command line
        garbage[f"10.5.{i + 1}.0-24"] = raw
    for key in ("not-a-subnet", "10.5.1.1-24", "10.5.1.0-33", "10.5.201.0-24&fc00::-64", "010.5.202.0-24"):
        garbage[key] = '{"PublicIP":"10.0.0.9"}'
    if api == "v3":  # a v2 listing does not descend into directories at all
        garbage["evil/10.5.200.0-24"] = '{"PublicIP":"10.0.0.66"}'  # would replace the good lease below
    good = {"10.5.200.0-24": '{"PublicIP":"10.0.0.1","PublicIPv6":null,"BackendType":"vxlan",'
                             '"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}'}
    for key, value in {**garbage, **good}.items():
        path = f"{prefix}/subnets/{key}"
        if api == "v3":
            etcd.etcdctl("put", path, value)
        else:
            etcd.etcdctl("set", "--", path, value, api=2)
    store = make_store(EtcdOptions(endpoints=(etcd.endpoint,), prefix=prefix), api)
    caplog.set_level(logging.WARNING, logger="flanneld")
    try:
        leases, _rev = await store.list_leases()
        await store.list_leases()  # a re-list (after compaction, say) must not repeat the warnings
    finally:
        await store.aclose()
    assert [lease.subnet for lease in leases] == [IPv4Network("10.5.200.0/24")]
    skips = [r.getMessage() for r in caplog.records if "skipping lease" in r.getMessage()]
    assert len(skips) == len(garbage), skips
    for key in garbage:
        assert any(key in line for line in skips), key


# --- property tests ------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
_FIELD_NAMES = ["Network", "network", "SubnetLen", "SubnetMin", "SubnetMax", "Backend", "EnableIPv4", "EnableIPv6",
                "EnableNFTables", "Type"]
ipish = st.one_of(
    st.integers(0, 2**32 - 1).map(lambda n: str(IPv4Address(n))),
    st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 34)).map(lambda t: f"{IPv4Address(t[0])}/{t[1]}"),
)
config_docs = st.dictionaries(
    st.sampled_from(_FIELD_NAMES),
    st.one_of(json_values, ipish, st.integers(0, 40),
              st.fixed_dictionaries({"Type": st.sampled_from(["vxlan", "udp", "", "host-gw"]) | json_values})),
    max_size=6,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config_docs)
def test_any_config_parses_or_gives_config_error(doc):
    text = json.dumps(doc)
    try:
        config = parse_config(text)
    except ConfigError as err:
        assert str(err)
        assert validate_config(text)  # collect mode agrees that it is bad
        return
    assert validate_config(text) == []
    assert config.subnet_min <= config.subnet_max
    assert config.contains_subnet(IPv4Network((int(config.subnet_min), config.subnet_len)))
    assert IPv4Network((int(config.subnet_max), config.subnet_len)).subnet_of(config.network)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=60), st.text(max_size=60), json_values.map(json.dumps),
                 st.dictionaries(st.sampled_from(["PublicIP", "publicip", "BackendType", "BackendData", "PublicIPv6"]),
                                 st.one_of(json_values, ipish, st.dictionaries(
                                     st.sampled_from(["VNI", "VtepMAC", "vni"]), json_values, max_size=2)),
                                 max_size=4).map(json.dumps)))
def test_any_lease_value_decodes_or_gives_lease_value_error(raw):
    try:
        attrs = decode_attrs(raw, "k")
    except LeaseValueError as err:
        assert "'k'" in str(err)
        return
    assert isinstance(attrs.public_ip, IPv4Address)


@settings(max_examples=300)
@given(st.text(max_size=40))
def test_any_lease_key_parses_or_gives_lease_value_error(key):
    try:
        net = parse_subnet_key(key)
    except LeaseValueError:
        return
    assert subnet_key(net) == key.rsplit("/", 1)[-1].split("&", 1)[0]


@given(st.integers(0, 2**32 - 1), st.integers(0, 32))
def test_subnet_key_round_trips(addr, plen):
    net = IPv4Network((addr >> (32 - plen) << (32 - plen) if plen else 0, plen))
    assert parse_subnet_key(f"/p/subnets/{subnet_key(net)}") == net


@st.composite
def small_config(draw):
    prefix = draw(st.integers(16, 26))
    # 1.0.0.0 .. 126.255.255.255: clear of "this network", loopback, link-local, multicast and reserved,
    # which are refused as Networks (the catalogue above checks that).
    base = draw(st.integers(0x01000000, 0x7EFFFFFF)) >> (32 - prefix) << (32 - prefix)
    net = IPv4Network((base, prefix))
    assert forbidden_overlap(net) is None
    sublen = draw(st.integers(prefix + 2, min(prefix + 6, 30)))
    size, count = 1 << (32 - sublen), 1 << (sublen - prefix)
    lo = draw(st.integers(0, count - 1))
    hi = draw(st.integers(lo, count - 1))
    return parse_config(json.dumps({
        "Network": str(net), "SubnetLen": sublen,
        "SubnetMin": str(IPv4Address(base + lo * size)), "SubnetMax": str(IPv4Address(base + hi * size))}))


@settings(max_examples=150, deadline=None)
@given(small_config(), st.integers(0, 2**32 - 1), st.lists(st.integers(0, 200), max_size=20))
def test_successive_allocations_never_overlap_and_fill_the_range_exactly(config, seed, releases):
    """Hosts arrive one by one (some leave again); every lease fits the config, none overlap,
    and OutOfSubnets comes exactly when every subnet in SubnetMin..SubnetMax is held."""
    rng = random.Random(seed)
    capacity = (int(config.subnet_max) - int(config.subnet_min)) // config.subnet_size + 1
    held: list[Lease] = []
    for host in range(capacity + len(releases) + 2):
        if host < len(releases) and held and releases[host] % 3 == 0:
            held.pop(releases[host] % len(held))  # a host leaves, its lease expires
        ip = IPv4Address(0x0A000000 + host + 1)
        try:
            plan = plan_acquisition(config, held, ip, None, rng=rng)
        except OutOfSubnets as err:
            assert len(held) == capacity and "out of subnets" in str(err)
            break
        assert plan.reuse is None and plan.delete == ()
        new = plan.create
        assert config.contains_subnet(new)
        assert config.subnet_min <= new.network_address <= config.subnet_max
        assert not any(new.overlaps(lease.subnet) for lease in held)
        held.append(Lease(new, LeaseAttrs(ip), 1.0))
    else:
        pytest.fail("never ran out of subnets")
    assert len({lease.subnet for lease in held}) == len(held) == capacity


@settings(max_examples=200, deadline=None)
@given(small_config(), st.integers(0, 2**32 - 1), st.integers(1, 64), st.booleans())
def test_subnet_env_round_trips_to_the_previous_subnet(tmp_path_factory, config, pick, mtu, masq):
    count = (int(config.subnet_max) - int(config.subnet_min)) // config.subnet_size + 1
    subnet = IPv4Network((int(config.subnet_min) + (pick % count) * config.subnet_size, config.subnet_len))
    env = SubnetEnv(network=config.network, subnet=subnet, mtu=1500 - mtu, ipmasq=masq)
    text = render_subnet_env(env)
    values = parse_env_file(text)
    assert values["FLANNEL_MTU"] == str(1500 - mtu) and values["FLANNEL_IPMASQ"] == str(masq).lower()
    path = tmp_path_factory.mktemp("env") / "subnet.env"
    write_subnet_env(str(path), env)
    assert path.read_text() == text
    assert read_previous(str(path)) == (config.network, subnet)
