"""journald as a sink: syslog priorities on the log lines, and each kill as a structured journal entry.

Two halves (issue 14 item 6), both used only when systemd's journal is really there:

* **Priorities.** Under systemd, stderr is a stream to journald, which files every line at the unit's
  default priority (info) unless the line starts with a ``<N>`` syslog prefix (sd-daemon(3);
  ``SyslogLevelPrefix=`` is on by default). ``log.py`` adds the prefix when :func:`stderr_is_journal`:
  systemd.exec(5) says ``$JOURNAL_STREAM`` holds the device and inode of the stream it connected, and a
  process must compare them with fstat(2) of its stderr, since the variable is inherited by children
  whose stderr may go elsewhere.
* **Kill entries.** One entry per kill record, sent over the native protocol (systemd's "Native Journal
  Protocol" document) to ``/run/systemd/journal/socket``: an ``AF_UNIX`` datagram of fields, each
  ``NAME=value\\n``, or, for a value holding a newline, ``NAME\\n`` + its length as a 64-bit
  little-endian integer + the value + ``\\n``. An entry too big for one datagram (``EMSGSIZE``) goes
  into a sealed memfd whose descriptor is sent alone (``SCM_RIGHTS``), as sd_journal_sendv does.
  journald files the entry under the sender's unit (it reads the peer's cgroup), so
  ``journalctl -u lmkd-py LMKD_OUTCOME=killed`` finds it.

Hostile values: a victim's comm and cmdline are chosen by whoever started it. A newline in a value
sends it in the binary form, so it can never start another field (``\\nLMKD_OUTCOME=killed`` stays
inside the comm); every value is cut to a bound; the person-readable MESSAGE escapes control characters.

Never raises into the kill path: a missing socket, a full queue (``EAGAIN``, the socket is
non-blocking: a stalled journald must not stall a memory killer), ``ENOBUFS``... are counted, logged
at warning the first time and at debug afterwards. ``socket`` is imported on first send: ``log.py``
imports this module in every command, most of which never send.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    import socket

    from lmkd_py.records import KillRecord

JOURNAL_SOCKET = "/run/systemd/journal/socket"
# Tests (and unusual setups) name another socket; the empty string turns kill entries off.
SOCKET_ENV = "LMKD_PY_JOURNAL_SOCKET"
IDENTIFIER = "lmkd-py"
# One id for every kill entry (journalctl MESSAGE_ID=...), the systemd catalog's convention.
KILL_MESSAGE_ID = "7f0c4b8e5a3d4e21b6c1d2a9e8f30b57"

# syslog(3) priorities by structlog level name (add_log_level's names, and the aliases it maps).
PRIORITIES = {"critical": 2, "fatal": 2, "error": 3, "exception": 3, "warning": 4, "warn": 4, "notice": 5,
              "info": 6, "debug": 7}
_KILL_PRIORITY = {"killed": 4, "exit_timeout": 3, "signal_failed": 3, "refused_identity": 5, "gone": 5,
                  "dry_run": 5, "observed": 5}

MAX_VALUE_BYTES = 4096  # any one value
MAX_COMM_BYTES = 64  # the kernel's comm is 15 bytes; a record file's may be anything
MAX_TEXT_BYTES = 1024  # cmdline, cgroup, error
_FIELD_NAME_MAX = 64  # journald's limit (journal_field_valid)
_ELLIPSIS = "…".encode()


def syslog_priority(level: str) -> int:
    """The syslog priority of a structlog level name; info (6) for a name it does not know."""
    return PRIORITIES.get(level.lower(), 6)


def parse_journal_stream(value: str) -> tuple[int, int] | None:
    """``$JOURNAL_STREAM`` ("DEV:INODE", both decimal) as (st_dev, st_ino); None when malformed."""
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return None
    return int(dev), int(ino)


def stderr_is_journal(fd: int = 2, environ: Mapping[str, str] = os.environ) -> bool:
    """True when ``fd`` is the stream systemd connected to the journal (``$JOURNAL_STREAM`` names its
    device and inode); False when the variable is unset or malformed, or ``fd`` is something else or
    closed."""
    ident = parse_journal_stream(environ.get("JOURNAL_STREAM", ""))
    if ident is None:
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == ident


def field_name_ok(name: str) -> bool:
    """A name journald accepts from a client: A-Z, 0-9 and ``_``, not starting with ``_`` (trusted
    fields are journald's own) or a digit, at most 64 characters."""
    return (0 < len(name) <= _FIELD_NAME_MAX and name[0] != "_" and not name[0].isdigit()
            and all(c == "_" or "A" <= c <= "Z" or "0" <= c <= "9" for c in name))


def bound(data: bytes, limit: int) -> bytes:
    """``data`` cut to at most ``limit`` bytes, marked with an ellipsis, never in the middle of a UTF-8
    sequence."""
    if len(data) <= limit:
        return data
    if limit < len(_ELLIPSIS):
        return b""
    cut = data[: limit - len(_ELLIPSIS)]
    # Drop a trailing incomplete UTF-8 sequence: find its lead byte, see how long it should be.
    end = len(cut)
    lead = end
    while lead and end - lead < 3 and cut[lead - 1] & 0xC0 == 0x80:
        lead -= 1
    if lead and cut[lead - 1] >= 0xC0:
        first = cut[lead - 1]
        length = 2 if first < 0xE0 else 3 if first < 0xF0 else 4
        if end - (lead - 1) < length:
            end = lead - 1
    return cut[:end] + _ELLIPSIS


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8", "surrogateescape")  # bytes a str was decoded from come back as they were
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace")


def encode(fields: Sequence[tuple[str, str | bytes]], limit: int = MAX_VALUE_BYTES) -> bytes:
    """One native-protocol entry. Each value is cut to ``limit`` bytes; one holding a newline takes the
    binary form. Raises ValueError for a field name journald would refuse (a bug here, not input)."""
    out = bytearray()
    for name, value in fields:
        if not field_name_ok(name):
            raise ValueError(f"invalid journal field name {name!r}")
        data = bound(value if isinstance(value, bytes) else _utf8(value), limit)
        key = name.encode("ascii")
        if b"\n" in data:
            out += key + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
        else:
            out += key + b"=" + data + b"\n"
    return bytes(out)


class JournalSender:
    """Sends entries to journald's native socket; see the module docstring.

    Build it with :meth:`from_env`; the constructor is for tests. ``enabled`` is False when there is no
    journal to talk to, and then every method returns at once. Not thread-safe: the loop is its user.
    """

    def __init__(self, address: str | None, identifier: str = IDENTIFIER) -> None:
        self.address = address
        self.enabled = bool(address)
        self.identifier = identifier
        self.sent = 0
        self.failures = 0
        self._sock: socket.socket | None = None
        self._log = structlog.get_logger("lmkd_py.journal")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, fd: int = 2) -> JournalSender:
        """``$LMKD_PY_JOURNAL_SOCKET`` when set (empty: off); otherwise journald's socket when stderr
        is the journal (:func:`stderr_is_journal`), else a disabled sender. Never raises."""
        if SOCKET_ENV in environ:
            return cls(environ[SOCKET_ENV] or None)
        return cls(JOURNAL_SOCKET if stderr_is_journal(fd, environ) else None)

    def send(self, fields: Sequence[tuple[str, str | bytes]]) -> bool:
        """Send one entry (``SYSLOG_IDENTIFIER`` added when missing). True if the kernel took it; False
        when disabled or it failed (counted, logged, never raised)."""
        if not self.enabled or not fields:
            return False
        if not any(name == "SYSLOG_IDENTIFIER" for name, _ in fields):
            fields = [*fields, ("SYSLOG_IDENTIFIER", self.identifier)]
        try:
            self._deliver(encode(fields))
        except OSError as exc:
            self._failed(exc.strerror or type(exc).__name__, exc.errno)
            return False
        except ValueError as exc:  # a field name journald would refuse: a bug, but never into the kill path
            self._failed(str(exc), None)
            return False
        self.sent += 1
        return True

    def kill(self, record: KillRecord) -> bool:
        """Send the entry of one kill record (:func:`kill_fields`). Never raises: this is a side channel
        of the kill path, like the metrics."""
        if not self.enabled:
            return False
        try:
            fields = kill_fields(record)
        except Exception as exc:  # a side channel: an odd record must not cost the kill loop
            self._failed(f"cannot describe the record: {exc!r}", None)
            return False
        return self.send(fields)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _deliver(self, payload: bytes) -> None:
        import socket  # only a process that sends pays for it (module docstring)

        assert self.address is not None
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            self._sock.sendto(payload, self.address)
        except OSError as exc:
            if exc.errno != errno.EMSGSIZE:
                raise
            self._send_memfd(self._sock, payload)

    def _send_memfd(self, sock: socket.socket, payload: bytes) -> None:
        """The entry in a sealed memfd, its descriptor sent alone: journald maps a sealed memfd from
        any sender (an unsealed file it takes only from root, or from /tmp-like paths)."""
        import fcntl
        import socket

        fd = os.memfd_create("lmkd-py-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view):]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
            # socket.send_fds would drop the address (CPython 3.11 ignores it): sendmsg itself.
            sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd.to_bytes(4, sys.byteorder))], 0, self.address)
        finally:
            os.close(fd)

    def _failed(self, reason: str, code: int | None) -> None:
        self.failures += 1
        self.close()  # a broken socket may be the cause: a fresh one next time
        if self.failures == 1:
            self._log.warning("journal.send_failed", reason=reason, errno=code, socket=self.address)
        else:
            self._log.debug("journal.send_failed", reason=reason, errno=code, failures=self.failures)


# --- one kill record as a journal entry ------------------------------------------------------------


def readable(text: str, max_chars: int) -> str:
    """``text`` for the MESSAGE: one line, every character Python calls unprintable (controls, format and
    bidi characters, separators, lone surrogates) escaped, cut to ``max_chars`` with an ellipsis.
    Not ``text.printable``: its tables cost the daemon ~0.4 MiB resident for a few short names."""
    if len(text) > max_chars:
        text = text[:max_chars] + "…"
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _escape(c: str) -> str:
    code = ord(c)
    if c in "\n\r\t":
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}[c]
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _ms(ns: int | None) -> str | None:
    return f"{ns / 1e6:.3f}" if ns is not None else None


def _duration(ns: int) -> str:
    if ns >= 10_000_000_000:
        return f"{ns / 1e9:.1f} s"
    return f"{ns / 1e6:.0f} ms" if ns >= 10_000_000 else f"{ns / 1e6:.1f} ms"


def _size(kib: int) -> str:
    return f"{kib} KiB" if kib < 1024 else f"{round(kib / 1024)} MiB"


def describe(record: KillRecord) -> str:
    """The MESSAGE: one line a person reads, e.g. ``killed firefox (pid 1234, 812 MiB) for
    low_mem_and_thrashing: exit after 41 ms, memory back after 120 ms``. Control characters of the
    victim's name are escaped."""
    v = record.victim
    comm = readable(v.comm or "?", MAX_COMM_BYTES)
    who = f"{comm} (pid {v.pid}" + (f", {_size(v.rss_kib)})" if v.rss_kib is not None else ")")
    reason = readable((record.pressure.kill_reason if record.pressure else None) or "memory pressure", 80)
    outcome = record.outcome.value
    after = []
    if record.kill_to_exit_ns is not None:
        after.append(f"exit after {_duration(record.kill_to_exit_ns)}")
    if record.kill_to_mem_recovered_ns is not None:
        after.append(f"memory back after {_duration(record.kill_to_mem_recovered_ns)}")
    kt = record.kernel
    if kt is not None and kt.reap_total_ns is not None:
        after.append(f"kernel reap {_duration(kt.reap_total_ns)}")
    timing = ": " + ", ".join(after) if after else ""
    if outcome == "killed":
        return f"killed {who} for {reason}{timing}"
    if outcome == "exit_timeout":
        limit = f" within {_duration(record.exit_timeout_ns)}" if record.exit_timeout_ns is not None else ""
        return f"killed {who} for {reason}, but it did not exit{limit}"
    if outcome == "dry_run":
        return f"would kill {who} for {reason} (dry run)"
    if outcome == "gone":
        return f"{who} was gone before the kill for {reason}"
    if outcome == "refused_identity":
        return f"did not kill pid {v.pid}: it is no longer {comm}"
    if outcome == "observed":
        k = record.killer
        if k is not None and k.kind == "kernel_oom":
            by = "the kernel's OOM killer"
        elif k is not None and (k.comm or k.pid is not None):
            by = readable(k.comm or "?", MAX_COMM_BYTES) + (f" (pid {k.pid})" if k.pid is not None else "")
        else:
            by = "another process"
        return f"{by} killed {who}{timing}"
    error = readable(record.error or "unknown error", 200)
    return f"failed to kill {who} for {reason}: {error}"


def kill_fields(record: KillRecord) -> list[tuple[str, str | bytes]]:
    """The entry of one kill record: MESSAGE (:func:`describe`), PRIORITY (killed: warning; a failure:
    err; dry run, observed, gone, refused: notice), MESSAGE_ID, SYSLOG_IDENTIFIER, and ``LMKD_*`` fields
    for what the record says (absent values are left out). Durations in ms with µs digits; hostile text
    (comm, cmdline, cgroup, error) bounded; comm and cmdline kept raw, so they match what ps shows."""
    v = record.victim
    p = record.pressure
    k = record.killer
    kt = record.kernel
    outcome = record.outcome.value
    raw: list[tuple[str, object, int]] = [
        ("LMKD_RECORD_ID", record.record_id, 64),
        ("LMKD_KILL_ID", record.kill_id, 64),
        ("LMKD_OUTCOME", outcome, 32),
        ("LMKD_REASON", p.kill_reason if p else None, 128),
        ("LMKD_CHOICE_REASON", p.reason if p else None, MAX_TEXT_BYTES),
        ("LMKD_PRESSURE_LEVEL", p.level if p else None, 32),
        ("LMKD_RANK", p.rank if p else None, 32),
        ("LMKD_DECISION_LATENCY_MS", _ms(p.decision_latency_ns) if p else None, 32),
        ("LMKD_VICTIM_PID", v.pid, 32),
        ("LMKD_VICTIM_COMM", v.comm, MAX_COMM_BYTES),
        ("LMKD_VICTIM_CMDLINE", v.cmdline, MAX_TEXT_BYTES),
        ("LMKD_VICTIM_UID", v.uid, 32),
        ("LMKD_VICTIM_CGROUP", v.cgroup, MAX_TEXT_BYTES),
        ("LMKD_VICTIM_OOM_SCORE_ADJ", v.oom_score_adj, 32),
        ("LMKD_VICTIM_RSS_KIB", v.rss_kib, 32),
        ("LMKD_KILLER", k.kind if k else None, 32),
        ("LMKD_KILLER_PID", k.pid if k else None, 32),
        ("LMKD_KILLER_COMM", k.comm if k else None, MAX_COMM_BYTES),
        ("LMKD_KILL_TO_EXIT_MS", _ms(record.kill_to_exit_ns), 32),
        ("LMKD_KILL_TO_MEM_BACK_MS", _ms(record.kill_to_mem_recovered_ns), 32),
        ("LMKD_MEM_RECOVERED_KIB", record.mem_recovered_kib, 32),
        ("LMKD_MRELEASE", record.mrelease.status.value, 32),
        ("LMKD_MRELEASE_WALL_MS", _ms(record.mrelease.wall_ns), 32),
        ("LMKD_REAPER_WORK_MS", _ms(kt.reaper_work_ns) if kt else None, 32),
        ("LMKD_EXIT_MMAP_MS", _ms(kt.exit_mmap_ns) if kt else None, 32),
        ("LMKD_REAP_TOTAL_MS", _ms(kt.reap_total_ns) if kt else None, 32),
        ("LMKD_KERNEL", record.provenance.kernel_release, 128),
        ("LMKD_ERROR", record.error, MAX_TEXT_BYTES),
    ]
    fields: list[tuple[str, str | bytes]] = [
        ("MESSAGE", describe(record)),
        ("PRIORITY", str(_KILL_PRIORITY.get(outcome, 5))),
        ("MESSAGE_ID", KILL_MESSAGE_ID),
        ("SYSLOG_IDENTIFIER", IDENTIFIER),
    ]
    for name, value, limit in raw:
        if value is not None:
            fields.append((name, bound(_utf8(str(value)), limit)))
    return fields
