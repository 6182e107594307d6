"""The program a stress victim or thrasher runs: ``python -I -S child.py CONFIG_JSON``.

It imports only the standard library (it is started with ``-I -S`` so that any interpreter, even one
without lmkd-py installed, can run it), and it is the one place outside ``syscalls.py`` that uses ctypes:
``mmap(MAP_FIXED)``, ``munmap`` and ``madvise`` are needed to lay out VMAs exactly, which the ``mmap``
module cannot do, and this program never imports lmkd-py.

Order of work, so that every page the victim allocates is charged to the right memcg:
join the cgroups -> set oom_score_adj -> set comm -> map and touch memory -> start threads ->
print one JSON line ``{"ready": ...}`` on stdout -> block reading stdin. When stdin reaches EOF (the
parent closed it or died) the process exits, so a victim never outlives the parent that made it.

Layout of one kind (anon, file or shmem) with N VMAs: one PROT_NONE reservation of
``pages + N + 1`` pages: a guard page, then the N pieces mapped MAP_FIXED over it with a one-page hole
between neighbours, then a guard page. The holes are unmapped and the guards stay PROT_NONE; both keep
the kernel from merging neighbours (kernel-notes: adjacent anonymous mappings merge), so
``/proc/PID/maps`` shows exactly N lines between the guards, and N + 2 for the kind in all.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

PROT_NONE = 0
PROT_READ = 1
PROT_WRITE = 2
MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_NORESERVE = 0x4000
# Same values on x86_64 and arm64 (asm-generic/mman-common.h).
MADV_RANDOM = 1
MADV_NOHUGEPAGE = 15
MADV_POPULATE_READ = 22  # Linux 5.14
MADV_POPULATE_WRITE = 23
SPARSE_STRIDE = 4  # --touch sparse touches one page in this many
_CHUNK = 1 << 20


def split_pieces(pages: int, vmas: int) -> list[int]:
    """Page counts of ``vmas`` pieces that together hold ``pages`` pages, as equal as possible (the
    first ``pages % vmas`` pieces get one page more). Raises ValueError when a piece would be empty."""
    if vmas < 1 or pages < vmas:
        raise ValueError(f"cannot split {pages} pages into {vmas} non-empty VMAs")
    base, extra = divmod(pages, vmas)
    return [base + 1 if i < extra else base for i in range(vmas)]


def touched_pages(first_index: int, count: int, touch: str) -> Iterator[tuple[int, int]]:
    """Runs ``(offset_pages, length_pages)`` to touch inside a piece whose first page has the global
    index ``first_index`` within its kind. ``sparse`` touches pages whose global index is a multiple of
    SPARSE_STRIDE, so a kind's RSS is ceil(pages / SPARSE_STRIDE) however it is split."""
    if touch == "all":
        yield (0, count)
        return
    start = (-first_index) % SPARSE_STRIDE
    for off in range(start, count, SPARSE_STRIDE):
        yield (off, 1)


class _Libc:
    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._mmap = libc.mmap
        self._mmap.restype = ctypes.c_void_p
        self._mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                               ctypes.c_int, ctypes.c_long]
        self._munmap = libc.munmap
        self._munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self._madvise = libc.madvise
        self._madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

    def mmap(self, addr: int, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
        res = self._mmap(addr or None, length, prot, flags, fd, offset)
        if res is None or res == ctypes.c_void_p(-1).value:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap({length} bytes): {os.strerror(err)}")
        return int(res)

    def munmap(self, addr: int, length: int) -> None:
        if self._munmap(addr, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"munmap: {os.strerror(err)}")

    def madvise(self, addr: int, length: int, advice: int) -> int:
        """Returns 0 or the errno (callers fall back when POPULATE is missing)."""
        return 0 if self._madvise(addr, length, advice) == 0 else ctypes.get_errno()


def _open_unnamed(workdir: str) -> int:
    """A regular file in ``workdir`` that has no name, so a SIGKILLed child leaves nothing behind."""
    try:
        return os.open(workdir, os.O_TMPFILE | os.O_RDWR, 0o600)
    except OSError:
        # O_TMPFILE is missing on some filesystems: create, then unlink at once.
        import tempfile

        fd, path = tempfile.mkstemp(prefix="lmkd-py-", dir=workdir)
        os.unlink(path)
        return fd


def _populate(libc: _Libc, addr: int, length: int, write: bool) -> None:
    err = libc.madvise(addr, length, MADV_POPULATE_WRITE if write else MADV_POPULATE_READ)
    if err == 0:
        return
    # Kernels before 5.14 have no MADV_POPULATE_*: fault page by page.
    page = os.sysconf("SC_PAGE_SIZE")
    for off in range(0, length, page):
        if write:
            ctypes.memset(addr + off, 0x5A, 1)
        else:
            ctypes.string_at(addr + off, 1)


def map_kind(libc: _Libc, kind: str, pages: int, vmas: int, touch: str, workdir: str) -> list[int]:
    """Map ``pages`` pages of ``kind`` as ``vmas`` separate VMAs and touch them.

    Returns ``[reservation_start, reservation_end]``: every piece lies inside. Raises OSError.
    """
    page = os.sysconf("SC_PAGE_SIZE")
    pieces = split_pieces(pages, vmas)
    span = (pages + vmas + 1) * page
    base = libc.mmap(0, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    fd = -1
    if kind == "shmem":
        fd = os.memfd_create("lmkd-py-shmem")
    elif kind == "file":
        fd = _open_unnamed(workdir)
    try:
        if fd >= 0:
            # A sparse file: read faults put zero-filled page-cache pages in place (RssFile) without
            # disk writes; shmem pages are allocated by the write faults.
            os.ftruncate(fd, pages * page)
        if kind == "file":
            prot, flags = PROT_READ, MAP_PRIVATE  # like an app's code and resources: private, read-only
        elif kind == "shmem":
            prot, flags = PROT_READ | PROT_WRITE, MAP_SHARED
        else:
            prot, flags = PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS
        addr = base + page
        index = 0
        for i, count in enumerate(pieces):
            length = count * page
            libc.mmap(addr, length, prot, flags | MAP_FIXED, fd, index * page if fd >= 0 else 0)
            if i < len(pieces) - 1:
                libc.munmap(addr + length, page)  # the hole between this piece and the next
            if kind == "anon" and touch == "sparse":
                # A THP would fault 2 MiB for one touched page and defeat "sparse".
                libc.madvise(addr, length, MADV_NOHUGEPAGE)
            elif kind == "file" and touch == "sparse":
                # No readahead: fault-around would map the read-ahead neighbours and RSS would be full.
                libc.madvise(addr, length, MADV_RANDOM)
            for off, run in touched_pages(index, count, touch):
                _populate(libc, addr + off * page, run * page, write=kind != "file")
            addr += length + page
            index += count
    finally:
        if fd >= 0:
            os.close(fd)  # the mappings keep the file alive
    # The first and last page of the reservation stay PROT_NONE guards: an unmapped outer hole would join
    # the free space around it and the next mapping there (a thread stack, seen) would merge with a piece.
    return [base + page, base + span - page]


def _join_cgroups(procs_files: list[str]) -> None:
    for path in procs_files:
        with open(path, "w") as f:
            f.write(str(os.getpid()))


def _set_identity(cfg: dict[str, Any]) -> None:
    adj = cfg.get("adj")
    if adj is not None:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(adj))
    with open("/proc/self/comm", "w") as f:
        f.write(str(cfg["comm"])[:15])


def _exit_on_eof() -> None:
    while os.read(0, 4096):
        pass
    os._exit(0)


def run_victim(cfg: dict[str, Any]) -> None:
    libc = _Libc()
    regions = []
    for kind, pages, vmas in cfg["plans"]:
        start, end = map_kind(libc, kind, pages, vmas, cfg["touch"], cfg["workdir"])
        regions.append([kind, start, end, vmas])
    stop = threading.Event()
    for _ in range(int(cfg["threads"]) - 1):
        threading.Thread(target=stop.wait, daemon=True).start()
    sys.stdout.write(json.dumps({"ready": True, "pid": os.getpid(), "regions": regions}) + "\n")
    sys.stdout.flush()
    _exit_on_eof()


def run_thrasher(cfg: dict[str, Any]) -> None:
    """Write a file from inside the memcg, then read it through a mapping forever. A file larger than
    the memcg limit cannot stay cached: every pass reclaims and refaults, which PSI counts as stall."""
    libc = _Libc()
    size = int(cfg["file_bytes"])
    fd = os.open(cfg["file_path"], os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.unlink(cfg["file_path"])  # nothing is left behind, even after a SIGKILL
    block = bytes(range(256)) * (_CHUNK // 256)
    written = 0
    while written < size:
        written += os.write(fd, block[: min(_CHUNK, size - written)])
        if written % (16 * _CHUNK) == 0:
            # Bound the dirty pages: memcg v1 reclaim cannot write them back itself.
            os.fdatasync(fd)
    os.fdatasync(fd)
    addr = libc.mmap(0, size, PROT_READ, MAP_SHARED, fd, 0)
    os.close(fd)
    # Default readahead on purpose: with MADV_RANDOM the same loop stalled ~50x less here (45 ms of
    # "some" in 10 s against ~2.5 s), as small synchronous reads leave reclaim little to do per fault.
    threading.Thread(target=_exit_on_eof, daemon=True).start()
    sys.stdout.write(json.dumps({"ready": True, "pid": os.getpid(), "regions": [["file", addr, addr + size, 1]]})
                     + "\n")
    sys.stdout.flush()
    while True:
        for off in range(0, size, _CHUNK):
            _populate(libc, addr + off, min(_CHUNK, size - off), write=False)


def main(argv: list[str]) -> None:
    cfg = json.loads(argv[1])
    # Whatever the parent had blocked or ignored, this process dies on the usual signals.
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    _join_cgroups(cfg["cgroup_procs"])  # before any allocation, so the memcg is charged
    _set_identity(cfg)
    if cfg["mode"] == "thrash":
        run_thrasher(cfg)
    else:
        run_victim(cfg)


if __name__ == "__main__":
    main(sys.argv)
