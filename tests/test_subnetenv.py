"""subnet.env: flanneld's bytes, atomic replace, and reading the previous subnet back (no root)."""

import os
import stat
from ipaddress import IPv4Network

import pytest

from flannelpy.errors import FlannelError
from flannelpy.fileutil import nearest_existing, parse_mount_points, replace_problem
from flannelpy.subnet.envfile import (
    SubnetEnv,
    check_subnet_file,
    parse_env_file,
    read_previous,
    render_subnet_env,
    subnet_env_matches,
    write_subnet_env,
)


def env(mtu=1450, masq=False, subnet="10.5.72.0/24"):
    return SubnetEnv(network=IPv4Network("10.5.0.0/16"), subnet=IPv4Network(subnet), mtu=mtu, ipmasq=masq)


def test_render_is_flanneld_bytes():
    assert render_subnet_env(env()) == (
        "FLANNEL_NETWORK=10.5.0.0/16\n"
        "FLANNEL_SUBNET=10.5.72.1/24\n"
        "FLANNEL_MTU=1450\n"
        "FLANNEL_IPMASQ=false\n"
    )
    assert render_subnet_env(env(1472, True, "172.18.9.0/24")).splitlines()[1:] == [
        "FLANNEL_SUBNET=172.18.9.1/24", "FLANNEL_MTU=1472", "FLANNEL_IPMASQ=true"]


def test_write_is_atomic_0644_and_creates_dir(tmp_path):
    path = tmp_path / "run" / "flannel" / "subnet.env"
    old_umask = os.umask(0o077)  # flanneld ignores the umask for this file
    try:
        write_subnet_env(str(path), env())
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755
    inode = path.stat().st_ino
    write_subnet_env(str(path), env(mtu=1400))
    assert path.read_text().count("FLANNEL_MTU=1400") == 1
    assert path.stat().st_ino != inode  # replaced by rename, never rewritten in place
    assert sorted(os.listdir(path.parent)) == ["subnet.env"]  # no temp file left behind


def test_read_previous(tmp_path):
    path = tmp_path / "subnet.env"
    assert read_previous(str(path)) == (None, None)
    write_subnet_env(str(path), env())
    assert read_previous(str(path)) == (IPv4Network("10.5.0.0/16"), IPv4Network("10.5.72.0/24"))


def test_read_previous_like_godotenv(tmp_path):
    path = tmp_path / "subnet.env"
    path.write_text('# written by hand\nexport FLANNEL_NETWORK="10.5.0.0/16"\nFLANNEL_SUBNET=10.5.3.1/24 # ok\n')
    assert read_previous(str(path)) == (IPv4Network("10.5.0.0/16"), IPv4Network("10.5.3.0/24"))
    path.write_text("FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.3.1/24,10.5.4.1/24\n")
    assert read_previous(str(path)) == (IPv4Network("10.5.0.0/16"), None)  # multi-valued: ignored
    path.write_text("FLANNEL_SUBNET=garbage\n")
    assert read_previous(str(path)) == (None, None)


def test_parse_env_file():
    assert parse_env_file("A=1\n\n# c\nB='x y'\nexport C=3\nnot a line\n") == {"A": "1", "B": "x y", "C": "3"}


# --- checked before the lease: can the file be written at all? -----------------------------------------


def test_check_accepts_missing_file_and_directories_and_creates_nothing(tmp_path):
    check_subnet_file(str(tmp_path / "run" / "flannel" / "subnet.env"))
    check_subnet_file(str(tmp_path / "subnet.env"))
    assert os.listdir(tmp_path) == []


def test_check_refuses_a_directory_and_a_path_under_a_file(tmp_path):
    (tmp_path / "subnet.env").mkdir()
    with pytest.raises(FlannelError, match=r"^-subnet-file=.*/subnet.env: cannot be written: .* is a directory$"):
        check_subnet_file(str(tmp_path / "subnet.env"))
    (tmp_path / "plain").write_text("")
    with pytest.raises(FlannelError, match="plain is not a directory|Not a directory"):
        check_subnet_file(str(tmp_path / "plain" / "flannel" / "subnet.env"))


def test_write_error_is_one_named_line(tmp_path):
    (tmp_path / "subnet.env").mkdir()
    with pytest.raises(FlannelError, match=r"^-subnet-file=.*subnet.env: cannot be written: Is a directory$"):
        write_subnet_env(str(tmp_path / "subnet.env"), env())


def test_matches_only_the_exact_bytes(tmp_path):
    path = tmp_path / "subnet.env"
    assert not subnet_env_matches(str(path), env())
    write_subnet_env(str(path), env())
    assert subnet_env_matches(str(path), env())
    assert not subnet_env_matches(str(path), env(mtu=1400))
    path.write_text(render_subnet_env(env()) + "# edited\n")
    assert not subnet_env_matches(str(path), env())


def test_nearest_existing_lists_what_must_be_created(tmp_path):
    assert nearest_existing(str(tmp_path / "a" / "b")) == (str(tmp_path), [str(tmp_path / "a"), str(tmp_path / "a" / "b")])
    assert nearest_existing(str(tmp_path)) == (str(tmp_path), [])


def test_mount_points_from_mountinfo_with_escapes():
    text = (
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        "98 22 0:45 /x /etc/docker/daemon.json ro,relatime - tmpfs tmpfs ro\n"
        "99 22 0:46 / /mnt/with\\040space rw - tmpfs tmpfs rw\n"
    )
    assert parse_mount_points(text) == {"/", "/etc/docker/daemon.json", "/mnt/with space"}


def test_replace_problem_follows_symlinks_only_when_asked(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "d")
    assert replace_problem(str(tmp_path / "link")) is None  # the link itself can be replaced
    assert "is a directory" in replace_problem(str(tmp_path / "link"), follow_symlinks=True)
