"""Process exit events from the kernel's proc connector, for the kernel's own exit timestamp.

A plain ``socket(AF_NETLINK, SOCK_DGRAM, NETLINK_CONNECTOR)`` bound to group ``CN_IDX_PROC``; a
``PROC_CN_MCAST_LISTEN`` message subscribes, ``PROC_CN_MCAST_IGNORE`` unsubscribes (both need
CAP_NET_ADMIN). Exit events carry ``timestamp_ns`` from ``ktime_get_ns()`` (CLOCK_MONOTONIC, the clock
of ``time.monotonic_ns()``); the kernel sends them from ``do_exit()`` right after ``exit_notify()``,
so for a victim that held its mm to the end they come after exit_mmap.

Why not pyroute2 here: its ``ProcEventSocket`` does decode EXIT events correctly (checked against
pyroute2 0.9.7's ``netlink/connector/cn_proc.py``): ``get()`` returns the messages of *one*
datagram per call and must be called again for the next, and events are named
``PROC_EVENT_EXIT``, not ``EXIT``. Called in a loop it delivered FORK, EXEC and the EXIT (code 9) of
a killed child here; called once it yields only the first event, the likely cause of the "only
FORK" observation in the kernel notes (usage, not a parser bug). But importing it costs ~22 MiB RSS and
~0.1 s on its own (~12.5 MiB and ~65 ms after structlog and pydantic are loaded), and ``get()``
blocks without a timeout, which does not suit a kill path. The message layout below is 40 lines
of ``struct``; nothing else in lmkd-py parses netlink.

Since the cn_proc filtering patch ("connector/cn_proc: Add filtering to fix some bugs", merged for
Linux 6.6) a listener may send a ``struct proc_input`` (op + event type) to receive only one event
type (checked here on 6.18: an EXIT-only listener gets only exits); older kernels accept only the
4-byte op and silently ignore the longer message, so the filter is used only from 6.6 on.
"""

from __future__ import annotations

import contextlib
import errno
import select
import socket
import struct
import time
from dataclasses import dataclass

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2
PROC_EVENT_EXIT = 0x80000000
NLMSG_DONE = 3
CN_FILTER_SINCE = (6, 6)
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # not exported by every Python; asm-generic value

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_CN_MSG = struct.Struct("=IIIIHH")  # idx, val, seq, ack, len, flags
_EVENT_HEAD = struct.Struct("=IIQ")  # what, cpu, timestamp_ns
_EXIT_BODY = struct.Struct("=IIIIII")  # pid, tgid, exit_code, exit_signal, parent_pid, parent_tgid


@dataclass(frozen=True, slots=True)
class ProcExit:
    """One thread's exit as the proc connector reports it (``timestamp_ns``: CLOCK_MONOTONIC)."""

    pid: int
    tgid: int
    exit_code: int
    exit_signal: int
    timestamp_ns: int
    cpu: int


def control_message(op: int, port_id: int, event_filter: int | None = None) -> bytes:
    """The netlink datagram that subscribes (``op`` = LISTEN) or unsubscribes (IGNORE).

    With ``event_filter`` the payload is a ``struct proc_input`` (kernel 6.6+ only).
    """
    payload = struct.pack("=I", op) if event_filter is None else struct.pack("=II", op, event_filter)
    cn = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(payload), 0) + payload
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(cn), NLMSG_DONE, 0, 0, port_id) + cn


def parse_proc_exits(data: bytes) -> list[ProcExit]:
    """Exit events in one received datagram (other event types and short messages are skipped)."""
    out: list[ProcExit] = []
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length = _NLMSGHDR.unpack_from(data, off)[0]
        if length < _NLMSGHDR.size or off + length > len(data):
            break
        body = off + _NLMSGHDR.size
        head = body + _CN_MSG.size
        if off + length >= head + _EVENT_HEAD.size + _EXIT_BODY.size:
            idx, val = _CN_MSG.unpack_from(data, body)[:2]
            what, cpu, ts = _EVENT_HEAD.unpack_from(data, head)
            if (idx, val) == (CN_IDX_PROC, CN_VAL_PROC) and what == PROC_EVENT_EXIT:
                pid, tgid, code, sig = _EXIT_BODY.unpack_from(data, head + _EVENT_HEAD.size)[:4]
                out.append(ProcExit(pid, tgid, code, sig, ts, cpu))
        off += (length + 3) & ~3  # NLMSG_ALIGN
    return out


class ProcConnector:
    """A proc-connector socket that listens only between ``listen()`` and ``ignore()``.

    Raises OSError from the constructor when the socket cannot be made or bound (no
    CAP_NET_ADMIN, no connector in the kernel).
    """

    def __init__(self, kernel_version: tuple[int, int], rcvbuf_bytes: int = 1 << 20) -> None:
        self._filter = PROC_EVENT_EXIT if kernel_version >= CN_FILTER_SINCE else None
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_CONNECTOR)
        try:
            self._sock.bind((0, CN_IDX_PROC))
            self._sock.setblocking(False)
            try:
                # A busy machine makes many exits; keep room so the victim's is not dropped.
                self._sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, rcvbuf_bytes)
            except OSError:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf_bytes)
            self._port = self._sock.getsockname()[0]
        except OSError:
            self._sock.close()
            raise
        self.listening = False

    def listen(self) -> None:
        """Subscribe (one sendmsg, ~10 µs). Raises OSError."""
        self._drain()  # nothing from an earlier window may be mistaken for this one
        self._sock.send(control_message(PROC_CN_MCAST_LISTEN, self._port, self._filter))
        self.listening = True

    def ignore(self) -> None:
        """Unsubscribe (idempotent). Raises OSError."""
        if self.listening:
            self.listening = False
            self._sock.send(control_message(PROC_CN_MCAST_IGNORE, self._port, self._filter))

    def _drain(self) -> list[ProcExit]:
        out: list[ProcExit] = []
        while True:
            try:
                data = self._sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return out
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # the kernel dropped events for us; read on
                    continue
                raise
            out.extend(parse_proc_exits(data))

    def exits_of(self, tgid: int, timeout_ns: int) -> list[ProcExit]:
        """Exit events of the thread group ``tgid`` received so far, waiting up to ``timeout_ns``
        for the thread-group leader's (the pidfd turns readable just before the kernel sends it).

        Returns them in arrival order, possibly empty. Raises OSError on socket trouble.
        """
        deadline = time.monotonic_ns() + timeout_ns
        found: list[ProcExit] = []
        while True:
            found.extend(e for e in self._drain() if e.tgid == tgid)
            if any(e.pid == tgid for e in found):
                return found
            left_ms = (deadline - time.monotonic_ns()) // 1_000_000
            if left_ms <= 0:
                return found
            select.select([self._sock], [], [], left_ms / 1000)

    def close(self) -> None:
        """Unsubscribe and close (idempotent; errors ignored: the socket is going away)."""
        with contextlib.suppress(OSError):
            self.ignore()
        self._sock.close()
