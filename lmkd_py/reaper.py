"""The reaper thread: SIGKILL through a pidfd and, at once, process_mrelease, on a thread whose tid is known.

Why one thread sends the signal too: process_mrelease must follow SIGKILL (before it the task is not
dying and the call fails with EINVAL), and the later it follows, the more of the teardown the victim
has done alone; Android lmkd's reaper threads do the same. The thread is long-lived so its tid is known
before the kill (tracing narrows its events to the victim and this tid).
"""

from __future__ import annotations

import errno
import os
import queue
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from lmkd_py.syscalls import SIGKILL, Syscalls

Clock = Callable[[], int]
log = structlog.get_logger("lmkd_py.reaper")
# How long a kill waits for the reaper thread to send SIGKILL: normally microseconds; longer only when
# the thread is stuck, and the kill must not stall the loop until the watchdog fires.
HANDOFF_TIMEOUT_S = 1.0


@dataclass
class ReapJob:
    pidfd: int  # the job's own duplicate, closed by the reaper thread when it is done with it
    mrelease: bool
    signal: bool = True  # False: already killed (cgroup.kill), only reap
    signalled: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    signal_error: OSError | None = None
    signal_sent_ns: int | None = None
    mrelease_start_ns: int | None = None
    mrelease_end_ns: int | None = None
    mrelease_ret: int | None = None
    mrelease_errno: int | None = None
    thread_cpu_ns: int | None = None
    retries: int = 0


class ReaperThread:
    """A long-lived thread that sends SIGKILL through a pidfd and at once calls process_mrelease."""

    def __init__(self, syscalls: Syscalls, clock: Clock) -> None:
        self._sys = syscalls
        self._clock = clock
        self._jobs: queue.SimpleQueue[ReapJob | None] = queue.SimpleQueue()
        self._ready = threading.Event()
        self.tid: int = 0
        self._thread = threading.Thread(target=self._run, name="lmkd-reaper", daemon=True)
        self._thread.start()
        self._ready.wait()

    def submit(self, pidfd: int, mrelease: bool, *, signal: bool = True) -> ReapJob:
        """Queue a kill. The job holds its own duplicate of ``pidfd``: a reaper thread that is late (stuck
        behind a D-state victim's mmap_lock) can then never signal a pid reused since, only the victim
        the duplicate names, however late it gets to it."""
        job = ReapJob(pidfd=os.dup(pidfd), mrelease=mrelease, signal=signal)
        self._jobs.put(job)
        return job

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        self.tid = threading.get_native_id()
        self._ready.set()
        while (job := self._jobs.get()) is not None:
            try:
                self._reap(job)
            finally:
                _close(job.pidfd)
                job.signalled.set()
                job.done.set()

    def _reap(self, job: ReapJob) -> None:
        if job.signal:
            try:
                self._sys.pidfd_send_signal(job.pidfd, SIGKILL)
            except OSError as exc:
                job.signal_error = exc
                return
            job.signal_sent_ns = self._clock()
        job.signalled.set()
        if not job.mrelease:
            return
        cpu0 = time.clock_gettime_ns(time.CLOCK_THREAD_CPUTIME_ID)
        job.mrelease_start_ns = self._clock()
        for attempt in range(2):
            try:
                job.mrelease_ret = self._sys.process_mrelease(job.pidfd, 0)
                job.mrelease_errno = None
                break
            except OSError as exc:
                job.mrelease_errno = exc.errno
                # EINTR (signal while taking mmap_lock) and EAGAIN (MMU-notifier refusal) are transient:
                # one more try, then leave the rest to the victim's own exit.
                if exc.errno not in (errno.EINTR, errno.EAGAIN) or attempt:
                    break
                job.retries += 1
        job.mrelease_end_ns = self._clock()
        job.thread_cpu_ns = time.clock_gettime_ns(time.CLOCK_THREAD_CPUTIME_ID) - cpu0


def poll_readable(pidfd: int, timeout_ms: int) -> bool:
    """Whether ``pidfd`` polls readable within ``timeout_ms``: the thread-group leader exited."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(timeout_ms))


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError as exc:  # EBADF from a fake pidfd: nothing to release
        log.debug("reap.close_failed", fd=fd, reason=str(exc))
