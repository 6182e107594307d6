"""Fakes for what this machine cannot produce on demand (scripted errno values from the kernel, pressure
events at the test's moment), and a real daemon driven by such events."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

from lmkd_py.candidates import CandidateTable
from lmkd_py.config import Config
from lmkd_py.daemon import Daemon
from lmkd_py.killer import Killer, KillOptions
from lmkd_py.policy import Rules
from lmkd_py.procfs import ProcFs, Psi, cgroup_v2_relpath
from lmkd_py.psi import PressureEvent
from lmkd_py.records import ListSink, Provenance
from lmkd_py.stress import PressureCgroup
from lmkd_py.syscalls import LinuxSyscalls


class ScriptedSyscalls:
    """The real syscalls, except that the calls named in ``fail`` raise the scripted errno instead
    (``process_mrelease`` still runs after a real SIGKILL; only its answer is replaced).
    ``calls`` logs every call by name, so a test can prove what was (not) done."""

    def __init__(self, fail: dict[str, int] | None = None, times: int | None = None) -> None:
        self.real = LinuxSyscalls()
        self.fail = dict(fail or {})
        self.times = times  # fail only the first N calls of each scripted name (None: always)
        self.calls: list[str] = []
        self._count: dict[str, int] = {}

    def _maybe_fail(self, name: str) -> None:
        self.calls.append(name)
        if name in self.fail:
            n = self._count.get(name, 0)
            self._count[name] = n + 1
            if self.times is None or n < self.times:
                err = self.fail[name]
                raise OSError(err, os.strerror(err))

    def pidfd_open(self, pid: int, flags: int = 0) -> int:
        self._maybe_fail("pidfd_open")
        return self.real.pidfd_open(pid, flags)

    def pidfd_send_signal(self, pidfd: int, sig: int) -> None:
        self._maybe_fail("pidfd_send_signal")
        self.real.pidfd_send_signal(pidfd, sig)

    def process_mrelease(self, pidfd: int, flags: int = 0) -> int:
        self._maybe_fail("process_mrelease")
        return self.real.process_mrelease(pidfd, flags)

    def mlockall(self, flags: int) -> None:
        self._maybe_fail("mlockall")
        self.real.mlockall(flags)


def fake_proc(root: Path, pid: int, comm: str, rss_kib: int, *, start: int = 500, tids: Iterable[int] = (),
              adj: int = 200) -> None:
    """One process in a fake /proc tree under ``root`` (stat, status, cmdline, cgroup, oom_score_adj, task/)."""
    d = root / str(pid)
    (d / "task").mkdir(parents=True)
    for t in (pid, *tids):
        (d / "task" / str(t)).mkdir()
    page_kib = os.sysconf("SC_PAGE_SIZE") // 1024
    fields = ["S", "1", "1", "1", "0", "-1", "0"] + ["0"] * 10 + [str(1 + len(list(tids))), "0", str(start), "0",
                                                                 str(rss_kib // page_kib)] + ["0"] * 20
    (d / "stat").write_text(f"{pid} ({comm}) " + " ".join(fields) + "\n")
    (d / "status").write_text(
        f"Name:\t{comm}\nTgid:\t{pid}\nUid:\t1000\t1000\t1000\t1000\nThreads:\t{1 + len(list(tids))}\n"
        f"VmRSS:\t{rss_kib} kB\nRssAnon:\t{rss_kib - 100} kB\nRssFile:\t100 kB\nRssShmem:\t0 kB\nVmSwap:\t0 kB\n"
    )
    (d / "cmdline").write_bytes(comm.encode() + b"\0--flag\0")
    (d / "cgroup").write_text("0::/apps/x\n")
    (d / "oom_score_adj").write_text(f"{adj}\n")


class ScriptedSource:
    """A pressure source that never fires by itself: the test hands its events to ``Daemon.handle``."""

    description = "scripted"

    def wait(self, timeout_ns: int | None) -> list[PressureEvent]:
        return []

    def read(self) -> Psi | None:
        return None

    def close(self) -> None:
        pass


def scoped_daemon(cg: PressureCgroup, cfg: Config, provenance: Provenance | None = None) -> tuple[Daemon, ListSink]:
    """A real daemon (real table, killer and syscalls) scoped to the test's cgroup, driven by the test
    through ``Daemon.handle``; records into a ListSink."""
    rel = cgroup_v2_relpath(cg.v2_path, Path("/proc/self/mounts").read_text())
    rules = Rules(scope_cgroup=rel, self_pids=frozenset({os.getpid()}))
    table = CandidateTable(ProcFs(), rules, scope_dir=cg.v2_path, clock=time.monotonic_ns,
                           pidfd_open=LinuxSyscalls().pidfd_open, hold=4)
    killer = Killer(LinuxSyscalls(), ProcFs(), options=KillOptions.from_config(cfg.kill), provenance=provenance)
    sink = ListSink()
    return Daemon(cfg, source=ScriptedSource(), killer=killer, table=table, sink=sink), sink
