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

import sys

# The C accelerator of json is one more shared object (five VMAs) in every child; a shape replica's
# own VMAs are what it cannot take away, so the pure-Python json is used instead (parsing one plan).
if __name__ == "__main__":
    sys.modules.setdefault("_json", None)  # type: ignore[arg-type]  # None in sys.modules: "not importable"

import ctypes
import json
import os
import signal
import threading

# Not ``typing``: importing it loads one more shared object (_typing), five VMAs in a shape replica.
TYPE_CHECKING = False
if TYPE_CHECKING:
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
MAP_HUGETLB = 0x40000
# Same values on x86_64 and arm64 (asm-generic/mman-common.h).
MADV_RANDOM = 1
MADV_NOHUGEPAGE = 15
MADV_HUGEPAGE = 14
MADV_PAGEOUT = 21  # Linux 5.4
MADV_POPULATE_READ = 22  # Linux 5.14
MADV_POPULATE_WRITE = 23
MLOCK_ONFAULT = 1
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
        self._mprotect = libc.mprotect
        self._mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self._sbrk = libc.sbrk
        self._sbrk.restype = ctypes.c_void_p
        self._sbrk.argtypes = [ctypes.c_long]
        self._malloc_trim = getattr(libc, "malloc_trim", None)  # glibc only
        self._mlock2 = getattr(libc, "mlock2", None)  # glibc 2.27
        if self._mlock2 is not None:
            self._mlock2.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

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

    def mprotect(self, addr: int, length: int, prot: int) -> None:
        if self._mprotect(addr, length, prot) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mprotect: {os.strerror(err)}")

    def sbrk(self, increment: int) -> int:
        res = self._sbrk(increment)
        if res is None or res == ctypes.c_void_p(-1).value:
            err = ctypes.get_errno()
            raise OSError(err, f"sbrk({increment}): {os.strerror(err)}")
        return int(res)

    def malloc_trim(self) -> None:
        if self._malloc_trim is not None:
            self._malloc_trim(0)

    def mlock_onfault(self, addr: int, length: int) -> int:
        """Lock the pages present now and those faulted later; 0 or the errno."""
        if self._mlock2 is None:
            return 38  # ENOSYS
        return 0 if self._mlock2(addr, length, MLOCK_ONFAULT) == 0 else ctypes.get_errno()


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


# --- shape replay (lmkd_py.shape plans it; this executes it) -----------------------------------------
# A piece is [class, prot "rw-", size, rss, dirty, thp, swap, locked 0/1, file index or -1], bytes.
# Every piece is its own VMA: all of them lie in one PROT_NONE reservation, each separated from the
# next by an unmapped page (neighbours would merge otherwise), with a PROT_NONE guard page and a hole at
# both ends. Anonymous THP pieces start on a huge page boundary.


def _prot_bits(prot: str) -> int:
    return (PROT_READ if prot[0] == "r" else 0) | (PROT_WRITE if prot[1] == "w" else 0) | (4 if prot[2] == "x" else 0)


def _span(pieces: list[list[Any]], page: int, huge: int) -> int:
    total = 4 * page
    for p in pieces:
        if p[0] != "hugetlb":
            total += p[2] + page + (huge if p[5] else 0)
    return total


def _touch(libc: _Libc, addr: int, start: int, end: int, write: bool) -> None:
    if end > start:
        _populate(libc, addr + start, end - start, write)


def _fill(libc: _Libc, addr: int, piece: list[Any], warnings: list[str]) -> None:
    """Make ``piece`` (mapped at ``addr``, writable) resident and dirty as planned."""
    cls, _prot, size, rss, dirty, thp, swap, locked, _f = piece
    if cls == "anon_private":
        small = rss - thp
        if thp:
            # Small pages first, at the end, while THP is off; then the huge ones from the start.
            libc.madvise(addr, size, MADV_NOHUGEPAGE)
            _touch(libc, addr, size - small, size, True)
            libc.madvise(addr, size, MADV_HUGEPAGE)
            _touch(libc, addr, 0, min(thp, size - small), True)
        else:
            libc.madvise(addr, size, MADV_NOHUGEPAGE)  # "always" THP would fault 2 MiB per touch
            _touch(libc, addr, 0, rss, True)
    else:
        if cls in ("file_private", "file_shared"):
            # No readahead: only the pages touched become resident (fault-around maps cached pages only).
            libc.madvise(addr, size, MADV_RANDOM)
        _touch(libc, addr, 0, dirty, True)
        _touch(libc, addr, dirty, rss, False)
    if swap and cls in ("anon_private", "anon_shared", "shmem"):
        _touch(libc, addr, rss, rss + swap, True)
        if libc.madvise(addr + rss, swap, MADV_PAGEOUT):
            warnings.append(f"MADV_PAGEOUT failed: {swap} bytes stay resident")
    if locked:
        err = libc.mlock_onfault(addr, size)
        if err:
            warnings.append(f"mlock2 of a {size}-byte VMA failed: {os.strerror(err)}")


def _map_piece(libc: _Libc, addr: int, piece: list[Any], fds: list[int], offsets: list[int],
               warnings: list[str]) -> None:
    cls, prot, size, rss, dirty, _thp, swap, _locked, file_index = piece
    final = _prot_bits(prot)
    # Populating needs access: map readable and writable, then set the planned protection.
    work = final | PROT_READ | (PROT_WRITE if (dirty or swap or (cls.startswith("anon") and rss)) else 0)
    if rss and not final & PROT_READ:
        work |= PROT_READ | PROT_WRITE
    fd, offset = -1, 0
    if cls == "anon_private":
        flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE
    elif cls == "anon_shared":
        flags = MAP_SHARED | MAP_ANONYMOUS
    else:
        flags = MAP_SHARED if cls in ("file_shared", "shmem") else MAP_PRIVATE | MAP_NORESERVE
        fd, offset = fds[file_index], offsets[file_index]
        offsets[file_index] += size
    try:
        libc.mmap(addr, size, work, flags | MAP_FIXED, fd, offset)
    except PermissionError:
        # A noexec mount refuses PROT_EXEC on its files: map without it, and say so.
        warnings.append(f"{cls}: PROT_EXEC refused on this mount, mapped without it")
        work &= ~4
        final &= ~4
        libc.mmap(addr, size, work, flags | MAP_FIXED, fd, offset)
    _fill(libc, addr, piece, warnings)
    if work != final:
        libc.mprotect(addr, size, final)


def _open_files(files: list[list[Any]], workdir: str, shmdir: str) -> tuple[list[int], list[str]]:
    fds: list[int] = []
    paths: list[str] = []
    for i, (kind, size) in enumerate(files):
        path = os.path.join(shmdir if kind == "shmem" else workdir, f"lmkd-py-shape-{os.getpid()}-{i}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        paths.append(path)
        fds.append(fd)
        os.ftruncate(fd, max(int(size), 1))  # sparse: the pages come from the faults
    return fds, paths


def _self_vma(name: str) -> tuple[int, int, int] | None:
    """(start, end, Rss bytes) of the VMA called ``name`` in /proc/self/smaps."""
    found = None
    with open("/proc/self/smaps") as fh:
        for line in fh:
            if found is None and line.rstrip().endswith(name):
                lo, hi = line.split()[0].split("-")
                found = [int(lo, 16), int(hi, 16)]
            elif found is not None and line.startswith("Rss:"):
                return found[0], found[1], int(line.split()[1]) * 1024
    return None


def _grow_heap(libc: _Libc, size: int, rss: int, page: int) -> None:
    """Grow the brk heap to ``rss`` resident bytes (and at least ``size`` long) with sbrk."""
    now = _self_vma("[heap]")
    have_size, have_rss = (now[1] - now[0], now[2]) if now else (0, 0)
    if rss < have_rss:
        # The interpreter's own heap is larger than the shape's: give back the free pages it holds
        # (glibc returns them with MADV_DONTNEED); it cannot shrink below what is in use.
        libc.malloc_trim()
        return
    more = max(0, rss - have_rss)
    grow = -(-max(more, size - have_size) // page) * page
    if grow <= 0:
        return
    start = libc.sbrk(grow)
    _touch(libc, start, 0, -(-more // page) * page, True)


def _stack_limit() -> int | None:
    """The soft RLIMIT_STACK in bytes from /proc/self/limits (the resource module is one more shared
    object), None when unlimited."""
    with open("/proc/self/limits") as fh:
        for line in fh:
            if line.startswith("Max stack size"):
                soft = line[len("Max stack size"):].split()[0]
                return None if soft == "unlimited" else int(soft)
    return None


def _grow_stack(libc: _Libc, rss: int, page: int, warnings: list[str]) -> None:
    """Grow the main thread's stack downwards until ``rss`` bytes of it are resident: a write below the
    stack VMA extends it (mm: expand_stack on a fault), the rest is populated."""
    now = _self_vma("[stack]")
    if now is None:
        return
    start, end, have = now
    more = -(-(rss - have) // page) * page
    if more <= 0:
        return
    limit = _stack_limit()
    if limit is not None and (end - start) + more > limit - (1 << 20):
        warnings.append(f"stack: {more} more bytes would pass RLIMIT_STACK; not grown")
        return
    low = start - more
    ctypes.memset(low, 0, 1)
    _touch(libc, low, 0, more, True)


def map_shape(libc: _Libc, plan: dict[str, Any], workdir: str, shmdir: str) -> tuple[list[list[Any]], list[str]]:
    """Map and fill every piece of ``plan``; returns the ready message's regions and warnings."""
    page, huge = int(plan["page"]), int(plan["hugepage"])
    pieces = plan["pieces"]
    warnings: list[str] = []
    fds, paths = _open_files(plan["files"], workdir, shmdir)
    offsets = [0] * len(fds)
    span = _span(pieces, page, huge)
    base = libc.mmap(0, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    placed: list[tuple[int, int]] = []
    cursor = base + 2 * page
    try:
        for piece in pieces:
            if piece[0] == "hugetlb":
                addr = libc.mmap(0, piece[2], _prot_bits(piece[1]) | PROT_READ | PROT_WRITE,
                                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0)
                _touch(libc, addr, 0, piece[3], True)
                continue
            if piece[5]:
                cursor = -(-cursor // huge) * huge
            _map_piece(libc, cursor, piece, fds, offsets, warnings)
            placed.append((cursor, cursor + piece[2]))
            cursor += piece[2] + page
    finally:
        for fd in fds:
            os.close(fd)  # the mappings keep the files alive
        for path in paths:
            if path.startswith(shmdir + os.sep):
                os.unlink(path)  # shmem dies with its last mapping, as a memfd does
    # Disk files stay linked until the parent removes their directory after this process is gone: a
    # program's mapped files (its libraries) outlive it, and deleting inodes in the exit path (the last
    # fput of an unlinked file) would add work to kill->exit that the original never does.
    # Give back what no piece took, except the two guard pages at the ends.
    prev = base + page
    for lo, hi in placed:
        if lo > prev:
            libc.munmap(prev, lo - prev)
        prev = hi
    if base + span - page > prev:
        libc.munmap(prev, base + span - page - prev)
    if plan.get("heap"):
        _grow_heap(libc, int(plan["heap"][0]), int(plan["heap"][1]), page)
    if plan.get("stack"):
        _grow_stack(libc, int(plan["stack"][0]), page, warnings)
    return [["shape", base, base + span, len(placed)]], warnings


def run_shape(cfg: dict[str, Any]) -> None:
    """Start the threads, report the baseline, read the plan (one JSON line on stdin), map it, report
    ready, then live until stdin reaches EOF."""
    libc = _Libc()
    stop = threading.Event()
    for _ in range(int(cfg["threads"]) - 1):
        threading.Thread(target=stop.wait, daemon=True).start()
    sys.stdout.write(json.dumps({"baseline": True, "pid": os.getpid()}) + "\n")
    sys.stdout.flush()
    line = sys.stdin.buffer.readline()
    if not line:
        os._exit(0)
    regions, warnings = map_shape(libc, json.loads(line), cfg["workdir"], cfg["shmdir"])
    sys.stdout.write(json.dumps({"ready": True, "pid": os.getpid(), "regions": regions, "warnings": warnings})
                     + "\n")
    sys.stdout.flush()
    _exit_on_eof()


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
    elif cfg["mode"] == "shape":
        run_shape(cfg)
    else:
        run_victim(cfg)


if __name__ == "__main__":
    main(sys.argv)
