"""Docker's daemon.json: set "bip" and "mtu" from the lease, safely.

Two more keys on request: "fixed-cidr" (the lower half of the subnet, with -docker-fixed-cidr, so that
Docker's allocations never meet `flannelctl attach`'s, see flannelpy.docker.attach_plan) and
"ip-masq": false (with -ip-masq, what mk-docker-opts.sh's --ip-masq=false does: flanneld masquerades,
and Docker's own rule, which comes first in POSTROUTING, would also rewrite container-to-container
traffic leaving for other hosts).  With dual stack, "ipv6": true and "fixed-cidr-v6" (our IPv6 subnet,
fixed_cidr_v6_for), so docker0 takes the subnet's first address, as FLANNEL_IPV6_SUBNET says, and
containers get addresses from it.

Upstream flanneld never touches Docker (mk-docker-opts.sh writes flags instead), but Docker-CE's unit
ignores those flags, so users edit daemon.json by hand.  This does it: every other key kept in
order, atomic write, the previous file kept as `<path>.flannel-backup`, and a check that dockerd is
not also given --bip/--mtu as flags (Docker refuses to start when an option is set both ways).

A symlinked daemon.json (configuration managed elsewhere) stays a symlink: its target is what is
read, backed up and replaced.  `check_daemon_json` tells, before the agent takes a lease, whether
the update can succeed, so a bad file never leaves a lease, a subnet.env or a backup behind.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import subprocess
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network, IPv6Network
from typing import Any

from flannelpy.errors import FlannelError
from flannelpy.fileutil import atomic_write, replace_problem

from .attach_plan import docker_half

DEFAULT_PATH = "/etc/docker/daemon.json"
BACKUP_SUFFIX = ".flannel-backup"
SYSTEMD_UNITS = (
    "/etc/systemd/system/docker.service",
    "/run/systemd/system/docker.service",
    "/lib/systemd/system/docker.service",
    "/usr/lib/systemd/system/docker.service",
)


@dataclass(frozen=True)
class Change:
    path: str
    old_bip: Any
    old_mtu: Any
    bip: str
    mtu: int
    written: bool  # False: file already had these values and was not touched
    backup: str | None  # where the previous version was kept, if there was one
    target: str = ""  # the file actually written: `path`, or its symlink's target
    old_raw: bytes | None = None  # the file before the update (None: there was none)
    old_backup: bytes | None = None  # the backup file before the update (None: there was none)
    fixed_cidr: str | None = None  # wanted "fixed-cidr" (None: the key is left as it is)
    old_fixed_cidr: Any = None
    ip_masq: bool | None = None  # wanted "ip-masq" (None: left as it is)
    old_ip_masq: Any = None
    fixed_cidr_v6: str | None = None  # wanted "fixed-cidr-v6", with "ipv6": true (None: both left as they are)
    old_fixed_cidr_v6: Any = None
    old_ipv6: Any = None

    @property
    def bip_changed(self) -> bool:
        return self.old_bip != self.bip

    @property
    def mtu_changed(self) -> bool:
        return self.old_mtu != self.mtu

    @property
    def fixed_cidr_changed(self) -> bool:
        return self.fixed_cidr is not None and self.old_fixed_cidr != self.fixed_cidr

    @property
    def ip_masq_changed(self) -> bool:
        return self.ip_masq is not None and self.old_ip_masq is not self.ip_masq

    @property
    def ipv6_changed(self) -> bool:
        return self.fixed_cidr_v6 is not None and (self.old_ipv6 is not True or self.old_fixed_cidr_v6 != self.fixed_cidr_v6)

    @property
    def changed(self) -> bool:
        return (self.bip_changed or self.mtu_changed or self.fixed_cidr_changed or self.ip_masq_changed
                or self.ipv6_changed)

    @property
    def warning(self) -> str | None:
        """What the user must fix for dockerd to start with this file (None: nothing)."""
        return None if self.fixed_cidr is not None else stale_fixed_cidr(self.old_fixed_cidr, self.bip)

    def describe(self) -> str:
        """The managed keys as set, for the log: `bip=10.5.69.1/24 mtu=1450 fixed-cidr=... ip-masq=false`."""
        text = f"bip={self.bip} mtu={self.mtu}"
        if self.fixed_cidr is not None:
            text += f" fixed-cidr={self.fixed_cidr}"
        if self.ip_masq is not None:
            text += f" ip-masq={str(self.ip_masq).lower()}"
        if self.fixed_cidr_v6 is not None:
            text += f" ipv6=true fixed-cidr-v6={self.fixed_cidr_v6}"
        return text


def _check_values(bip: str, mtu: int) -> None:
    try:
        iface = IPv4Interface(bip)
    except ValueError as err:
        raise FlannelError(f"bip {bip!r} is not an IPv4 address with prefix length (e.g. 10.1.74.1/24)") from err
    if "/" not in bip or iface.ip == iface.network.network_address:
        raise FlannelError(f"bip {bip!r} must be a host address with prefix length, not the network address")
    if isinstance(mtu, bool) or not isinstance(mtu, int) or not 68 <= mtu <= 65535:
        raise FlannelError(f"mtu {mtu!r} must be an integer between 68 and 65535")


def fixed_cidr_v6_for(ipv6_subnet: IPv6Network) -> str:
    """Docker's "fixed-cidr-v6" for our IPv6 subnet: all of it (Docker's bridge takes its first address,
    the FLANNEL_IPV6_SUBNET address, as gateway)."""
    return str(ipv6_subnet)


def _check_fixed_cidr_v6(value: str) -> None:
    try:
        IPv6Network(value)
        if "/" not in value:
            raise ValueError
    except ValueError:
        raise FlannelError(f"fixed-cidr-v6 {value!r} is not an IPv6 subnet such as fd42:0:0:1f::/64") from None


def parse_daemon_json(text: str, path: str) -> dict[str, Any]:
    """daemon.json text -> dict (order kept).  An empty file counts as {} like dockerd does."""
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise FlannelError(f"{path}: not valid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except RecursionError:
        raise FlannelError(f"{path}: JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise FlannelError(f"{path}: top level must be a JSON object, found {type(data).__name__}")
    return data


def _check_bridge(data: dict[str, Any], path: str) -> None:
    if data.get("bridge") not in (None, "", "docker0"):
        # dockerd: "You specified -b & --bip, mutually exclusive options"
        raise FlannelError(f"{path}: sets \"bridge\": {data['bridge']!r}, which dockerd rejects together with \"bip\"")


def fixed_cidr_for(bip: str) -> str:
    """Docker's "fixed-cidr" for -docker-fixed-cidr: the lower half of bip's subnet."""
    try:
        return str(docker_half(IPv4Interface(bip).network))
    except FlannelError as err:
        raise FlannelError(f"-docker-fixed-cidr: {err}") from None


def merge_daemon_json(text: str | None, bip: str, mtu: int, path: str = DEFAULT_PATH, *,
                      fixed_cidr: str | None = None, ip_masq: bool | None = None,
                      fixed_cidr_v6: str | None = None) -> tuple[str, dict[str, Any]]:
    """Pure: (new file text, old settings).  Existing keys keep their place; new ones go last.
    `fixed_cidr` / `ip_masq` None leave those keys as they are; `fixed_cidr_v6` sets it and "ipv6": true."""
    _check_values(bip, mtu)
    if fixed_cidr_v6 is not None:
        _check_fixed_cidr_v6(fixed_cidr_v6)
    data = parse_daemon_json(text or "", path)
    old = dict(data)
    _check_bridge(data, path)
    data["bip"] = bip
    data["mtu"] = mtu
    if fixed_cidr is not None:
        data["fixed-cidr"] = fixed_cidr
    if ip_masq is not None:
        data["ip-masq"] = ip_masq
    if fixed_cidr_v6 is not None:
        data["ipv6"] = True
        data["fixed-cidr-v6"] = fixed_cidr_v6
    return json.dumps(data, indent=2) + "\n", old


def stale_fixed_cidr(value: Any, bip: str) -> str | None:
    """A warning when a "fixed-cidr" flanneld does not manage lies outside the new bip's subnet (left
    from an earlier lease, or from -docker-fixed-cidr since turned off).  dockerd 20.10 then starts
    but ignores it, allocating from the whole subnet, which `flannelctl attach` must know."""
    if not isinstance(value, str) or not value:
        return None
    try:
        inside = IPv4Network(value, strict=False).subnet_of(IPv4Interface(bip).network)
    except (ValueError, TypeError):
        inside = False
    if inside:
        return None
    return (f"daemon.json has \"fixed-cidr\": {value!r}, outside bip {bip}: Docker ignores it and allocates "
            f"from the whole subnet; remove it, or run flanneld with -docker-fixed-cidr")


def _name(path: str, target: str) -> str:
    """The file as the user named it, and where its symlink leads if it is one."""
    return path if os.path.abspath(path) == target else f"{path} (-> {target})"


def _read(path: str) -> tuple[str, bytes | None, str | None]:
    """(real path, raw bytes or None when absent, text); FlannelError names the file and the problem."""
    target = os.path.realpath(path)
    try:
        with open(target, "rb") as fh:
            raw: bytes | None = fh.read()
    except FileNotFoundError:
        raw = None
    except OSError as err:
        raise FlannelError(f"{_name(path, target)}: cannot read: {err.strerror}") from None
    try:
        text = raw.decode("utf-8") if raw is not None else None
    except UnicodeDecodeError as err:
        raise FlannelError(f"{_name(path, target)}: not valid UTF-8 at byte {err.start}") from None
    return target, raw, text


def check_daemon_json(path: str) -> None:
    """Raise FlannelError unless update_daemon_json(path, ...) can succeed now: the file (or its
    symlink's target) is readable, a JSON object dockerd accepts together with "bip", and it and a
    backup beside it can be written.  Changes nothing."""
    target, raw, text = _read(path)
    data = parse_daemon_json(text or "", _name(path, target))
    _check_bridge(data, _name(path, target))
    problem = replace_problem(target)
    if problem is None and raw is not None:
        problem = replace_problem(target + BACKUP_SUFFIX)
    if problem is not None:
        raise FlannelError(f"{_name(path, target)}: cannot be updated: {problem}")


def update_daemon_json(path: str, bip: str, mtu: int, *, fixed_cidr: str | None = None,
                       ip_masq: bool | None = None, fixed_cidr_v6: str | None = None) -> Change:
    """Set bip/mtu (and fixed-cidr, ip-masq when given) in daemon.json; creates file and directory if
    missing; never half-writes.

    Nothing is written when both already have the wanted values.  Otherwise the previous file
    (if any) is first copied to `<path>.flannel-backup`, then the new one renamed into place; if
    that fails the backup is put back as it was, so a failed update leaves no trace.
    """
    _check_values(bip, mtu)
    target, raw, text = _read(path)
    name = _name(path, target)
    new_text, old = merge_daemon_json(text, bip, mtu, name, fixed_cidr=fixed_cidr, ip_masq=ip_masq,
                                      fixed_cidr_v6=fixed_cidr_v6)
    change_args = dict(path=path, old_bip=old.get("bip"), old_mtu=old.get("mtu"), bip=bip, mtu=mtu,
                       target=target, old_raw=raw, fixed_cidr=fixed_cidr, old_fixed_cidr=old.get("fixed-cidr"),
                       ip_masq=ip_masq, old_ip_masq=old.get("ip-masq"), fixed_cidr_v6=fixed_cidr_v6,
                       old_fixed_cidr_v6=old.get("fixed-cidr-v6"), old_ipv6=old.get("ipv6"))
    if raw is not None and not Change(**change_args, written=False, backup=None).changed:
        return Change(**change_args, written=False, backup=None)
    problem = replace_problem(target)
    if problem is not None:
        raise FlannelError(f"{name}: cannot be updated: {problem}")
    mode = 0o644
    backup = None
    old_backup = None
    try:
        if raw is not None:
            mode = os.stat(target).st_mode & 0o777
            backup = target + BACKUP_SUFFIX
            old_backup = _read_if_present(backup)
            atomic_write(backup, raw, mode=mode)
        try:
            atomic_write(target, new_text.encode(), mode=mode, dir_mode=0o755)
        except OSError:
            if backup is not None:
                _put_back(backup, old_backup, mode)
            raise
    except OSError as err:
        raise FlannelError(f"{name}: cannot be updated: {err.strerror or err}") from None
    return Change(**change_args, written=True, backup=backup, old_backup=old_backup)


def restore_daemon_json(change: Change) -> None:
    """Undo update_daemon_json: the file and its backup as they were before (start-up failed)."""
    if not change.written:
        return
    target = change.target or os.path.realpath(change.path)
    mode = os.stat(target).st_mode & 0o777 if os.path.exists(target) else 0o644
    try:
        _put_back(target, change.old_raw, mode)
        if change.backup is not None:
            _put_back(change.backup, change.old_backup, mode)
    except OSError as err:
        raise FlannelError(f"{_name(change.path, target)}: cannot restore the previous version: {err.strerror}") from None


def _read_if_present(path: str) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def _put_back(path: str, raw: bytes | None, mode: int) -> None:
    if raw is None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    else:
        atomic_write(path, raw, mode=mode)


# --- flags given to dockerd that would clash --------------------------------------------------------

_CONFLICTS = {"--bip": "bip", "--mtu": "mtu", "--bridge": "bip", "-b": "bip"}
# With fixed_cidr_v6 set: "ipv6" and "fixed-cidr-v6" are in daemon.json too.  --ipv6 is a boolean flag.
_IPV6_CONFLICTS = {"--ipv6": "ipv6", "--fixed-cidr-v6": "fixed-cidr-v6"}
_ENV_CONFLICTS = ("DOCKER_OPT_BIP", "DOCKER_OPT_MTU", "DOCKER_NETWORK_OPTIONS")


def find_flag_conflicts(cmdline: list[str], ipv6: bool = False) -> list[str]:
    """Messages for each dockerd argument that clashes with bip/mtu in daemon.json.

    Accepts `--bip=x`, `--bip x`, `--mtu=x`, `--mtu x`, and -b/--bridge (exclusive with bip).  For a
    unit's ExecStart, `$DOCKER_OPT_BIP`-style variables from mk-docker-opts.sh count too.  With
    `ipv6` (daemon.json also gets "ipv6" and "fixed-cidr-v6"), `--ipv6[=x]` and `--fixed-cidr-v6` too.
    """
    msgs: list[str] = []
    i = 0
    while i < len(cmdline):
        arg = cmdline[i]
        name, eq, value = arg.partition("=")
        if ipv6 and name in _IPV6_CONFLICTS:
            shown = arg
            if name == "--fixed-cidr-v6" and not eq and i + 1 < len(cmdline):
                shown = f"{name} {cmdline[i + 1]}"
                i += 1
            msgs.append(
                f"dockerd is started with '{shown}' and daemon.json sets \"{_IPV6_CONFLICTS[name]}\": "
                f"Docker refuses to start when an option is given both ways; remove the flag"
            )
        elif name in _CONFLICTS:
            if not eq and i + 1 < len(cmdline):
                value = cmdline[i + 1]
                shown = f"{name} {value}"
                i += 1
            else:
                shown = arg
            if name in ("--bridge", "-b"):
                if value not in ("", "docker0"):
                    msgs.append(f"dockerd is started with '{shown}', which cannot be combined with \"bip\" in daemon.json")
            else:
                msgs.append(
                    f"dockerd is started with '{shown}' and daemon.json sets \"{_CONFLICTS[name]}\": "
                    f"Docker refuses to start when an option is given both ways; remove the flag"
                )
        else:
            for var in _ENV_CONFLICTS:
                if f"${var}" in arg or f"${{{var}}}" in arg:
                    msgs.append(
                        f"dockerd's command line expands ${var} (from mk-docker-opts.sh), which would set "
                        f"--bip/--mtu as flags while daemon.json sets them; remove it"
                    )
        i += 1
    return msgs


def running_dockerd_cmdlines(proc: str = "/proc") -> list[list[str]]:
    """argv of every running dockerd."""
    out = []
    for path in glob.glob(os.path.join(proc, "[0-9]*", "cmdline")):
        try:
            with open(path, "rb") as fh:
                argv = [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
        except OSError:
            continue  # process exited, or not ours to read
        if argv and os.path.basename(argv[0]) == "dockerd":
            out.append(argv)
    return out


def unit_exec_starts(paths: tuple[str, ...] = SYSTEMD_UNITS) -> list[list[str]]:
    """ExecStart command lines of docker.service and its drop-ins (last non-empty one per file)."""
    files: list[str] = []
    for unit in paths:
        if os.path.exists(unit):
            files.append(unit)
        files += sorted(glob.glob(unit + ".d/*.conf"))
    out = []
    for f in files:
        try:
            with open(f, encoding="utf-8", errors="replace") as fh:
                text = fh.read().replace("\\\n", " ")
        except OSError:
            continue
        for line in text.splitlines():
            key, eq, value = line.strip().partition("=")
            if key.strip() == "ExecStart" and eq and value.strip():
                try:
                    out.append(shlex.split(value.strip().lstrip("-@+!:")))
                except ValueError:
                    out.append(value.split())
    return out


def detect_conflicts(ipv6: bool = False) -> list[str]:
    """Conflicts in running dockerds and in docker.service, de-duplicated."""
    msgs: list[str] = []
    for argv in running_dockerd_cmdlines() + unit_exec_starts():
        for m in find_flag_conflicts(argv, ipv6):
            if m not in msgs:
                msgs.append(m)
    return msgs


def restart_docker_if_changed(change: Change, systemd_dir: str = "/run/systemd/system") -> str | None:
    """Restart docker.service via systemd when bip/mtu changed.

    Returns None when nothing needed doing or the restart ran; otherwise the command the user
    should run (no systemd here).  A failed restart raises FlannelError.
    """
    if not change.changed:
        return None
    if os.path.isdir(systemd_dir):
        proc = subprocess.run(["systemctl", "try-restart", "docker.service"], capture_output=True, text=True)
        if proc.returncode != 0:
            why = "; ".join(line.strip() for line in proc.stderr.splitlines() if line.strip())
            raise FlannelError(f"systemctl try-restart docker.service failed (exit {proc.returncode}): {why}")
        return None
    return f"restart dockerd so it reads bip/mtu from {change.path} (e.g. 'service docker restart')"
