"""Atomic file writes: readers see the old file or the new one, never half of either.

And the check that such a write can succeed, so the agent refuses to start before it takes a
lease rather than after.
"""

from __future__ import annotations

import os
import stat
import tempfile

MOUNTINFO = "/proc/self/mountinfo"


def atomic_write(path: str, data: bytes, mode: int = 0o644, dir_mode: int = 0o755,
                 *, follow_symlinks: bool = False) -> None:
    """Write `data` to a temp file beside `path` and rename it over `path`.

    `follow_symlinks`: when `path` is a symlink, replace its target (the link stays a link);
    otherwise a symlink at `path` is itself replaced by the new file.
    """
    if follow_symlinks:
        path = os.path.realpath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=dir_mode, exist_ok=True)
        # makedirs honours the umask; readers of subnet.env (Docker units) need the directory open.
        os.chmod(directory, dir_mode)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # explicit: ignore the umask, like renameio.IgnoreUmask
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def parse_mount_points(mountinfo: str) -> set[str]:
    """Mount points listed in /proc/self/mountinfo text (field 5, octal escapes decoded)."""
    points = set()
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4:
            points.add(_unescape_octal(fields[4]))
    return points


def _unescape_octal(text: str) -> str:
    # the kernel writes space, tab, newline and backslash in paths as \040 \011 \012 \134
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 3 < len(text) and text[i + 1:i + 4].isdigit():
            out.append(chr(int(text[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _mount_points() -> set[str]:
    try:
        with open(MOUNTINFO, encoding="utf-8", errors="replace") as fh:
            return parse_mount_points(fh.read())
    except OSError:
        return set()


def nearest_existing(path: str) -> tuple[str, list[str]]:
    """(the deepest ancestor of `path` that exists, the missing directories below it, top first)."""
    missing: list[str] = []
    current = os.path.abspath(path)
    while not os.path.lexists(current):
        missing.insert(0, current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return current, missing


def replace_problem(path: str, *, follow_symlinks: bool = False) -> str | None:
    """Why atomic_write(path) would fail now, in a few words, or None when it can succeed.

    Tries what the write needs without changing anything visible: creating (and at once
    removing) a file in the directory, or a directory in the nearest existing ancestor when the
    directory is missing; opening an existing file for writing without truncating it.  A file
    that is a mount point (a bind-mounted file) cannot be replaced by a rename at all.
    """
    target = os.path.realpath(path) if follow_symlinks else os.path.abspath(path)
    try:
        st: os.stat_result | None = os.stat(target) if follow_symlinks else os.lstat(target)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        return f"cannot look at {target}: {exc.strerror}"
    if st is not None and stat.S_ISDIR(st.st_mode):
        return f"{target} is a directory"
    if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        return f"{target} is not a regular file"
    directory = os.path.dirname(target)
    base, missing = nearest_existing(directory)
    if not os.path.isdir(base):
        return f"{base} is not a directory"
    try:
        if missing:
            os.rmdir(tempfile.mkdtemp(prefix=".flannelpy-probe-", dir=base))
        else:
            fd, probe = tempfile.mkstemp(prefix=".flannelpy-probe-", dir=directory)
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        if missing:
            return f"cannot create directory {missing[0]}: {exc.strerror}"
        return f"cannot create files in {directory}: {exc.strerror}"
    if st is not None and stat.S_ISREG(st.st_mode):
        if target in _mount_points():
            return f"{target} is a mount point (bind-mounted?), which a rename cannot replace"
        try:
            os.close(os.open(target, os.O_WRONLY | os.O_NOCTTY))
        except OSError as exc:
            # as root only a read-only mount or an immutable file refuses; both stop a rename too
            return f"{target} is not writable: {exc.strerror}"
    return None
