"""Every ctypes system call lmkd-py makes, with errno mapped to Python exceptions.

Raised errors are ``OSError`` subclasses built with ``OSError(errno, strerror)``, so Python picks the
subclass for the errno: ESRCH -> ProcessLookupError, EPERM/EACCES -> PermissionError,
EINTR -> InterruptedError, EAGAIN -> BlockingIOError; EINVAL, ENOSYS and EBADF stay plain OSError with
``.errno`` set. Callers decide by ``exc.errno``.
"""

from __future__ import annotations

import ctypes
import os
import platform
import signal
from typing import Protocol

# Syscall numbers. x86_64 and every asm-generic architecture (arm64 included) share these numbers
# for the calls added since 5.1 (the unified syscall table, see include/uapi/asm-generic/unistd.h).
_NR_BY_ARCH: dict[str, dict[str, int]] = {
    "x86_64": {"pidfd_send_signal": 424, "pidfd_open": 434, "process_mrelease": 448},
    "aarch64": {"pidfd_send_signal": 424, "pidfd_open": 434, "process_mrelease": 448},
}

MCL_CURRENT = 1
MCL_FUTURE = 2
MCL_ONFAULT = 4


class UnsupportedArchitecture(RuntimeError):
    """lmkd-py has no syscall table for this machine."""


class Syscalls(Protocol):
    """The kernel calls the kill path needs; a fake implements the same methods in tests."""

    def pidfd_open(self, pid: int, flags: int = 0) -> int:
        """Return a pidfd for ``pid``. Raises ProcessLookupError when no such process."""
        ...

    def pidfd_send_signal(self, pidfd: int, sig: int) -> None:
        """Send ``sig`` through ``pidfd``. Raises ProcessLookupError when the process has exited."""
        ...

    def process_mrelease(self, pidfd: int, flags: int = 0) -> int:
        """Reap the dying process' memory now; returns 0. Raises OSError with the errno."""
        ...

    def mlockall(self, flags: int) -> None:
        """Lock our pages in memory."""
        ...


def syscall_numbers(machine: str | None = None) -> dict[str, int]:
    """The syscall numbers for ``machine`` (default: this one, as ``uname -m`` says).

    Raises UnsupportedArchitecture naming the machine and the ones that are known.
    """
    arch = machine or platform.machine()
    try:
        return _NR_BY_ARCH[arch]
    except KeyError:
        known = ", ".join(sorted(_NR_BY_ARCH))
        raise UnsupportedArchitecture(
            f"lmkd-py has no syscall numbers for architecture {arch!r} (known: {known})"
        ) from None


def _raise_errno(err: int, what: str) -> None:
    raise OSError(err, f"{what}: {os.strerror(err)}")


class LinuxSyscalls:
    """The real calls, through libc's ``syscall(2)``. ctypes releases the GIL around each call."""

    def __init__(self, machine: str | None = None) -> None:
        self._nr = syscall_numbers(machine)
        libc = ctypes.CDLL(None, use_errno=True)
        self._syscall = libc.syscall
        self._syscall.restype = ctypes.c_long
        self._mlockall = libc.mlockall
        self._mlockall.argtypes = [ctypes.c_int]
        self._mlockall.restype = ctypes.c_int

    def _call(self, name: str, *args: int) -> int:
        ret = int(self._syscall(ctypes.c_long(self._nr[name]), *(ctypes.c_long(a) for a in args)))
        if ret == -1:
            _raise_errno(ctypes.get_errno(), name)
        return ret

    def pidfd_open(self, pid: int, flags: int = 0) -> int:
        return self._call("pidfd_open", pid, flags)

    def pidfd_send_signal(self, pidfd: int, sig: int) -> None:
        # info=NULL: the kernel fills a siginfo as for kill(2); flags must be 0.
        self._call("pidfd_send_signal", pidfd, int(sig), 0, 0)

    def process_mrelease(self, pidfd: int, flags: int = 0) -> int:
        return self._call("process_mrelease", pidfd, flags)

    def mlockall(self, flags: int) -> None:
        if self._mlockall(flags) != 0:
            _raise_errno(ctypes.get_errno(), "mlockall")


SIGKILL = int(signal.SIGKILL)


# glibc's mallopt(3) parameter: at most this many malloc arenas. Each thread that allocates otherwise gets
# an arena of its own, reserved 64 MiB at a time (HEAP_MAX_SIZE on 64-bit), which mlockall(MCL_FUTURE)
# flags as locked (VmLck) although nothing there is touched (issue 13: VmLck 187 MiB).
M_ARENA_MAX = -8


def prepare_heap_for_locking() -> bool:
    """Before mlockall: one malloc arena for every thread, and the heap's free pages handed back
    (``malloc_trim``), so that what start-up allocated and freed is not locked. glibc only: False where
    the C library lacks either call (musl), which costs only memory."""
    try:
        libc = ctypes.CDLL(None)
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    malloc_trim.argtypes, malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    ok = bool(mallopt(M_ARENA_MAX, 1) == 1)
    malloc_trim(0)
    return ok
