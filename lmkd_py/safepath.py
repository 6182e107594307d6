"""Open a directory that nobody but root and this process's user can have changed, without following a
link someone else planted: where a root daemon writes its files (the records file, rotated files).

Why every component and not just the parent: a user who owns ``/tmp/x`` can rename ``/tmp/x/sub`` away
and put a symlink or another directory in its place between two writes, so a root-owned 0755 parent is
worth nothing below a directory someone else may write. sshd's StrictModes (``safe_path`` in misc.c)
walks every component upward for the same reason; logrotate checks the parent only.

The walk opens each component with ``O_NOFOLLOW`` relative to the descriptor of the one before
(openat), and checks the descriptor it got (fstat), so what is checked is what is then used: there is no
window between the check and the use (TOCTOU) for a path lookup to be redirected.

Rules, for every directory from ``/`` down:

- its owner is root or this process's effective uid;
- it is not writable by group or others, with one exception: a root-owned directory with the sticky bit
  (``/tmp``, ``/dev/shm``) may lie *above* the target directory, because the sticky bit stops others from
  renaming or removing the entry below it, whose owner is checked in turn. The target directory itself
  may not be sticky-and-world-writable: others could plant files there under the names we rotate to;
- a symlink on the way is followed only when its owner is root or this uid (then only a trusted user can
  have made it, as with ``fs.protected_symlinks``), at most ``MAX_SYMLINKS`` times; its target is walked
  by the same rules. The final file name is never followed (callers open it with ``O_NOFOLLOW``).
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
from collections import deque
from pathlib import Path

MAX_SYMLINKS = 40  # the kernel's MAXSYMLINKS
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UntrustedPath(OSError):
    """A path this process must not write through; the message names the component and the reason."""


def trusted_uids() -> frozenset[int]:
    """The owners a file or directory on a trusted path may have: root and our effective uid."""
    return frozenset({0, os.geteuid()})


def owner_name(uid: int) -> str:
    """``uid 65534 (nobody)``, or ``uid 1234`` when the uid has no passwd entry."""
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def check_owner_and_mode(st: os.stat_result, what: str, *, allow_sticky: bool = False) -> None:
    """Raise UntrustedPath when ``st`` (of ``what``, e.g. ``directory /tmp/x``) is owned by someone other
    than root or us, or is writable by group or others (``allow_sticky``: unless root-owned and sticky)."""
    trusted = trusted_uids()
    if st.st_uid not in trusted:
        mine = " or ".join(owner_name(u) for u in sorted(trusted))
        raise UntrustedPath(f"{what} is owned by {owner_name(st.st_uid)}, not by {mine}")
    if st.st_mode & 0o022:
        if allow_sticky and st.st_mode & stat.S_ISVTX and st.st_uid == 0:
            return
        who = "group and others" if st.st_mode & 0o022 == 0o022 else "group" if st.st_mode & 0o020 else "others"
        raise UntrustedPath(f"{what} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})")


def open_trusted_dir(path: Path | str, *, create_mode: int | None = 0o750) -> int:
    """An ``O_RDONLY|O_DIRECTORY`` descriptor of ``path`` after checking every component (module rules).

    A relative ``path`` is taken from the current directory. Missing directories are created with
    ``create_mode`` (None: not created; FileNotFoundError instead). The caller closes the descriptor
    and uses it as ``dir_fd`` for everything it does inside.

    Raises UntrustedPath (names the component and the reason), or the OSError of the component that
    failed (FileNotFoundError, NotADirectoryError, PermissionError...) with that component's path.
    """
    absolute = os.path.abspath(os.fspath(path))
    todo: deque[str] = deque(p for p in absolute.split("/") if p)
    fd = os.open("/", _DIR_FLAGS)
    where = "/"
    links = 0
    try:
        _check_dir(fd, where, last=not todo)
        while todo:
            name = todo.popleft()
            if name == ".":
                continue
            try:
                nfd = _open_component(fd, name, where, create_mode)
            except _Symlink as link:
                links += 1
                if links > MAX_SYMLINKS:
                    raise UntrustedPath(f"more than {MAX_SYMLINKS} symlinks under {absolute}") from None
                todo.extendleft(reversed([p for p in link.target.split("/") if p]))
                if link.target.startswith("/"):
                    os.close(fd)
                    fd = -1
                    fd = os.open("/", _DIR_FLAGS)
                    where = "/"
                continue
            os.close(fd)
            fd = nfd
            where = os.path.normpath(os.path.join(where, name))
            _check_dir(fd, where, last=not todo)
        return fd
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise


class _Symlink(Exception):
    def __init__(self, target: str) -> None:
        self.target = target


def _open_component(dir_fd: int, name: str, where: str, create_mode: int | None) -> int:
    full = os.path.join(where, name)
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        if create_mode is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), full) from None
    except OSError as exc:
        # O_NOFOLLOW on a symlink fails with ELOOP; with O_DIRECTORY some file systems say ENOTDIR.
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise type(exc)(exc.errno, exc.strerror, full) from None
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), full) from None
        _check_link(st, full)
        raise _Symlink(os.readlink(name, dir_fd=dir_fd)) from None
    try:
        os.mkdir(name, create_mode, dir_fd=dir_fd)
    except FileExistsError:
        pass  # made by someone else meanwhile: opened and checked below like any other
    except OSError as exc:
        raise type(exc)(exc.errno, exc.strerror, full) from None
    return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


def _check_link(st: os.stat_result, full: str) -> None:
    """A symlink is followed only when root or we own it (its mode bits mean nothing)."""
    if st.st_uid not in trusted_uids():
        raise UntrustedPath(f"symlink {full} is owned by {owner_name(st.st_uid)}; not following it")


def _check_dir(fd: int, where: str, *, last: bool) -> None:
    check_owner_and_mode(os.fstat(fd), f"directory {where}", allow_sticky=not last)
