"""daemon.json with dual stack (issue #14): "ipv6": true and "fixed-cidr-v6" from our IPv6 subnet (no root)."""

import json
from ipaddress import IPv6Network

import pytest

from flannelpy.docker.daemon_json import (
    find_flag_conflicts,
    fixed_cidr_v6_for,
    merge_daemon_json,
    update_daemon_json,
)
from flannelpy.errors import FlannelError


def test_fixed_cidr_v6_is_the_whole_ipv6_subnet():
    assert fixed_cidr_v6_for(IPv6Network("fd42:0:0:1f::/64")) == "fd42:0:0:1f::/64"


def test_merge_sets_ipv6_and_fixed_cidr_v6_keeping_other_keys_in_place():
    text, old = merge_daemon_json('{"log-driver": "journald", "ipv6": false, "mtu": 1500}', "10.42.63.1/24", 1450,
                                  fixed_cidr_v6="fd42:0:0:1f::/64")
    assert list(json.loads(text).items()) == [
        ("log-driver", "journald"), ("ipv6", True), ("mtu", 1450), ("bip", "10.42.63.1/24"),
        ("fixed-cidr-v6", "fd42:0:0:1f::/64")]
    assert old["ipv6"] is False
    # without fixed_cidr_v6 both keys are left as they are
    text, _ = merge_daemon_json('{"ipv6": true, "fixed-cidr-v6": "2001:db8::/64"}', "10.42.63.1/24", 1450)
    assert json.loads(text)["fixed-cidr-v6"] == "2001:db8::/64" and json.loads(text)["ipv6"] is True


@pytest.mark.parametrize("bad", ["fd42:0:0:1f::1/64", "fd42:0:0:1f::", "10.42.63.0/24", "banana"])
def test_bad_fixed_cidr_v6_is_refused_before_anything_is_written(tmp_path, bad):
    path = tmp_path / "daemon.json"
    path.write_text('{"bip": "10.42.63.1/24"}')
    with pytest.raises(FlannelError, match="fixed-cidr-v6 .* is not an IPv6 subnet"):
        update_daemon_json(str(path), "10.42.63.1/24", 1450, fixed_cidr_v6=bad)
    assert path.read_text() == '{"bip": "10.42.63.1/24"}'
    assert not (tmp_path / "daemon.json.flannel-backup").exists()


def test_update_writes_once_then_reports_no_change(tmp_path):
    path = str(tmp_path / "daemon.json")
    change = update_daemon_json(path, "10.42.63.1/24", 1450, fixed_cidr_v6="fd42:0:0:1f::/64")
    assert change.written and change.ipv6_changed and change.changed
    assert change.describe() == "bip=10.42.63.1/24 mtu=1450 ipv6=true fixed-cidr-v6=fd42:0:0:1f::/64"
    data = json.load(open(path))
    assert data == {"bip": "10.42.63.1/24", "mtu": 1450, "ipv6": True, "fixed-cidr-v6": "fd42:0:0:1f::/64"}
    again = update_daemon_json(path, "10.42.63.1/24", 1450, fixed_cidr_v6="fd42:0:0:1f::/64")
    assert not again.written and not again.changed
    # a new IPv6 subnet alone is a change (Docker must restart to take it)
    moved = update_daemon_json(path, "10.42.63.1/24", 1450, fixed_cidr_v6="fd42:0:0:20::/64")
    assert moved.written and moved.ipv6_changed and not moved.bip_changed
    assert moved.old_fixed_cidr_v6 == "fd42:0:0:1f::/64"


def test_ipv6_off_in_file_is_a_change(tmp_path):
    path = tmp_path / "daemon.json"
    path.write_text(json.dumps({"bip": "10.42.63.1/24", "mtu": 1450, "ipv6": False, "fixed-cidr-v6": "fd42:0:0:1f::/64"}))
    change = update_daemon_json(str(path), "10.42.63.1/24", 1450, fixed_cidr_v6="fd42:0:0:1f::/64")
    assert change.ipv6_changed and change.written and json.loads(path.read_text())["ipv6"] is True


def test_ipv6_flags_conflict_only_when_daemon_json_sets_them():
    argv = ["dockerd", "--ipv6", "--fixed-cidr-v6", "fd00::/64", "-H", "fd://"]
    assert find_flag_conflicts(argv) == []
    msgs = find_flag_conflicts(argv, ipv6=True)
    assert len(msgs) == 2
    assert "'--ipv6' and daemon.json sets \"ipv6\"" in msgs[0]
    assert "'--fixed-cidr-v6 fd00::/64' and daemon.json sets \"fixed-cidr-v6\"" in msgs[1]
    assert len(find_flag_conflicts(["dockerd", "--ipv6=true", "--fixed-cidr-v6=fd00::/64", "--bip=1.2.3.1/24"],
                                   ipv6=True)) == 3
