"""The KillRecord schema (versioned), its JSONL writer and its reader.

One record per kill attempt: real kills, refusals, failures, dry runs and (observe mode) kills made by
someone else. Unknown values are ``None``, never sentinel numbers. Times are integer nanoseconds of
CLOCK_MONOTONIC (the clock of ``time.monotonic_ns()`` and of tracefs' ``mono`` trace clock); sizes are KiB.

Schema versions: a reader accepts every version up to ``SCHEMA_VERSION`` and refuses newer ones with a
message naming the file and line, so an old ``compare`` never silently misreads new data.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import json
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmkd_py import safepath

if TYPE_CHECKING:
    from lmkd_py.config import Config

SCHEMA_VERSION = 1


class Outcome(StrEnum):
    """How one kill attempt ended."""

    KILLED = "killed"  # SIGKILL sent and the exit observed
    EXIT_TIMEOUT = "exit_timeout"  # SIGKILL sent, no exit seen before the timeout
    REFUSED_IDENTITY = "refused_identity"  # the pid now names another process: nothing signalled
    GONE = "gone"  # the process was gone before we could signal it (ESRCH at pidfd_open/signal)
    SIGNAL_FAILED = "signal_failed"  # pidfd_open/pidfd_send_signal failed for another reason
    DRY_RUN = "dry_run"  # would have killed; nothing signalled
    OBSERVED = "observed"  # someone else killed it; we only watched


class MreleaseStatus(StrEnum):
    """What became of the process_mrelease call."""

    OK = "ok"  # returned 0 (it may have had nothing left to do, see kernel-notes)
    ALREADY_RELEASED = "already_released"  # ESRCH: the victim dropped its mm first; benign race
    ERROR = "error"  # any other errno; see ``errno_name``
    UNSUPPORTED = "unsupported"  # ENOSYS: kernel < 5.15, kill-only fallback
    DISABLED = "disabled"  # turned off by configuration (e.g. the benchmark's baseline)
    NOT_ATTEMPTED = "not_attempted"  # no SIGKILL was delivered, so there was nothing to release


class _Model(BaseModel):
    # Records are read back by newer and older tools: ignore unknown keys rather than fail
    # (forward-compatible within one schema version), and never mutate after construction.
    model_config = ConfigDict(extra="ignore", frozen=True)


class Provenance(_Model):
    """Where and by what a record was made."""

    hostname: str | None = None
    kernel_release: str | None = None  # uname -r
    kernel_version: str | None = None  # uname -v (build string)
    arch: str | None = None  # uname -m
    machine_model: str | None = None  # device tree model or DMI vendor/product
    boot_id: str | None = None
    lmkd_py_version: str | None = None
    config_hash: str | None = None  # sha256 of the canonical JSON of the effective config
    virtualised: str | None = None  # e.g. "qemu-tcg" when known (the lab sets it)


class Victim(_Model):
    """The process as it was just before the kill (or as last seen, in observe mode)."""

    pid: int
    comm: str | None = None
    cmdline: str | None = None
    uid: int | None = None
    start_time_ticks: int | None = None  # field 22 of /proc/PID/stat, clock ticks since boot
    oom_score_adj: int | None = None
    cgroup: str | None = None
    threads: int | None = None
    vma_count: int | None = None
    rss_kib: int | None = None
    rss_anon_kib: int | None = None
    rss_file_kib: int | None = None
    rss_shmem_kib: int | None = None
    swap_kib: int | None = None


class Mrelease(_Model):
    """The process_mrelease(2) call made on the reaper thread."""

    status: MreleaseStatus
    ret: int | None = None
    errno: int | None = None
    errno_name: str | None = None
    wall_ns: int | None = None
    thread_cpu_ns: int | None = None  # CPU time of the reaper thread across the call
    reaper_tid: int | None = None
    note: str | None = None


class Steps(_Model):
    """CLOCK_MONOTONIC timestamps (ns) of each step of one kill, in the order they happen."""

    start_ns: int
    pidfd_opened_ns: int | None = None
    identity_checked_ns: int | None = None
    sizes_read_ns: int | None = None
    signal_sent_ns: int | None = None
    mrelease_start_ns: int | None = None
    mrelease_end_ns: int | None = None
    exit_observed_ns: int | None = None
    mem_recovered_ns: int | None = None
    end_ns: int


class Pressure(_Model):
    """The pressure event that led to the decision (daemon only)."""

    level: str | None = None
    source: str | None = None  # e.g. "/proc/pressure/memory" or a cgroup's memory.pressure
    mechanism: str | None = None  # "trigger" or "poll"
    some_avg10: float | None = None
    full_avg10: float | None = None
    some_total_us: int | None = None
    full_total_us: int | None = None
    event_ns: int | None = None  # when the loop woke for the event
    decision_latency_ns: int | None = None  # event wake -> SIGKILL sent (or -> decision, in dry run)
    rank: int | None = None  # place of this victim in the ranking (0 = first choice)
    reason: str | None = None  # why this victim was chosen
    # Why a kill was needed, in Android lmkd's names where lmkd has one (low_mem_and_swap,
    # low_mem_and_thrashing, direct_recl_and_thrashing, low_swap_and_thrashing, low_mem_and_swap_util,
    # low_filecache_after_thrashing, pressure_after_kill, not_responding) and this project's own
    # (mem_floor, cgroup_headroom, psi_<level>).
    kill_reason: str | None = None
    signals: dict[str, float | int | None] | None = None  # the values that decided, units in the names


class KernelTimeline(_Model):
    """Kernel-side view of one kill from tracefs and the proc connector (nullable field by field)."""

    source: str | None = None  # e.g. "tracefs+proc_connector", "function_graph"
    unavailable_reason: str | None = None  # why the timeline (or part of it) is missing
    signal_generate_ns: int | None = None
    signal_deliver_ns: int | None = None
    mrelease_enter_ns: int | None = None
    mrelease_exit_ns: int | None = None
    mrelease_ret: int | None = None
    exit_start_ns: int | None = None  # sched_process_exit (before exit_mm on 6.16+, after it before)
    exit_mmap_end_ns: int | None = None
    proc_exit_ns: int | None = None  # proc connector exit event timestamp
    oom_reaper_start_ns: int | None = None
    oom_reaper_end_ns: int | None = None
    freed_by_reaper_kib: dict[str, int] | None = None  # by kind: file, anon, swap, shmem
    freed_by_victim_kib: dict[str, int] | None = None
    mmap_lock_wait_ns: dict[str, int] | None = None  # side ("reaper", "victim") -> total ns
    lock_contention_ns: dict[str, int] | None = None
    lock_contention_count: dict[str, int] | None = None
    reaper_work_ns: int | None = None
    exit_mmap_ns: int | None = None
    reap_total_ns: int | None = None  # reaper work + exit_mmap
    reap_throughput_mib_s: float | None = None
    notes: list[str] = Field(default_factory=list)


class KilledBy(_Model):
    """Who killed, in observe mode."""

    kind: str  # "kernel_oom", "process"
    pid: int | None = None
    comm: str | None = None
    match: str | None = None  # how a process_mrelease call was matched to this victim


class KillRecord(_Model):
    """One kill attempt."""

    schema_version: int = SCHEMA_VERSION
    record_id: str
    kill_id: str | None = None  # the same for every member of one whole-cgroup kill
    wall_time: str  # ISO 8601 UTC, for humans; ordering uses the monotonic steps
    outcome: Outcome
    dry_run: bool = False
    observed: bool = False
    victim: Victim
    steps: Steps
    mrelease: Mrelease
    # Free memory, KiB: MemAvailable + pages on the per-CPU free lists (which MemAvailable does not count);
    # the names are historical (schema version 1) and stay for readers of older records.
    mem_available_before_kib: int | None = None
    mem_available_after_kib: int | None = None
    mem_recovered_kib: int | None = None
    mem_recovery_target_kib: int | None = None
    kill_to_exit_ns: int | None = None
    kill_to_mem_recovered_ns: int | None = None
    exit_timeout_ns: int | None = None
    error: str | None = None
    notes: list[str] = Field(default_factory=list)
    pressure: Pressure | None = None
    kernel: KernelTimeline | None = None
    killer: KilledBy | None = None
    provenance: Provenance = Field(default_factory=Provenance)


def errno_name(err: int | None) -> str | None:
    """Symbolic name of an errno value (``"ESRCH"``), or None."""
    if err is None:
        return None
    return errno_mod.errorcode.get(err, f"E{err}")


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass
class WriterStats:
    written: int = 0
    dropped: int = 0
    rotations: int = 0
    last_error: str | None = None


class RecordsPathError(OSError):
    """The records path cannot be used; the message names the path and the reason.

    ``insecure``: refused for safety (a symlink, a directory or file someone else owns or may write),
    as opposed to merely unwritable now (permission, read-only file system, missing mount). An OSError,
    so a start or reload that already reports OSErrors ("cannot start: ...") reports this one too.
    """

    def __init__(self, message: str, *, insecure: bool) -> None:
        super().__init__(message)
        self.insecure = insecure


# O_NOFOLLOW: never write through a symlink at the records path (issue 18: a root daemon appended to a
# user's shell startup file). O_NONBLOCK: a FIFO there fails (ENXIO) instead of blocking the killer;
# it changes nothing for a regular file.
_FILE_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
RECORDS_FILE_MODE = 0o640  # records carry command lines: not for every local user to read
RECORDS_DIR_MODE = 0o750


class RecordWriter:
    """Append records as JSON lines, flushed per record, with a size cap and rotation.

    ``max_bytes`` caps one file; when the next line would pass it, ``path`` becomes ``path.1``
    (``path.1`` becomes ``path.2`` …) and at most ``keep`` rotated files are kept, so the total on disk
    stays under ``(keep + 1) * max_bytes``. A write that fails (disk full, read-only, removed directory)
    drops that record, counts it and returns False; the next write tries again, so writing resumes by
    itself when space returns. A partial line left by a failed write is cut off first, so the file
    stays valid JSONL and no earlier record is lost.

    The path is walked on every write by ``safepath.open_trusted_dir`` (every directory owned by root
    or us and writable by nobody else; missing ones made 0750), the file is opened relative to that
    directory with ``O_NOFOLLOW``, made 0640, and must be a regular file owned by root or us; rotation
    renames inside the same directory descriptor. A path that breaks these rules drops the record like
    any other failure, with the reason in ``stats.last_error``; ``check()`` finds it at start.
    """

    def __init__(self, path: Path, max_bytes: int = 16 * 1024 * 1024, keep: int = 3, fsync: bool = True):
        if max_bytes < 4096:
            raise ValueError(f"records max_bytes must be at least 4096, got {max_bytes}")
        if keep < 0:
            raise ValueError(f"records keep must be >= 0, got {keep}")
        self.path = Path(path)
        # Pinned now: a later chdir (a daemon goes to /) must not move the records.
        self._dir = os.path.dirname(os.path.abspath(self.path))
        self._name = self.path.name
        self.max_bytes = max_bytes
        self.keep = keep
        self.fsync = fsync
        self.stats = WriterStats()

    def check(self) -> None:
        """Prove at start that records can be written, instead of learning it at the first kill.

        Walks and checks the directories as a write does (creating missing ones), opens an existing
        records file for appending without writing to it, or, when there is none yet, proves that one
        can be created (an unnamed ``O_TMPFILE``, so no empty file is left behind). Writes nothing.
        The daemon and observe call it before they report ready.

        Raises RecordsPathError: the message names the records path and the reason; ``insecure``
        tells a refusal for safety from a path that is merely unwritable now.
        """
        try:
            dfd = safepath.open_trusted_dir(self._dir, create_mode=RECORDS_DIR_MODE)
            try:
                try:
                    fd = self._open_file(dfd, create=False)
                except FileNotFoundError:
                    _probe_create(dfd)
                else:
                    os.close(fd)
            finally:
                os.close(dfd)
        except OSError as exc:
            raise RecordsPathError(
                f"records path {self.path}: {_reason(exc)}", insecure=isinstance(exc, safepath.UntrustedPath)
            ) from exc

    def write(self, record: KillRecord) -> bool:
        """Append one record. Returns True when it is on disk, False when it was dropped."""
        line = (record.model_dump_json() + "\n").encode()
        try:
            self._append(line)
        except OSError as exc:
            self.stats.dropped += 1
            self.stats.last_error = f"{self.path}: {_reason(exc)}"
            return False
        self.stats.written += 1
        return True

    def _open_file(self, dfd: int, *, create: bool) -> int:
        flags = _FILE_FLAGS | (os.O_CREAT if create else 0)
        try:
            fd = os.open(self._name, flags, RECORDS_FILE_MODE, dir_fd=dfd)
        except OSError as exc:
            if exc.errno == errno_mod.ELOOP:
                raise safepath.UntrustedPath("it is a symlink; refusing to follow it") from exc
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise safepath.UntrustedPath("it is not a regular file")
            safepath.check_owner_and_mode(st, "the file")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _append(self, line: bytes) -> None:
        dfd = safepath.open_trusted_dir(self._dir, create_mode=RECORDS_DIR_MODE)
        try:
            fd = self._open_file(dfd, create=True)
            try:
                size = os.fstat(fd).st_size
                if size and size + len(line) > self.max_bytes:
                    os.close(fd)
                    fd = -1
                    self._rotate(dfd)
                    fd = self._open_file(dfd, create=True)
                    size = 0
                self._write_line(fd, line, size)
            finally:
                if fd >= 0:
                    os.close(fd)
        finally:
            os.close(dfd)

    def _write_line(self, fd: int, line: bytes, size: int) -> None:
        written = 0
        try:
            while written < len(line):
                written += os.write(fd, line[written:])
            if self.fsync:
                os.fsync(fd)
        except OSError:
            # Leave no half line behind: the reader would lose it anyway, and the next record
            # must start on a line of its own.
            if written:
                os.ftruncate(fd, size)
            raise

    def _rotate(self, dfd: int) -> None:
        # Names relative to the checked directory's descriptor: rename and unlink act on the entries
        # themselves (never through a symlink), inside the directory that was checked.
        name = self._name
        if self.keep == 0:
            _unlink(name, dfd)
        else:
            _unlink(f"{name}.{self.keep}", dfd)
            for i in range(self.keep - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):  # a gap in the numbers: nothing to move
                    os.rename(f"{name}.{i}", f"{name}.{i + 1}", src_dir_fd=dfd, dst_dir_fd=dfd)
            os.rename(name, f"{name}.1", src_dir_fd=dfd, dst_dir_fd=dfd)
        self.stats.rotations += 1


def _unlink(name: str, dfd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dfd)


def _probe_create(dfd: int) -> None:
    """Prove a file can be created in ``dfd`` without leaving one: an unnamed O_TMPFILE inode."""
    try:
        os.close(os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, RECORDS_FILE_MODE, dir_fd=dfd))
    except OSError as exc:
        # File systems without O_TMPFILE: ask the kernel with our effective ids instead.
        if exc.errno not in (errno_mod.EOPNOTSUPP, errno_mod.EISDIR):
            raise
        if not os.access(".", os.W_OK | os.X_OK, dir_fd=dfd, effective_ids=True):
            raise PermissionError(errno_mod.EACCES, "cannot create files in the directory") from None


def _reason(exc: OSError) -> str:
    """Why an OSError happened, naming the component it happened on when that is not the records file."""
    if isinstance(exc, safepath.UntrustedPath) or exc.strerror is None:
        return str(exc)
    return f"{exc.strerror} ({exc.filename})" if exc.filename else exc.strerror


def open_writer(cfg: Config, path: Path | None = None) -> RecordWriter:
    """The records writer a config asks for, at ``path`` (a CLI's ``--records``) or the config's own
    path; the one place a writer is made from a config (daemon, observe, ``kill``).

    Touches nothing on disk; call ``RecordWriter.check()`` on the result before reporting ready, so a
    refused or unwritable path shows at start (it raises RecordsPathError naming path and reason)."""
    rc = cfg.records
    return RecordWriter(path or cfg.records_path(), rc.max_bytes, rc.keep, rc.fsync)


class ListSink:
    """A record sink that keeps records in memory (tests, and the CLI's summary)."""

    def __init__(self) -> None:
        self.records: list[KillRecord] = []
        self.stats = WriterStats()

    def write(self, record: KillRecord) -> bool:
        self.records.append(record)
        self.stats.written += 1
        return True


# ---------------------------------------------------------------------------------------------
# Reading


class RecordFormatError(ValueError):
    """A records file that cannot be read as lmkd-py records (names file and line)."""


@dataclass
class ReadResult:
    records: list[KillRecord] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # lines skipped, each naming file:line and why


def parse_line(path: Path, lineno: int, raw: bytes, truncated: bool, problems: list[str]) -> KillRecord | None:
    """One JSONL line to a record, or None after noting in ``problems`` why it was skipped
    (``file:line: skipped: why``). ``truncated``: the line is the file's last and has no newline, so
    a JSON error there is a write cut short. Raises RecordFormatError for a newer schema version."""
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        why = "truncated last line (a write cut short)" if truncated else f"not JSON ({exc})"
        problems.append(f"{path}:{lineno}: skipped: {why}")
        return None
    if not isinstance(obj, dict):
        problems.append(f"{path}:{lineno}: skipped: not a JSON object")
        return None
    version = obj.get("schema_version")
    if not isinstance(version, int):
        problems.append(f"{path}:{lineno}: skipped: no integer schema_version (not an lmkd-py record?)")
        return None
    if version > SCHEMA_VERSION:
        raise RecordFormatError(
            f"{path}:{lineno}: record schema_version {version} is newer than this lmkd-py "
            f"understands ({SCHEMA_VERSION}); upgrade lmkd-py to read it"
        )
    try:
        return KillRecord.model_validate(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        problems.append(f"{path}:{lineno}: skipped: field {loc!r}: {first['msg']}")
        return None


def iter_records(path: Path, problems: list[str] | None = None) -> Iterator[KillRecord]:
    """Yield the records of one JSONL file.

    A last line without its newline that does not parse is a write cut short (power loss, full disk):
    it is skipped and noted in ``problems``. A bad line elsewhere is skipped and noted too, so one
    damaged line never costs the rest of a field data set. A record of a newer schema version than
    this lmkd-py knows raises RecordFormatError: reading it with an old schema could misread it.
    """
    sink = problems if problems is not None else []
    with path.open("rb") as fh:
        data = fh.read()
    lines = data.split(b"\n")
    last_complete = data.endswith(b"\n")
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        rec = parse_line(path, lineno, raw, lineno == len(lines) and not last_complete, sink)
        if rec is not None:
            yield rec


def read_records(paths: Iterable[Path]) -> ReadResult:
    """Read every record of several files (see iter_records for what is skipped and what raises)."""
    result = ReadResult()
    for path in paths:
        result.records.extend(iter_records(Path(path), result.problems))
    return result
