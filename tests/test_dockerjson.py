"""daemon.json editing and dockerd flag conflict detection (no root)."""

import json
import os

import pytest

from flannelpy.docker.daemon_json import (
    BACKUP_SUFFIX,
    check_daemon_json,
    find_flag_conflicts,
    fixed_cidr_for,
    restart_docker_if_changed,
    restore_daemon_json,
    unit_exec_starts,
    update_daemon_json,
)
from flannelpy.errors import FlannelError


def test_missing_file_and_directory_are_created(tmp_path):
    path = str(tmp_path / "etc" / "docker" / "daemon.json")
    change = update_daemon_json(path, "10.1.74.1/24", 1450)
    assert change.written and change.changed and change.bip_changed and change.mtu_changed
    assert change.backup is None
    assert json.loads(open(path).read()) == {"bip": "10.1.74.1/24", "mtu": 1450}
    assert os.stat(path).st_mode & 0o777 == 0o644


def test_other_keys_and_their_order_are_kept_and_backup_made(tmp_path):
    path = tmp_path / "daemon.json"
    original = '{"log-driver": "journald", "mtu": 1500, "storage-opts": ["a", "b"], "debug": true}\n'
    path.write_text(original)
    os.chmod(path, 0o600)
    change = update_daemon_json(str(path), "10.1.74.1/24", 1450)
    data = json.loads(path.read_text())
    assert list(data) == ["log-driver", "mtu", "storage-opts", "debug", "bip"]
    assert data == {"log-driver": "journald", "mtu": 1450, "storage-opts": ["a", "b"], "debug": True, "bip": "10.1.74.1/24"}
    assert change.bip_changed and change.mtu_changed and change.old_mtu == 1500 and change.old_bip is None
    assert change.backup == str(path) + BACKUP_SUFFIX
    assert open(change.backup).read() == original
    assert os.stat(path).st_mode & 0o777 == 0o600  # permissions of the user's file kept


def test_only_mtu_changed(tmp_path):
    path = tmp_path / "daemon.json"
    path.write_text('{"bip": "10.1.74.1/24", "mtu": 1500}')
    change = update_daemon_json(str(path), "10.1.74.1/24", 1450)
    assert change.written and not change.bip_changed and change.mtu_changed


def test_unchanged_means_no_write(tmp_path):
    path = tmp_path / "daemon.json"
    text = '{ "mtu": 1450,   "bip": "10.1.74.1/24" }'
    path.write_text(text)
    before = os.stat(path).st_mtime_ns
    change = update_daemon_json(str(path), "10.1.74.1/24", 1450)
    assert not change.written and not change.changed and change.backup is None
    assert path.read_text() == text and os.stat(path).st_mtime_ns == before
    assert not os.path.exists(str(path) + BACKUP_SUFFIX)
    assert restart_docker_if_changed(change) is None


def test_invalid_json_names_file_line_and_column_and_leaves_file(tmp_path):
    path = tmp_path / "daemon.json"
    text = '{\n  "debug": true,\n  "mtu": 1500,,\n}\n'
    path.write_text(text)
    with pytest.raises(FlannelError) as err:
        update_daemon_json(str(path), "10.1.74.1/24", 1450)
    assert str(err.value).startswith(f"{path}: not valid JSON at line 3 column 15")
    assert path.read_text() == text
    assert sorted(os.listdir(tmp_path)) == ["daemon.json"]  # no temp file, no backup


def test_not_an_object(tmp_path):
    path = tmp_path / "daemon.json"
    path.write_text('["bip"]')
    with pytest.raises(FlannelError, match=r"daemon.json: top level must be a JSON object, found list"):
        update_daemon_json(str(path), "10.1.74.1/24", 1450)
    assert path.read_text() == '["bip"]'


def test_empty_file_is_an_empty_object(tmp_path):
    path = tmp_path / "daemon.json"
    path.write_text("")
    assert update_daemon_json(str(path), "10.1.74.1/24", 1450).written
    assert json.loads(path.read_text()) == {"bip": "10.1.74.1/24", "mtu": 1450}


@pytest.mark.parametrize("bip, mtu", [("10.1.74.0/24", 1450), ("10.1.74.1", 1450), ("nonsense", 1450), ("10.1.74.1/24", 20)])
def test_bad_values_rejected_before_touching_anything(tmp_path, bip, mtu):
    path = tmp_path / "daemon.json"
    with pytest.raises(FlannelError):
        update_daemon_json(str(path), bip, mtu)
    assert not path.exists()


def test_bridge_key_conflicts_with_bip(tmp_path):
    path = tmp_path / "daemon.json"
    path.write_text('{"bridge": "br-lan"}')
    with pytest.raises(FlannelError, match='"bridge"'):
        update_daemon_json(str(path), "10.1.74.1/24", 1450)


def test_flag_conflicts_any_spelling():
    argv = ["/usr/bin/dockerd", "-H", "fd://", "--bip=10.1.2.1/24", "--mtu", "1400", "--debug"]
    msgs = find_flag_conflicts(argv)
    assert len(msgs) == 2
    assert "'--bip=10.1.2.1/24'" in msgs[0] and '"bip"' in msgs[0]
    assert "'--mtu 1400'" in msgs[1] and '"mtu"' in msgs[1]
    assert find_flag_conflicts(["dockerd", "-H", "fd://", "--containerd=/run/containerd/containerd.sock"]) == []
    assert find_flag_conflicts(["dockerd", "--bridge=docker0"]) == []
    assert len(find_flag_conflicts(["dockerd", "-b", "br0"])) == 1
    assert "$DOCKER_NETWORK_OPTIONS" in find_flag_conflicts(["/usr/bin/dockerd", "$DOCKER_NETWORK_OPTIONS"])[0]


def test_exec_start_read_from_unit_and_dropins(tmp_path):
    unit = tmp_path / "docker.service"
    unit.write_text("[Service]\nExecStart=/usr/bin/dockerd -H fd:// \\\n  --mtu=1400\n")
    (tmp_path / "docker.service.d").mkdir()
    (tmp_path / "docker.service.d" / "flannel.conf").write_text("[Service]\nExecStart=\nExecStart=/usr/bin/dockerd $DOCKER_OPT_BIP\n")
    starts = unit_exec_starts((str(unit),))
    assert starts == [["/usr/bin/dockerd", "-H", "fd://", "--mtu=1400"], ["/usr/bin/dockerd", "$DOCKER_OPT_BIP"]]
    assert sum(len(find_flag_conflicts(s)) for s in starts) == 2


def test_restart_without_systemd_returns_instruction(tmp_path):
    change = update_daemon_json(str(tmp_path / "daemon.json"), "10.1.74.1/24", 1450)
    msg = restart_docker_if_changed(change, systemd_dir=str(tmp_path / "no-systemd"))
    assert msg is not None and "restart dockerd" in msg and str(tmp_path / "daemon.json") in msg


def test_symlinked_file_stays_a_symlink_and_its_target_is_updated(tmp_path):
    (tmp_path / "managed").mkdir()
    target = tmp_path / "managed" / "daemon.json"
    target.write_text('{"debug": true}')
    link = tmp_path / "daemon.json"
    link.symlink_to(target)
    check_daemon_json(str(link))
    change = update_daemon_json(str(link), "10.1.74.1/24", 1450)
    assert os.path.islink(link) and os.readlink(link) == str(target)
    assert json.loads(target.read_text()) == {"debug": True, "bip": "10.1.74.1/24", "mtu": 1450}
    assert change.backup == str(target) + BACKUP_SUFFIX and change.target == str(target)
    assert open(change.backup).read() == '{"debug": true}'
    assert sorted(os.listdir(tmp_path)) == ["daemon.json", "managed"]


def test_dangling_symlink_creates_its_target(tmp_path):
    link = tmp_path / "daemon.json"
    link.symlink_to(tmp_path / "conf" / "docker.json")
    update_daemon_json(str(link), "10.1.74.1/24", 1450)
    assert os.path.islink(link)
    assert json.loads((tmp_path / "conf" / "docker.json").read_text())["bip"] == "10.1.74.1/24"


@pytest.mark.parametrize("text, message", [
    ('{"mtu": 1500,,}', "not valid JSON at line 1 column 14"),
    ("[" * 100_000, "nested too deeply"),
    ('"x"', "top level must be a JSON object, found str"),
    ('{"bridge": "br-lan"}', '"bridge"'),
    (b"\xff\xfe{}", "not valid UTF-8 at byte 0"),
])
def test_check_names_the_file_and_the_problem_in_one_line(tmp_path, text, message):
    path = tmp_path / "daemon.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(FlannelError) as err:
        check_daemon_json(str(path))
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value) and "\n" not in str(err.value)
    assert sorted(os.listdir(tmp_path)) == ["daemon.json"]


def test_check_refuses_a_directory_and_a_path_under_a_file(tmp_path):
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(FlannelError, match="cannot read: Is a directory"):
        check_daemon_json(str(tmp_path / "dir.json"))
    (tmp_path / "file").write_text("")
    with pytest.raises(FlannelError, match="Not a directory"):
        check_daemon_json(str(tmp_path / "file" / "docker" / "daemon.json"))
    check_daemon_json(str(tmp_path / "new" / "daemon.json"))  # a missing file and directory are fine
    assert sorted(os.listdir(tmp_path)) == ["dir.json", "file"]  # the check made nothing


@pytest.mark.parametrize("had_backup", [False, True])
def test_restore_puts_file_and_backup_back_byte_for_byte(tmp_path, had_backup):
    path = tmp_path / "daemon.json"
    path.write_bytes(b'{"debug":true}')
    if had_backup:
        (tmp_path / ("daemon.json" + BACKUP_SUFFIX)).write_bytes(b"older")
    change = update_daemon_json(str(path), "10.1.74.1/24", 1450)
    restore_daemon_json(change)
    assert path.read_bytes() == b'{"debug":true}'
    backup = tmp_path / ("daemon.json" + BACKUP_SUFFIX)
    assert backup.read_bytes() == b"older" if had_backup else not backup.exists()


def test_restore_of_a_created_file_removes_it(tmp_path):
    path = tmp_path / "daemon.json"
    restore_daemon_json(update_daemon_json(str(path), "10.1.74.1/24", 1450))
    assert not path.exists() and not (tmp_path / ("daemon.json" + BACKUP_SUFFIX)).exists()


_IN_PRIVATE_MOUNTS = """
import json, os, sys
from flannelpy.docker.daemon_json import update_daemon_json
from flannelpy.errors import FlannelError
try:
    update_daemon_json(sys.argv[1], "10.1.74.1/24", 1450)
except FlannelError as err:
    print(json.dumps(str(err)))
else:
    print(json.dumps("updated"))
"""


@pytest.mark.parametrize("what", ["file", "directory"])
def test_read_only_file_or_directory_fails_in_one_line_and_leaves_no_backup(root, tmp_path, what):
    """A read-only bind mount, made in a private mount namespace (the host's mounts are not touched)."""
    import subprocess
    import sys

    conf = tmp_path / "docker"
    conf.mkdir()
    path = conf / "daemon.json"
    path.write_text('{"debug": true}')
    ro = path if what == "file" else conf
    script = (f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} && "
              f"exec {sys.executable} -c '{_IN_PRIVATE_MOUNTS}' {path}")
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    message = json.loads(proc.stdout)
    assert message.startswith(f"{path}: cannot be updated: "), message
    assert ("mount point" if what == "file" else "Read-only file system") in message
    assert path.read_text() == '{"debug": true}'
    assert sorted(os.listdir(conf)) == ["daemon.json"]  # no backup, no temp file


# --- a real dockerd in a namespace reads what update_daemon_json wrote ---------------------------------


def test_fixed_cidr_is_the_lower_half_and_only_set_when_asked(tmp_path):
    assert fixed_cidr_for("10.1.74.1/24") == "10.1.74.0/25"
    assert fixed_cidr_for("10.1.64.1/20") == "10.1.64.0/21"
    with pytest.raises(FlannelError, match=r"^-docker-fixed-cidr: subnet 10.1.74.0/29 is too small"):
        fixed_cidr_for("10.1.74.1/29")
    path = tmp_path / "daemon.json"
    path.write_text('{"fixed-cidr": "10.9.9.0/25", "debug": true}')
    change = update_daemon_json(str(path), "10.1.74.1/24", 1450)
    assert json.loads(path.read_text())["fixed-cidr"] == "10.9.9.0/25"  # not managed: left alone...
    assert "outside bip 10.1.74.1/24: Docker ignores it" in change.warning  # ...but named when it is stale
    change = update_daemon_json(str(path), "10.1.74.1/24", 1450, fixed_cidr="10.1.74.0/25")
    assert change.written and change.fixed_cidr_changed and change.changed and change.warning is None
    assert list(json.loads(path.read_text())) == ["fixed-cidr", "debug", "bip", "mtu"]  # kept in its place
    assert change.describe() == "bip=10.1.74.1/24 mtu=1450 fixed-cidr=10.1.74.0/25"
    again = update_daemon_json(str(path), "10.1.74.1/24", 1450, fixed_cidr="10.1.74.0/25")
    assert not again.written and not again.changed


def test_docker_fixed_cidr_flag_needs_a_daemon_json():
    from flannelpy.agent import AgentOptions
    from flannelpy.config.flags import parse_flags

    with pytest.raises(FlannelError, match=r"^-docker-fixed-cidr: only with -docker-daemon-json"):
        AgentOptions.from_flags(parse_flags(["-docker-fixed-cidr"], {}))
    opts = AgentOptions.from_flags(parse_flags([], {"FLANNELD_DOCKER_FIXED_CIDR": "true",
                                                    "FLANNELD_DOCKER_DAEMON_JSON": "/etc/docker/daemon.json"}))
    assert opts.docker_fixed_cidr
    assert not AgentOptions.from_flags(parse_flags([], {})).docker_fixed_cidr


def test_ip_masq_false_when_flanneld_masquerades(tmp_path):
    path = tmp_path / "daemon.json"
    path.write_text('{"ip-masq": true}')
    change = update_daemon_json(str(path), "10.1.74.1/24", 1450, ip_masq=False)
    assert change.ip_masq_changed and change.old_ip_masq is True
    assert json.loads(path.read_text()) == {"ip-masq": False, "bip": "10.1.74.1/24", "mtu": 1450}
    assert change.describe() == "bip=10.1.74.1/24 mtu=1450 ip-masq=false"
    assert not update_daemon_json(str(path), "10.1.74.1/24", 1450, ip_masq=False).written
    # without -ip-masq the key is the user's
    assert not update_daemon_json(str(path), "10.1.74.1/24", 1450).changed
    created = tmp_path / "new.json"
    update_daemon_json(str(created), "10.1.74.1/24", 1450, ip_masq=False)
    assert json.loads(created.read_text()) == {"bip": "10.1.74.1/24", "mtu": 1450, "ip-masq": False}


@pytest.fixture
def docker_ns(root):
    import secrets
    import subprocess

    name = f"fpip-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.mark.docker
@pytest.mark.slow
def test_dockerd_takes_bip_and_mtu_from_daemon_json(docker_ns):
    import subprocess

    from dockerd import Dockerd

    workdir = f"/tmp/{docker_ns}"
    path = f"{workdir}/etc/daemon.json"
    update_daemon_json(path, "10.1.74.1/24", 1400)
    with Dockerd(docker_ns, workdir, path) as d:
        d.import_busybox()
        addr = subprocess.run(
            ["nsenter", f"--net=/var/run/netns/{docker_ns}", "ip", "-4", "-o", "addr", "show", "docker0"],
            capture_output=True, text=True, check=True,
        ).stdout
        assert "inet 10.1.74.1/24" in addr
        out = d.run("fpip-c1", ["sh", "-c", "cat /sys/class/net/eth0/mtu; ping -c1 -W2 10.1.74.1"]).stdout.decode()
        mtu, rest = out.split("\n", 1)
        assert mtu == "1400"
        assert "1 packets received" in rest
    assert not os.path.exists(workdir)
