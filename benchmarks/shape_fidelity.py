"""Shape fidelity: real programs captured, replayed by ``stress --shape``, and killed side by side.

    sudo python benchmarks/shape_fidelity.py [--programs python-numpy,jvm,node-server] [--kills 10]
                                             [--save-shapes workloads/] [--smoke]

For each program (started here from packages: numpy from the venv's report extra, a JVM and Node.js
from Debian; a missing ``java``/``javac`` or ``node`` is installed with apt-get and said so):

1. start it, let it reach its steady state ("ready"), capture its shape (``lmkd_py.shape.capture``);
2. replay the shape (``spawn_shape_victim``), capture the replica, print the fidelity per class: VMA
   count and resident memory of the replica against the original (target: within 5 %);
3. kill original and replica alternately with the project's Killer (SIGKILL + process_mrelease on its
   reaper thread) and the tracefs timeline, a fresh original (and replica) for every kill: medians of
   kill->exit and of the kernel's exit_mmap for both (target: within +-15 %).

``--save-shapes DIR`` writes each original's shape to ``DIR/NAME.json`` (the workloads/ catalog is made
this way). Needs root for the kernel timeline (without tracefs exit_mmap is n/a). Never fails on a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from _bench import broken, parse_args  # benchmarks/ is on sys.path when run as a script

from lmkd_py import log as logsetup
from lmkd_py.killer import Killer
from lmkd_py.procfs import ProcFs
from lmkd_py.records import KillRecord, Outcome
from lmkd_py.shape import Shape, capture, compare, format_table, within, write_shape
from lmkd_py.stress import spawn_shape_victim
from lmkd_py.syscalls import LinuxSyscalls
from lmkd_py.tracing import NullTracer, TracingUnavailable, open_tracer

NUMPY_JOB = """
import sys, time
import numpy as np
n = int(sys.argv[1])
rng = np.random.default_rng(0)
a = rng.random((n, n))                       # one large array (THP-sized anonymous memory)
b = a @ a[: n // 10].T                       # BLAS work: thread pool, scratch buffers
parts = [np.full(1 << 16, i, dtype=np.float64) for i in range(n // 40)]  # many mid-sized arrays
print("ready", flush=True)
time.sleep(3600)
"""

JAVA_JOB = """
import java.util.*;
public class Work {
    public static void main(String[] a) throws Exception {
        int n = Integer.parseInt(a[0]);
        Map<Integer, String> m = new HashMap<>();
        for (int i = 0; i < n * 4000; i++) m.put(i, "v" + i);
        List<byte[]> l = new ArrayList<>();
        for (int i = 0; i < n / 4; i++) { byte[] b = new byte[2 << 20]; Arrays.fill(b, (byte) 1); l.add(b); }
        System.out.println("ready"); System.out.flush();
        Thread.sleep(3_600_000L);
        System.out.println(m.size() + l.size());
    }
}
"""

NODE_JOB = """
const http = require('http');
const n = parseInt(process.argv[2]);
const objs = []; for (let i = 0; i < n * 3000; i++) objs.push({ i, s: 'x' + i });
const bufs = []; for (let i = 0; i < n / 20; i++) { const b = Buffer.alloc(4 << 20); b.fill(1); bufs.push(b); }
const server = http.createServer((req, res) => res.end(String(objs.length + bufs.length)));
server.listen(0, '127.0.0.1', () => console.log('ready'));
"""


@dataclass(frozen=True)
class Program:
    name: str
    what: str
    needs: tuple[tuple[str, str], ...]  # (command, Debian package that provides it)
    argv: Callable[[Path, int], list[str]]
    version: Callable[[], str]


def _out(cmd: list[str]) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return (res.stdout + res.stderr).strip().splitlines()[0] if (res.stdout + res.stderr).strip() else "?"


def _numpy_version() -> str:
    code = "import numpy, sys; print('numpy', numpy.__version__, 'python', sys.version.split()[0])"
    return _out([sys.executable, "-c", code])


def _write(work: Path, name: str, text: str) -> Path:
    path = work / name
    path.write_text(text)
    return path


PROGRAMS = {
    "python-numpy": Program(
        "python-numpy", "a Python data job with numpy (matrix product, many arrays)", (),
        lambda w, n: [sys.executable, str(_write(w, "numpy_job.py", NUMPY_JOB)), str(n * 1000)], _numpy_version),
    "jvm": Program(
        "jvm", "a JVM (OpenJDK, single-file source launch) filling a HashMap and byte arrays",
        (("java", "default-jdk-headless"), ("javac", "default-jdk-headless")),
        lambda w, n: ["java", "-Xmx512m", str(_write(w, "Work.java", JAVA_JOB)), str(n * 25)],
        lambda: _out(["java", "-version"])),
    "node-server": Program(
        "node-server", "a Node.js HTTP server holding objects and Buffers", (("node", "nodejs"),),
        lambda w, n: ["node", str(_write(w, "server.js", NODE_JOB)), str(n * 100)],
        lambda: "node " + _out(["node", "--version"])),
}


def ensure(program: Program) -> None:
    """Install the Debian packages a program needs when its commands are missing (and say so)."""
    missing = sorted({pkg for cmd, pkg in program.needs if shutil.which(cmd) is None})
    if not missing:
        return
    print(f"installing {' '.join(missing)} with apt-get for {program.name}", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], check=True, env=env,
                   stdout=subprocess.DEVNULL)


class Original:
    """One running original program; ``kill()`` is a no-op after the Killer has done it."""

    def __init__(self, argv: list[str], cwd: Path, timeout_s: float = 120.0) -> None:
        self.popen = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, start_new_session=True)
        assert self.popen.stdout is not None
        line = self.popen.stdout.readline().strip()
        if line != "ready":
            err = self.popen.stderr.read() if self.popen.stderr and self.popen.poll() is not None else ""
            self.kill()
            broken(f"{argv[0]} did not start: {line!r} {err[-2000:]}")
        time.sleep(0.5)  # let its last allocations settle (a JIT, a GC) before it is captured
        self.pid = self.popen.pid

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()
        for pipe in (self.popen.stdout, self.popen.stderr):
            if pipe is not None:
                pipe.close()


def kill_one(killer: Killer, pid: int) -> KillRecord:
    return killer.kill(killer.snapshot(pid))


def fidelity(program: Program, argv: list[str], work: Path, save: Path | None) -> tuple[Shape, bool]:
    orig = Original(argv, work)
    try:
        shape = capture(orig.pid)
    finally:
        orig.kill()
    if save is not None:
        note = (f"{program.what}; made by benchmarks/shape_fidelity.py ({' '.join(Path(a).name for a in argv)}); "
                f"{program.version()}")
        save.mkdir(parents=True, exist_ok=True)
        write_shape(dataclasses.replace(shape, provenance=dataclasses.replace(shape.provenance, note=note[:256])),
                    save / f"{program.name}.json")
    replica = spawn_shape_victim(shape, workdir=work)
    try:
        replica.wait_ready(120)
        copy = capture(replica.pid)
    finally:
        replica.kill()
    rows = compare(shape, copy)
    print(f"\n== {program.name}: {program.what}")
    print(f"   {program.version()}; {len(shape.vmas)} VMAs, {shape.rss_kib / 1024:.1f} MiB resident, "
          f"{shape.threads} threads (replica: {copy.threads})")
    print(format_table(rows), end="")
    thp = [sum(v.thp_kib for v in x.vmas) / 1024 for x in (shape, copy)]
    dirty = [sum(v.dirty_kib for v in x.vmas) / 1024 for x in (shape, copy)]
    print(f"THP MiB: original {thp[0]:.1f}, replica {thp[1]:.1f}; dirty MiB: original {dirty[0]:.1f}, "
          f"replica {dirty[1]:.1f}")
    # Classes under 1 MiB resident are judged on 64 KiB (a 5 % of a few pages is less than one page).
    ok = all(within(r, 0.05, floor_kib=64) for r in rows)
    print(f"fidelity {program.name}: {'all classes within 5 %' if ok else 'NOT all classes within 5 %'}")
    for w in replica.warnings:
        print(f"   replica note: {w}")
    return shape, ok


def kills(program: Program, argv: list[str], shape: Shape, work: Path, killer: Killer, n: int) -> None:
    recs: dict[str, list[KillRecord]] = {"original": [], "replica": []}
    for i in range(n * 2):
        side = "original" if i % 2 == 0 else "replica"  # alternate: drift hits both alike
        if side == "original":
            orig = Original(argv, work)
            try:
                rec = kill_one(killer, orig.pid)
            finally:
                orig.kill()
        else:
            replica = spawn_shape_victim(shape, workdir=work)
            try:
                replica.wait_ready(120)
                time.sleep(0.5)
                rec = kill_one(killer, replica.pid)
            finally:
                replica.kill()
        if rec.outcome is Outcome.KILLED:
            recs[side].append(rec)
        else:
            print(f"   ({side}: {rec.outcome.value}: {rec.error})")
    for side, got in recs.items():
        if not got:
            broken(f"{program.name}: no kill of the {side} succeeded")
    exit_ms = {s: _med([r.kill_to_exit_ns for r in got]) for s, got in recs.items()}
    mmap_ms = {s: _med([r.kernel.exit_mmap_ns if r.kernel else None for r in got]) for s, got in recs.items()}
    print(f"kills {program.name}: {len(recs['original'])} original, {len(recs['replica'])} replica, alternating")
    print(f"{'':<14} {'original ms':>12} {'replica ms':>11} {'dev':>8}")
    for label, values in (("kill->exit", exit_ms), ("exit_mmap", mmap_ms)):
        a, b = values["original"], values["replica"]
        dev = f"{(b - a) / a * 100:+.1f}%" if a and b is not None else "n/a"
        print(f"{label:<14} {_f(a):>12} {_f(b):>11} {dev:>8}")


def _med(values: list[int | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) / 1e6 if got else None


def _f(v: float | None) -> str:
    return f"{v:.2f}" if v is not None else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--programs", default=",".join(PROGRAMS), help=f"comma-separated, from {', '.join(PROGRAMS)}")
    ap.add_argument("--kills", type=int, default=10, help="kills of each side per program")
    ap.add_argument("--size", type=int, default=4, help="workload size factor (4: ~150-300 MiB per program)")
    ap.add_argument("--save-shapes", type=Path, help="write each original's shape to DIR/NAME.json")
    args = parse_args(ap, smoke={"programs": "python-numpy", "kills": 2, "size": 1})
    logsetup.configure("console", "warning")
    names = [n.strip() for n in args.programs.split(",") if n.strip()]
    unknown = [n for n in names if n not in PROGRAMS]
    if unknown or not names:
        broken(f"unknown programs {unknown}; known: {', '.join(PROGRAMS)}")
    try:
        tracer: NullTracer | object = open_tracer("on")
    except TracingUnavailable as exc:
        print(f"no kernel timeline (exit_mmap n/a): {exc.reason}")
        tracer = NullTracer(exc.reason)
    killer = Killer(LinuxSyscalls(), ProcFs(), tracer=tracer)  # type: ignore[arg-type]
    work = Path(tempfile.mkdtemp(prefix="lmkd-py-shape-bench-"))
    try:
        for name in names:
            program = PROGRAMS[name]
            ensure(program)
            argv = program.argv(work, args.size)
            shape, _ = fidelity(program, argv, work, args.save_shapes)
            kills(program, argv, shape, work, killer, args.kills)
    finally:
        killer.close()
        tracer.close()  # type: ignore[attr-defined]
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
