"""Capture a live process's memory shape from ``/proc/PID/smaps``, ``status``, ``mountinfo`` and
``task/``, and read/write shape files.

Reading another user's smaps needs ptrace read access (root or CAP_SYS_PTRACE over the process): without
it the kernel answers EACCES and the capture stops, saying so. What is optional (mountinfo, task/)
and could not be read is named in the shape's ``unreadable`` list instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import lmkd_py
from lmkd_py.procfs import parse_meminfo, parse_status_kib
from lmkd_py.shape.model import (
    MAX_FILE_BYTES,
    STATUS_FIELDS,
    Shape,
    ShapeError,
    ShapeProvenance,
    ShapeVma,
    dumps,
    loads,
)
from lmkd_py.shape.plan import Machine
from lmkd_py.shape.smaps import SmapsParseError, classify, parse_mountinfo_devices, parse_smaps

_STATUS_KEYS: Final = dict(zip(STATUS_FIELDS, ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmSwap", "VmLck",
                                               "VmPTE", "HugetlbPages"), strict=True))
THP_ROOT: Final = Path("/sys/kernel/mm/transparent_hugepage")
# The catalog of captured shapes in a checkout (workloads/NAME.json next to lmkd_py/).
CATALOG: Final = Path(__file__).resolve().parents[2] / "workloads"


class CaptureError(RuntimeError):
    """The shape could not be captured; the message says why, for the user."""


def _start_time(proc: Path, pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (after the last ')'), or None when the process is gone."""
    try:
        text = (proc / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(text.rpartition(")")[2].split()[19])


def _owner(proc: Path, pid: int) -> str:
    try:
        return f"uid {(proc / str(pid)).stat().st_uid}"
    except OSError:
        return "another user"


def _read_smaps(proc: Path, pid: int) -> str:
    path = proc / str(pid) / "smaps"
    try:
        return path.read_text(errors="replace")
    except PermissionError:
        raise CaptureError(
            f"cannot read {path}: permission denied. The process runs as {_owner(proc, pid)}; reading another "
            "user's memory map needs root or CAP_SYS_PTRACE over that process (ptrace read access)"
        ) from None
    except (FileNotFoundError, ProcessLookupError):
        raise CaptureError(f"process {pid} exited during capture (its smaps vanished)") from None


def _thp_enabled() -> str | None:
    try:
        text = (THP_ROOT / "enabled").read_text()
    except OSError:
        return None
    return text[text.find("[") + 1 : text.find("]")] if "[" in text else text.strip()


def _hugepage_kib() -> int | None:
    try:
        return int((THP_ROOT / "hpage_pmd_size").read_text()) // 1024
    except (OSError, ValueError):
        return None


def capture(
    pid: int,
    *,
    keep_paths: bool = False,
    proc: Path = Path("/proc"),
    page_size: int | None = None,
    warn: Callable[[str], None] | None = None,
) -> Shape:
    """The memory shape of process ``pid``. File names are dropped unless ``keep_paths``.

    Raises CaptureError: no such process, it exited during the capture, it has no memory (a kernel
    thread or a zombie), or its smaps cannot be read (another user's process without the privilege)."""
    page = page_size or os.sysconf("SC_PAGE_SIZE")
    t0 = _start_time(proc, pid)
    if t0 is None:
        raise CaptureError(f"no process {pid}")
    unreadable: list[str] = []

    def optional(name: str) -> str:
        try:
            return (proc / str(pid) / name).read_text(errors="replace")
        except PermissionError:
            unreadable.append(f"{name}: permission denied")
        except (FileNotFoundError, ProcessLookupError):
            unreadable.append(f"{name}: gone")
        except OSError as exc:  # a zombie's mountinfo gives EINVAL
            unreadable.append(f"{name}: {exc.strerror}")
        return ""

    status = optional("status")
    mountinfo = optional("mountinfo")
    if not mountinfo:
        unreadable.append("mountinfo unavailable: shmem told apart from disk files by name only "
                          "(/dev/shm files may count as file_shared)")
    smaps = _read_smaps(proc, pid)
    try:
        tasks = sum(1 for _ in (proc / str(pid) / "task").iterdir())
    except PermissionError:
        tasks = 0
        unreadable.append("task/: permission denied")
    except (FileNotFoundError, ProcessLookupError):
        tasks = 0
    if _start_time(proc, pid) != t0:
        raise CaptureError(f"process {pid} exited during capture (its pid is gone or now names another process)")
    try:
        entries = parse_smaps(smaps)
    except SmapsParseError as exc:
        raise CaptureError(f"/proc/{pid}/smaps: {exc}") from None
    if not entries:
        raise CaptureError(f"process {pid} has no memory map (a kernel thread, or a zombie that already "
                           "released its memory)")
    fstypes = parse_mountinfo_devices(mountinfo)
    vmas = []
    files: dict[str, dict[tuple[tuple[int, int], int], int]] = {}
    for e in entries:
        cls = classify(e, fstypes, page)
        file_no = None
        if cls in ("file_private", "file_shared", "shmem"):
            per = files.setdefault(cls, {})
            file_no = per.setdefault((e.dev, e.inode), len(per))
        rss = e.get("Private_Hugetlb") + e.get("Shared_Hugetlb") if cls == "hugetlb" else e.get("Rss")
        dirty = min(rss, e.get("Private_Dirty") + e.get("Shared_Dirty"))
        thp = min(rss, e.get("AnonHugePages") + e.get("ShmemPmdMapped") + e.get("FilePmdMapped"))
        vmas.append(ShapeVma(
            cls=cls, prot=e.perms[:3], size_kib=max(1, e.size_kib), rss_kib=min(rss, e.size_kib),
            dirty_kib=dirty, swap_kib=min(e.get("Swap"), e.size_kib - min(rss, e.size_kib)), thp_kib=thp,
            locked_kib=min(e.get("Locked"), e.size_kib), file=file_no, path=e.path if keep_paths else None,
        ))
    threads_line = parse_status_kib("\n" + status, "Threads") if status else None
    threads = threads_line or tasks or 1
    uts = os.uname()
    comm = (status.split("\n", 1)[0].partition(":")[2].strip() or None) if status.startswith("Name:") else None
    prov = ShapeProvenance(
        comm=comm, kernel=uts.release, arch=uts.machine, page_size=page, hugepage_kib=_hugepage_kib(),
        captured_at=datetime.now(UTC).isoformat(timespec="seconds"), lmkd_py_version=lmkd_py.__version__,
        paths_kept=keep_paths, thp_enabled=_thp_enabled(),
    )
    st = {name: parse_status_kib("\n" + status, key) if status else None for name, key in _STATUS_KEYS.items()}
    for note in unreadable:
        if warn is not None:
            warn(note)
    return Shape(provenance=prov, threads=threads, vmas=tuple(vmas), status=st, unreadable=tuple(unreadable))


def find_shape(arg: str | Path) -> Path:
    """``arg`` as a path when it names a file; else ``workloads/...`` relative to this checkout, or the
    catalog's ``workloads/ARG.json`` for a bare name; else ``arg`` as given (reading it then says what is
    missing)."""
    path = Path(arg).expanduser()
    if path.exists():
        return path
    in_checkout = CATALOG.parent / path  # "workloads/NAME.json" from any directory
    if not path.is_absolute() and path.parts[:1] == (CATALOG.name,) and in_checkout.is_file():
        return in_checkout
    named = CATALOG / f"{arg}.json"
    return named if "/" not in str(arg) and named.is_file() else path


def read_shape(path: Path) -> Shape:
    """Read and check a shape file. Raises ShapeError (naming the file, and the field when one is bad) or
    OSError."""
    with open(path, "rb") as fh:
        data = fh.read(MAX_FILE_BYTES + 1)
    try:
        return loads(data)
    except ShapeError as exc:
        raise ShapeError(f"{path}: {exc}") from None


def write_shape(shape: Shape, path: Path) -> None:
    """Write ``shape`` to ``path`` (replaced atomically, 0644)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(dumps(shape))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def this_machine(proc: Path = Path("/proc")) -> Machine:
    """The facts of this machine a replay depends on (arch, page size, THP size, MemAvailable,
    vm.max_map_count, swap, free huge pages); what cannot be read is None or 0."""
    try:
        mem = parse_meminfo((proc / "meminfo").read_text())
    except OSError:
        mem = {}
    try:
        max_map = int((proc / "sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        max_map = None
    return Machine(
        arch=os.uname().machine, page_size=os.sysconf("SC_PAGE_SIZE"), hugepage_kib=_hugepage_kib(),
        mem_available_kib=mem.get("MemAvailable"), max_map_count=max_map, swap_total_kib=mem.get("SwapTotal", 0),
        hugetlb_free_kib=mem.get("HugePages_Free", 0) * mem.get("Hugepagesize", 0),
    )
