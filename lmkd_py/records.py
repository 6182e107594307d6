"""The KillRecord schema (versioned), its JSONL writer and its reader.

One record per kill attempt: real kills, refusals, failures, dry runs and (observe mode) kills made by
someone else. Unknown values are ``None``, never sentinel numbers. Times are integer nanoseconds of
CLOCK_MONOTONIC (the clock of ``time.monotonic_ns()`` and of tracefs' ``mono`` trace clock); sizes are KiB.

One definition, three uses: the record classes are plain frozen dataclasses, so the daemon builds and
writes them (``record_json``: stdlib json) without loading pydantic (issue 13: ~17 MiB resident less);
the reader and the JSON Schema validate against the very same classes through a pydantic ``TypeAdapter``,
built on first use (``adapter()``). tests/unit/test_records.py holds writer, reader and schema equal.

Schema versions: a reader accepts every version up to ``SCHEMA_VERSION`` and skips newer ones with a note
naming the file and line, so an old ``compare`` never silently misreads new data, nor gives up on the
other files of a fleet because one board runs a newer lmkd-py. Record files are untrusted input: the
reader never raises on their content (see ``parse_line``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno as errno_mod
import json
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, BinaryIO, Protocol, overload

from annotated_types import Interval

from lmkd_py import safepath
from lmkd_py.plain import plain
from lmkd_py.text import printable

if TYPE_CHECKING:
    from pydantic import TypeAdapter

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


# Every integer in a record is a kernel or clock value that fits in a signed 64-bit int (2**63 ns is 292
# years). The bound turns a hostile record (an integer of 10**400) into a field error at validation, instead
# of an OverflowError wherever the value is later made a float. Signed 64 bits rather than unsigned: a
# bound beyond int64 sends every integer through pydantic-core's big-int comparison (validation of a full
# record went from ~18 to ~27 us here).
Int64 = Annotated[int, Interval(ge=-(1 << 63), le=(1 << 63) - 1)]

# Records are read back by newer and older tools: the reader ignores unknown keys rather than fail
# (forward-compatible within one schema version); nothing mutates a record after construction.
_READER_CONFIG = {"extra": "ignore"}  # pydantic's ConfigDict for a stdlib dataclass, read by the adapter


@dataclasses.dataclass(frozen=True, kw_only=True)
class Setting:
    """One setting that can sway reap latency besides the kernel: its value as text, or None with the
    reason it could not be read (a missing file says the kernel lacks the feature; never fatal)."""

    __pydantic_config__ = _READER_CONFIG

    value: str | None = None
    unreadable: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Confounders:
    """The machine's memory-management and CPU settings, read once at start and on reload: what a kernel
    A/B across boards must hold equal (issue 14). ``compare`` warns, naming the setting, when its two
    sides differ; ``report --group-by`` splits by one. Records made before this block have None here."""

    __pydantic_config__ = _READER_CONFIG

    thp_enabled: Setting | None = None  # /sys/kernel/mm/transparent_hugepage/enabled, the bracketed choice
    thp_defrag: Setting | None = None  # .../transparent_hugepage/defrag
    lru_gen: Setting | None = None  # /sys/kernel/mm/lru_gen/enabled (MGLRU; e.g. 0x0007)
    swappiness: Setting | None = None  # /proc/sys/vm/...
    min_free_kbytes: Setting | None = None
    watermark_scale_factor: Setting | None = None
    swap: Setting | None = None  # /proc/swaps: "name type size_kib prio; ..." or "none"
    zram: Setting | None = None  # per device: algorithm, disksize, streams; or "none"
    page_size: Setting | None = None  # bytes
    cpu_model: Setting | None = None  # /proc/cpuinfo model name, or arm64 implementer/part
    cpu_count: Setting | None = None  # online CPUs
    cpufreq_governor: Setting | None = None  # distinct scaling_governor values
    kernel_cmdline: Setting | None = None  # /proc/cmdline without BOOT_IMAGE= (it names the kernel itself)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Provenance:
    """Where and by what a record was made."""

    __pydantic_config__ = _READER_CONFIG

    hostname: str | None = None
    kernel_release: str | None = None  # uname -r
    kernel_version: str | None = None  # uname -v (build string)
    arch: str | None = None  # uname -m
    machine_model: str | None = None  # device tree model or DMI vendor/product
    boot_id: str | None = None
    # Which board: an app-specific hash of /etc/machine-id (provenance.machine_id), stable across boots,
    # never the machine id itself. ``compare`` bootstraps over boards (boots within boards) with it.
    lmkd_py_version: str | None = None
    config_hash: str | None = None  # sha256 of the canonical JSON of the effective config
    virtualised: str | None = None  # e.g. "qemu-tcg" when known (the lab sets it)
    # Added within schema version 1: optional, so older records load, and older readers ignore it.
    confounders: Confounders | None = None
    machine_id: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Victim:
    """The process as it was just before the kill (or as last seen, in observe mode)."""

    __pydantic_config__ = _READER_CONFIG

    pid: Int64
    comm: str | None = None
    cmdline: str | None = None
    uid: Int64 | None = None
    start_time_ticks: Int64 | None = None  # field 22 of /proc/PID/stat, clock ticks since boot
    oom_score_adj: Int64 | None = None
    cgroup: str | None = None
    threads: Int64 | None = None
    vma_count: Int64 | None = None
    rss_kib: Int64 | None = None
    rss_anon_kib: Int64 | None = None
    rss_file_kib: Int64 | None = None
    rss_shmem_kib: Int64 | None = None
    swap_kib: Int64 | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Mrelease:
    """The process_mrelease(2) call made on the reaper thread."""

    __pydantic_config__ = _READER_CONFIG

    status: MreleaseStatus
    ret: Int64 | None = None
    errno: Int64 | None = None
    errno_name: str | None = None
    wall_ns: Int64 | None = None
    thread_cpu_ns: Int64 | None = None  # CPU time of the reaper thread across the call
    reaper_tid: Int64 | None = None
    note: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Steps:
    """CLOCK_MONOTONIC timestamps (ns) of each step of one kill, in the order they happen."""

    __pydantic_config__ = _READER_CONFIG

    start_ns: Int64
    pidfd_opened_ns: Int64 | None = None
    identity_checked_ns: Int64 | None = None
    sizes_read_ns: Int64 | None = None
    signal_sent_ns: Int64 | None = None
    mrelease_start_ns: Int64 | None = None
    mrelease_end_ns: Int64 | None = None
    exit_observed_ns: Int64 | None = None
    mem_recovered_ns: Int64 | None = None
    end_ns: Int64


@dataclasses.dataclass(frozen=True, kw_only=True)
class Pressure:
    """The pressure event that led to the decision (daemon only)."""

    __pydantic_config__ = _READER_CONFIG

    level: str | None = None
    source: str | None = None  # e.g. "/proc/pressure/memory" or a cgroup's memory.pressure
    mechanism: str | None = None  # "trigger" or "poll"
    some_avg10: float | None = None
    full_avg10: float | None = None
    some_total_us: Int64 | None = None
    full_total_us: Int64 | None = None
    event_ns: Int64 | None = None  # when the loop woke for the event
    decision_latency_ns: Int64 | None = None  # event wake -> SIGKILL sent (or -> decision, in dry run)
    rank: Int64 | None = None  # place of this victim in the ranking (0 = first choice)
    reason: str | None = None  # why this victim was chosen
    # Why a kill was needed, in Android lmkd's names where lmkd has one (low_mem_and_swap,
    # low_mem_and_thrashing, direct_recl_and_thrashing, low_swap_and_thrashing, low_mem_and_swap_util,
    # low_filecache_after_thrashing, pressure_after_kill, not_responding) and this project's own
    # (mem_floor, cgroup_headroom, psi_<level>).
    kill_reason: str | None = None
    signals: dict[str, float | Int64 | None] | None = None  # the values that decided, units in the names


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelTimeline:
    """Kernel-side view of one kill from tracefs and the proc connector (nullable field by field)."""

    __pydantic_config__ = _READER_CONFIG

    source: str | None = None  # e.g. "tracefs+proc_connector", "function_graph"
    unavailable_reason: str | None = None  # why the timeline (or part of it) is missing
    signal_generate_ns: Int64 | None = None
    signal_deliver_ns: Int64 | None = None
    mrelease_enter_ns: Int64 | None = None
    mrelease_exit_ns: Int64 | None = None
    mrelease_ret: Int64 | None = None
    exit_start_ns: Int64 | None = None  # sched_process_exit (before exit_mm on 6.16+, after it before)
    exit_mmap_end_ns: Int64 | None = None
    proc_exit_ns: Int64 | None = None  # proc connector exit event timestamp
    oom_reaper_start_ns: Int64 | None = None
    oom_reaper_end_ns: Int64 | None = None
    freed_by_reaper_kib: dict[str, Int64] | None = None  # by kind: file, anon, swap, shmem
    freed_by_victim_kib: dict[str, Int64] | None = None
    mmap_lock_wait_ns: dict[str, Int64] | None = None  # side ("reaper", "victim") -> total ns
    lock_contention_ns: dict[str, Int64] | None = None
    lock_contention_count: dict[str, Int64] | None = None
    reaper_work_ns: Int64 | None = None
    exit_mmap_ns: Int64 | None = None
    reap_total_ns: Int64 | None = None  # reaper work + exit_mmap
    reap_throughput_mib_s: float | None = None
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KilledBy:
    """Who killed, in observe mode."""

    __pydantic_config__ = _READER_CONFIG

    kind: str  # "kernel_oom", "process"
    pid: Int64 | None = None
    comm: str | None = None
    match: str | None = None  # how a process_mrelease call was matched to this victim


@dataclasses.dataclass(frozen=True, kw_only=True)
class KillRecord:
    """One kill attempt."""

    __pydantic_config__ = _READER_CONFIG

    schema_version: Int64 = SCHEMA_VERSION
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
    mem_available_before_kib: Int64 | None = None
    mem_available_after_kib: Int64 | None = None
    mem_recovered_kib: Int64 | None = None
    mem_recovery_target_kib: Int64 | None = None
    kill_to_exit_ns: Int64 | None = None
    kill_to_mem_recovered_ns: Int64 | None = None
    exit_timeout_ns: Int64 | None = None
    error: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    pressure: Pressure | None = None
    kernel: KernelTimeline | None = None
    killer: KilledBy | None = None
    provenance: Provenance = dataclasses.field(default_factory=Provenance)


def record_dict(record: KillRecord) -> dict[str, Any]:
    """The record as JSON-ready builtins (what ``record_json`` writes)."""
    out: dict[str, Any] = plain(record)
    return out


def record_json(record: KillRecord, *, indent: int | None = None) -> str:
    """One record as JSON text, UTF-8 ready (no NaN, compact unless ``indent``). Strings from /proc are
    decoded with errors="replace" before they reach a record, so every one encodes."""
    separators = (",", ":") if indent is None else (",", ": ")
    return json.dumps(record_dict(record), ensure_ascii=False, separators=separators, indent=indent)


@cache
def adapter() -> TypeAdapter[KillRecord]:
    """The pydantic validator of KillRecord: the reader's and the JSON Schema's (built on first use,
    ~30 ms and several MiB, so never in a daemon that only writes)."""
    from pydantic import TypeAdapter

    return TypeAdapter(KillRecord)


def validate_record(obj: object) -> KillRecord:
    """A record from parsed JSON (lax: JSON numbers and strings to the fields' types).
    Raises pydantic.ValidationError."""
    return adapter().validate_python(obj)


def json_schema() -> dict[str, Any]:
    """JSON Schema of one record line."""
    return adapter().json_schema()


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
        line = (record_json(record) + "\n").encode()
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


MAX_LINE_BYTES = 1 << 20  # a record is a few KiB; a longer line is skipped unread (a 1 GB line, /dev/zero)
_SKIP_CHUNK_BYTES = 1 << 16
PROBLEMS_KEPT = 1000  # skipped-line notes kept word for word; the rest are only counted


class Problems:
    """Notes on skipped lines (``file:line: skipped: why``): the first ``limit`` kept, all counted, so a
    file of a million bad lines costs a counter, not a million strings.

    Reads like the list it replaces: ``len()`` is the total, iteration and slicing give the kept notes.
    """

    def __init__(self, limit: int = PROBLEMS_KEPT) -> None:
        self.limit = limit
        self.notes: list[str] = []
        self.total = 0

    def append(self, note: str) -> None:
        self.total += 1
        if len(self.notes) < self.limit:
            self.notes.append(note)

    @classmethod
    def combined(cls, *parts: Problems) -> Problems:
        """The notes of several sets in order, their totals summed."""
        out = cls()
        for part in parts:
            out.notes.extend(part.notes[: out.limit - len(out.notes)])
            out.total += part.total
        return out

    def __len__(self) -> int:
        return self.total

    def __bool__(self) -> bool:
        return self.total > 0

    def __iter__(self) -> Iterator[str]:
        return iter(self.notes)

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> list[str]: ...
    def __getitem__(self, index: int | slice) -> str | list[str]:
        return self.notes[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Problems):
            return self.total == other.total and self.notes == other.notes
        if isinstance(other, list):
            return self.total == len(other) and self.notes == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable, like the list it stands for

    def __repr__(self) -> str:
        return f"Problems(total={self.total}, notes={self.notes!r})"


class ProblemSink(Protocol):
    """Where skipped-line notes go: a ``Problems`` or a plain list."""

    def append(self, note: str, /) -> None: ...


@dataclass
class ReadResult:
    records: list[KillRecord] = field(default_factory=list)
    problems: Problems = field(default_factory=Problems)  # lines skipped, each naming file:line and why


def iter_lines(fh: BinaryIO, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes | None, bool]]:
    """``(line number, line, complete)`` for each line of ``fh``, in constant memory per line.

    ``line`` is None for a line longer than ``max_line_bytes``, which is read past in chunks and never
    held whole (a 1 GB line, or a stream of zeros without a newline). ``complete``: the line ended with a
    newline (only the last line of a file can lack one).
    """
    lineno = 0
    while True:
        raw = fh.readline(max_line_bytes + 1)
        if not raw:
            return
        lineno += 1
        if raw.endswith(b"\n"):
            yield lineno, raw, True
        elif len(raw) <= max_line_bytes:
            yield lineno, raw, False  # the end of the file, without a newline
        else:
            complete = False
            while chunk := fh.readline(_SKIP_CHUNK_BYTES):
                if chunk.endswith(b"\n"):
                    complete = True
                    break
            yield lineno, None, complete


def parse_line(path: Path, lineno: int, raw: bytes | None, truncated: bool, problems: ProblemSink) -> KillRecord | None:
    """One JSONL line to a record, or None after noting in ``problems`` why it was skipped
    (``file:line: skipped: why``). ``raw`` None: the line was too long to read (see ``iter_lines``).
    ``truncated``: the line is the file's last and has no newline, so a JSON error there is a write cut
    short. Never raises on any content: the line is untrusted input. A record of a newer schema version
    is skipped too (reading it with this schema could misread it), with a note saying to upgrade."""
    where = f"{path}:{lineno}: skipped:"
    if raw is None:
        problems.append(f"{where} line longer than {MAX_LINE_BYTES >> 20} MiB (not read)")
        return None
    from pydantic import ValidationError
    from pydantic_core import from_json

    try:
        # pydantic's parser, not json.loads: it has a nesting limit (json.loads raises RecursionError
        # at ~1000 levels) and no 4300-digit integer limit (a ValueError outside JSONDecodeError). It
        # takes NaN/Infinity as json.loads and model_validate_json do; readers treat them as unknown.
        obj = from_json(raw)
    except ValueError as exc:
        why = "truncated last line (a write cut short)" if truncated else f"not JSON ({printable(str(exc))})"
        problems.append(f"{where} {why}")
        return None
    if not isinstance(obj, dict):
        problems.append(f"{where} not a JSON object")
        return None
    version = obj.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        problems.append(f"{where} no integer schema_version (not an lmkd-py record?)")
        return None
    if version > SCHEMA_VERSION:
        shown = version if version < 1 << 32 else "(huge)"
        problems.append(
            f"{where} record schema_version {shown} is newer than this lmkd-py understands "
            f"({SCHEMA_VERSION}); upgrade lmkd-py to read it"
        )
        return None
    try:
        return validate_record(obj)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        loc = printable(".".join(str(p) for p in first["loc"]), max_chars=120)
        problems.append(f"{where} field {loc!r}: {first['msg']}")
        return None


def iter_records(path: Path, problems: ProblemSink | None = None) -> Iterator[KillRecord]:
    """Yield the records of one JSONL file, streaming (memory does not grow with the file).

    Lines that cannot be records are skipped and noted in ``problems`` as ``file:line: skipped: why``,
    so one damaged line never costs the rest of a field data set: a last line without its newline that
    does not parse (a write cut short: power loss, full disk), a line that is not JSON, not a record,
    longer than MAX_LINE_BYTES, or of a newer schema version than this lmkd-py knows.
    Raises OSError when the file cannot be opened or read.
    """
    sink: ProblemSink = problems if problems is not None else Problems()
    with path.open("rb") as fh:
        for lineno, raw, complete in iter_lines(fh):
            if raw is not None and not raw.strip():
                continue
            rec = parse_line(path, lineno, raw, not complete, sink)
            if rec is not None:
                yield rec


def read_records(paths: Iterable[Path]) -> ReadResult:
    """Read every record of several files (see iter_records for what is skipped and what raises)."""
    result = ReadResult()
    for path in paths:
        result.records.extend(iter_records(Path(path), result.problems))
    return result
