"""Memory shapes on the real kernel: a real process with memory of every kind it can make without
privileges, captured from its smaps; a replica made from the shape and captured in turn; the CLI as a
user runs it (also as ``nobody`` against root's process); the lab's in-guest loop with a shape, on this
machine. Every process started here is killed, every file removed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmkd_py.procfs import parse_status
from lmkd_py.shape import CaptureError, Shape, ShapeProvenance, ShapeVma, capture, compare, dumps, within
from lmkd_py.stress import ShapeVictim, spawn_shape_victim
from tests.conftest import NOBODY, SYSTEM_PYTHON, needs_root

# A program holding memory of many kinds: anonymous (small and large, THP-advised), a disk file shared
# and written, a private read-only file mapping, a /dev/shm file, a memfd, shared anonymous, threads.
PROGRAM = textwrap.dedent("""
    import mmap, os, sys, threading
    import ctypes, decimal, hashlib, json, sqlite3  # shared objects: more file VMAs than a replica's own
    d = sys.argv[1]
    PAGE = 4096
    keep = []
    for i in range(24):
        m = mmap.mmap(-1, (i + 1) * 16 * PAGE, flags=mmap.MAP_PRIVATE)
        m.write(b"a" * (len(m) // 2))
        keep.append(m)
        keep.append(mmap.mmap(-1, PAGE, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ))  # unlike neighbours: no merge
    big = mmap.mmap(-1, 16 << 20, flags=mmap.MAP_PRIVATE)
    big.madvise(mmap.MADV_HUGEPAGE)
    big.write(b"b" * (16 << 20))
    with open(os.path.join(d, "data"), "w+b") as f:
        f.truncate(4 << 20)
        fm = mmap.mmap(f.fileno(), 4 << 20)
    fm[: 1 << 20] = b"c" * (1 << 20)
    for off in range(1 << 20, 2 << 20, PAGE):
        fm[off]
    with open(os.path.join(d, "ro"), "w+b") as f:
        f.write(b"r" * (2 << 20))
        f.flush()
        ro = mmap.mmap(f.fileno(), 2 << 20, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    for off in range(0, 1 << 20, PAGE):
        ro[off]
    shm_path = "/dev/shm/lmkd-py-test-shape-%d" % os.getpid()
    with open(shm_path, "w+b") as f:
        f.truncate(2 << 20)
        sm = mmap.mmap(f.fileno(), 2 << 20)
    os.unlink(shm_path)
    sm[: 1 << 20] = b"s" * (1 << 20)
    fd = os.memfd_create("lmkd-py-test")
    os.ftruncate(fd, 1 << 20)
    mf = mmap.mmap(fd, 1 << 20)
    mf[: 512 << 10] = b"m" * (512 << 10)
    sa = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    sa[: 256 << 10] = b"z" * (256 << 10)
    stop = threading.Event()
    for _ in range(3):
        threading.Thread(target=stop.wait, daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()
""")


class Started:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[str]] = []
        self.replicas: list[ShapeVictim] = []

    def program(self, where: Path | None = None, python: str = sys.executable,
                **kw: object) -> subprocess.Popen[str]:
        p = subprocess.Popen([python, "-c", PROGRAM, str(where or self.tmp)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, **kw)  # type: ignore[call-overload]
        self.procs.append(p)
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        return p

    def replica(self, shape: Shape, scale: float = 1.0) -> ShapeVictim:
        v = spawn_shape_victim(shape, scale=scale, workdir=self.tmp)
        self.replicas.append(v)
        v.wait_ready(120)
        return v

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for v in self.replicas:
            v.kill()


@pytest.fixture
def started(tmp_path: Path) -> Iterator[Started]:
    s = Started(tmp_path)
    try:
        yield s
    finally:
        s.cleanup()


def test_capture_of_a_real_process(started: Started) -> None:
    p = started.program()
    shape = capture(p.pid)
    s = shape.summary()
    maps_lines = len(Path(f"/proc/{p.pid}/maps").read_text().splitlines())
    assert len(shape.vmas) == maps_lines
    for cls in ("anon_private", "anon_shared", "file_private", "file_shared", "shmem", "heap", "stack", "special"):
        assert s[cls].vmas >= 1, cls
    assert s["shmem"].vmas == 2 and s["shmem"].files == 2  # the /dev/shm file and the memfd
    assert s["shmem"].rss_kib == 1024 + 512 and s["shmem"].dirty_kib == 1024 + 512
    assert s["anon_shared"].rss_kib == 256
    assert s["file_shared"].rss_kib >= 2048 and s["file_shared"].dirty_kib >= 1024
    status = parse_status(Path(f"/proc/{p.pid}/status").read_text())
    assert shape.threads == status.threads == 4
    assert status.vm_rss_kib is not None and shape.rss_kib == pytest.approx(status.vm_rss_kib, rel=0.02)
    assert not any(v.path for v in shape.vmas) and str(started.tmp) not in dumps(shape)
    assert str(started.tmp) in dumps(capture(p.pid, keep_paths=True))


def test_replica_matches_the_original_class_by_class(started: Started) -> None:
    shape = capture(started.program().pid)
    replica = started.replica(shape)
    copy = capture(replica.pid)
    rows = compare(shape, copy)
    bad = [r for r in rows if not within(r, 0.05, floor_kib=64)]
    assert not bad, f"{bad}\nwarnings: {replica.warnings}"
    assert copy.threads == shape.threads
    thp = shape.summary()["anon_private"].thp_kib
    if thp:  # THP is available here: the replica has it too
        assert copy.summary()["anon_private"].thp_kib == pytest.approx(thp, rel=0.2)
    # The replica's disk files exist while it lives, and go with it.
    assert any(replica.filedir.iterdir()) and not replica.shmdir.exists()
    replica.kill()
    assert not replica.filedir.exists()


def test_scaled_replica(started: Started) -> None:
    shape = capture(started.program().pid)
    half = capture(started.replica(shape, scale=0.5).pid)
    double = capture(started.replica(shape, scale=2.0).pid)
    a = shape.summary()["anon_private"]
    assert half.summary()["anon_private"].rss_kib == pytest.approx(a.rss_kib * 0.5, rel=0.1)
    assert double.summary()["anon_private"].rss_kib == pytest.approx(a.rss_kib * 2, rel=0.05)
    assert double.summary()["anon_private"].vmas == pytest.approx(a.vmas * 2, rel=0.05)
    assert double.threads == 2 * shape.threads and half.threads == shape.threads // 2


def test_capture_of_a_process_that_exited(started: Started) -> None:
    p = started.program()
    p.kill()
    # Unreaped: a zombie, whose memory is gone but whose pid still names it.
    os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)
    with pytest.raises(CaptureError, match=f"process {p.pid} has no memory map"):
        capture(p.pid)
    p.wait()
    with pytest.raises(CaptureError, match=f"no process {p.pid}"):
        capture(p.pid)


def _cli(*args: str, prefix: list[str] | None = None, env: dict[str, str] | None = None,
         **kw: object) -> subprocess.CompletedProcess[str]:
    cmd = [*(prefix or [sys.executable, "-m", "lmkd_py.cli"]), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, **kw)  # type: ignore[call-overload]


def test_cli_capture_then_stress_replays_it(started: Started, tmp_path: Path) -> None:
    p = started.program()
    out = tmp_path / "shape.json"
    res = _cli("shape", "capture", str(p.pid), "-o", str(out), "--note", "the test program")
    assert res.returncode == 0, res.stderr
    assert "VMAs" in res.stderr and json.loads(out.read_text())["provenance"]["note"] == "the test program"
    res = _cli("stress", "--shape", str(out), "--duration", "0", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["victims"][0]["shape"]["threads"] == 4 and doc["scale"] == 1.0
    res = _cli("shape", "compare", str(out), str(out))
    assert res.returncode == 0 and "+0.0%" in res.stdout


def test_a_shape_larger_than_memory_is_refused_before_anything_starts(tmp_path: Path) -> None:
    huge = Shape(provenance=ShapeProvenance(comm="huge", kernel="x", arch=os.uname().machine, page_size=4096),
                 threads=1, vmas=(ShapeVma("anon_private", "rw-", 1 << 33, rss_kib=1 << 33, dirty_kib=1 << 33),))
    path = tmp_path / "huge.json"
    path.write_text(dumps(huge))
    res = _cli("stress", "--shape", str(path), "--duration", "0")
    assert res.returncode == 1
    assert "refused before allocating anything" in res.stderr and "MemAvailable" in res.stderr
    assert res.stdout == ""  # no replica was started (it would print its pid)
    path.write_text(dumps(huge).replace('"threads": 1', '"threads": "many"'))
    res = _cli("stress", "--shape", str(path), "--duration", "0")
    assert res.returncode == 2 and "threads: must be an integer" in res.stderr


@needs_root
def test_another_users_process(started: Started, nobody_python: tuple[list[str], dict[str, str]]) -> None:
    """Root captures nobody's process; nobody cannot capture root's and is told why."""
    theirs_dir = Path(tempfile.mkdtemp(prefix="lmkd-py-test-shape-"))
    try:
        os.chown(theirs_dir, NOBODY, NOBODY)
        theirs = started.program(theirs_dir, SYSTEM_PYTHON, user=NOBODY, group=NOBODY, extra_groups=[], cwd="/")
        assert capture(theirs.pid).summary()["shmem"].vmas == 2
        theirs.kill()
        theirs.wait()
    finally:
        shutil.rmtree(theirs_dir, ignore_errors=True)
    ours = started.program()
    prefix, env = nobody_python
    res = _cli("shape", "capture", str(ours.pid), prefix=prefix, env=env, user=NOBODY, group=NOBODY,
               extra_groups=[], cwd="/")
    assert res.returncode == 1
    assert "permission denied" in res.stderr and "CAP_SYS_PTRACE" in res.stderr and "uid 0" in res.stderr


def test_lab_in_guest_loop_replays_a_shape(started: Started) -> None:
    """The lab's in-guest program, run here: the job's shape becomes the victim and is killed."""
    from lmkd_py.lab.inguest import run_kills
    from lmkd_py.shape import shape_to_dict

    shape = capture(started.program().pid)
    emitted: list[tuple[str, dict[str, object]]] = []
    job = {"label": "T", "kills": 1, "victims": [], "shape": {"shape": shape_to_dict(shape), "scale": 0.5},
           "tracing": "off", "mrelease": True, "settle_ms": 50, "ready_timeout_s": 120}
    made, failed = run_kills(job, lambda kind, obj: emitted.append((kind, obj)))
    assert (made, failed) == (1, 0), emitted
    (record,) = [obj for kind, obj in emitted if kind == "record"]
    assert record["outcome"] == "killed" and "'shape'" in str(record["notes"])
