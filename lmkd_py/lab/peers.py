"""``--peers`` inside the guest: one memory-pressure episode under lmkd-py, under earlyoom (Debian's
arm64 package), and under no daemon (the kernel's OOM killer), alternating mode by mode.

The pressure is the whole guest's memory (earlyoom watches MemAvailable system-wide, so a memcg
would not be the same test for it). One episode:

1. start the designated victim (``oom_score_adj`` 900) and two bystanders (300);
2. start the peer daemon (none for "none") and wait until it is ready;
3. start the grower: it allocates and touches anonymous memory in 8 MiB steps up to MemAvailable plus
   half the victim's size, so it can finish only if somebody's memory is given back;
4. watch every 20 ms which of our processes died and how, until the grower finished (recovered),
   died, or ``EPISODE_TIMEOUT_S`` passed.

Reported per episode (``peer`` lines): kernel OOM kills (``oom_kill`` of ``/proc/vmstat``), time
under full memory stall (``full total`` of ``/proc/pressure/memory``), time from the grower's start
to the first death and to the grower's success ("recover"), who died first and whether that was
the designated victim. This program protects itself with ``oom_score_adj`` -1000 (the guest's root
has CAP_SYS_RESOURCE), so the kernel never picks it.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from lmkd_py.lab.protocol import Emit

MODES: Final = ("lmkd-py", "earlyoom", "none")
EPISODE_TIMEOUT_S: Final = 180.0
STEP_MIB: Final = 8
VICTIM_MIB: Final = 128
BYSTANDER_MIB: Final = 48
DAEMON_READY_TIMEOUT_S: Final = 180.0

GROWER: Final = r"""
import os, sys, time
target = int(sys.argv[1]) << 20
step = int(sys.argv[2]) << 20
held = []
got = 0
while got < target:
    b = bytearray(step)
    b[::4096] = b"\x01" * (step // 4096)  # touch every page: bytearray's zeroed pages are not resident yet
    held.append(b)
    got += step
    time.sleep(0.02)
print("done", flush=True)
sys.stdin.read()
"""


def _read_int_field(path: str, key: str) -> int | None:
    try:
        for line in Path(path).read_text().splitlines():
            parts = line.split()
            if parts and parts[0] == key:
                return int(parts[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def full_stall_us(text: str) -> int | None:
    """``total`` of the ``full`` line of a PSI file (µs), None if absent. Pure."""
    for line in text.splitlines():
        if line.startswith("full "):
            for part in line.split():
                if part.startswith("total="):
                    return int(part[6:])
    return None


def _psi_full_us() -> int | None:
    try:
        return full_stall_us(Path("/proc/pressure/memory").read_text())
    except OSError:
        return None


def _mem_available_mib() -> int:
    kib = _read_int_field("/proc/meminfo", "MemAvailable:")
    return (kib or 0) // 1024


def _wait_line(proc: subprocess.Popen[bytes], needle: bytes, timeout_s: float, stream: str = "stderr") -> bool:
    pipe = proc.stderr if stream == "stderr" else proc.stdout
    assert pipe is not None
    fd = pipe.fileno()
    buf = b""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        readable, _, _ = select.select([fd], [], [], 0.5)
        if readable:
            data = os.read(fd, 65536)
            if not data:
                return False
            buf += data
            if needle in buf:
                return True
            buf = buf[-4096:]
    return False


def _wait_in_file(proc: subprocess.Popen[bytes], path: Path, needle: bytes, timeout_s: float) -> bool:
    """Whether ``needle`` appeared in the file ``proc`` writes its log to, before it exited or timed out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if needle in path.read_bytes():
                return True
        except OSError:
            pass
        if proc.poll() is not None:
            return False
        time.sleep(0.2)
    return False


DAEMON_EVENTS: Final = ("daemon.ready", "psi.event", "kill.", "table.")


def daemon_events(log_text: str, t0_wall: float, limit: int = 12) -> list[dict[str, Any]]:
    """The daemon's decisions from its JSON log (its pressure events and kill lines), the first ``limit``,
    each trimmed to what tells when (``at_ms`` after ``t0_wall``, the grower's start) and why. Pure."""
    out: list[dict[str, Any]] = []
    for line in log_text.splitlines():
        try:
            entry = json.loads(line)
            at = datetime.fromisoformat(entry["timestamp"]).timestamp()
        except (ValueError, KeyError, TypeError):
            continue
        if not str(entry.get("event", "")).startswith(DAEMON_EVENTS):
            continue
        keep = ("event", "kill_reason", "why", "pid", "comm", "reason", "refresh_ms", "next_check_ms")
        fields = {k: entry[k] for k in keep if entry.get(k) is not None}
        out.append({"at_ms": round((at - t0_wall) * 1000, 1), **fields})
        if len(out) >= limit:
            break
    return out


def _start_daemon(mode: str, records: Path, log_path: Path) -> subprocess.Popen[bytes] | None:
    if mode == "none":
        return None
    if mode == "earlyoom":
        # -r 3600: one memory report an hour (quiet); thresholds are earlyoom's defaults (10 % / 5 %).
        proc = subprocess.Popen(["earlyoom", "-r", "3600"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        ready = _wait_line(proc, b"mem avail", DAEMON_READY_TIMEOUT_S, stream="stdout")
    else:
        argv = [sys.executable, "-c", "import sys; from lmkd_py.cli import main; sys.exit(main())",
                "--records", str(records), "--tracing", "off", "--log-format", "json"]
        # Its log goes to a file: what it decided, and when, goes into the episode's result.
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log_file)
        ready = _wait_in_file(proc, log_path, b"daemon.ready", DAEMON_READY_TIMEOUT_S)
    if not ready:
        exited = proc.poll()
        tail = b""
        if exited is not None:
            if proc.stderr is not None:
                tail = proc.stderr.read()[-400:]
            elif log_path.exists():
                tail = log_path.read_bytes()[-400:]
        _stop(proc)
        if exited is not None:
            why = tail.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"{mode} exited ({_how(exited)}) before it was ready: {why[0]}")
        raise RuntimeError(f"{mode} did not become ready within {DAEMON_READY_TIMEOUT_S:.0f} s")
    return proc


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None:
        return
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def _how(rc: int | None) -> str | None:
    if rc is None:
        return None
    return signal.Signals(-rc).name if rc < 0 else f"exit {rc}"


def episode(mode: str, rnd: int) -> dict[str, Any]:
    """Run one episode under ``mode``; returns its result (the ``peer`` line's object)."""
    from lmkd_py.stress import VictimSpec, spawn_victim

    workdir = Path("/tmp")
    # Records go to a directory only root may write: the records writer refuses a world-writable one
    # (sticky /tmp may sit above the records, not hold them).
    records_dir = workdir / "lmkd-py-peers"
    records_dir.mkdir(mode=0o700, exist_ok=True)
    records = records_dir / f"peer-{mode}-{rnd}.jsonl"
    log_path = records_dir / f"peer-{mode}-{rnd}.log"
    named: dict[str, Any] = {}
    grower: subprocess.Popen[bytes] | None = None
    daemon: subprocess.Popen[bytes] | None = None
    result: dict[str, Any] = {"mode": mode, "round": rnd}
    try:
        named["victim"] = spawn_victim(VictimSpec(size_mib=VICTIM_MIB, adj=900), workdir=workdir)
        for i in range(2):
            named[f"bystander{i}"] = spawn_victim(VictimSpec(size_mib=BYSTANDER_MIB, adj=300), workdir=workdir)
        for child in named.values():
            child.wait_ready(600)
        daemon = _start_daemon(mode, records, log_path)
        time.sleep(1.0)
        oom0 = _read_int_field("/proc/vmstat", "oom_kill")
        full0 = _psi_full_us()
        target_mib = _mem_available_mib() + VICTIM_MIB // 2
        result.update(mem_available_mib=target_mib - VICTIM_MIB // 2, grower_target_mib=target_mib)
        t0, t0_wall = time.monotonic_ns(), time.time()
        grower = subprocess.Popen([sys.executable, "-I", "-S", "-c", GROWER, str(target_mib), str(STEP_MIB)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert grower.stdout is not None
        deaths: list[tuple[int, str, str | None]] = []
        recovered_ns: int | None = None
        out_fd = grower.stdout.fileno()
        while time.monotonic_ns() - t0 < EPISODE_TIMEOUT_S * 1e9:
            readable, _, _ = select.select([out_fd], [], [], 0.02)
            now = time.monotonic_ns()
            if readable and b"done" in os.read(out_fd, 64):
                recovered_ns = now
            for name, child in [*named.items(), ("grower", grower)]:
                rc = child.poll()
                if rc is not None and name not in {d[1] for d in deaths}:
                    deaths.append((now - t0, name, _how(rc)))
            if recovered_ns is not None or grower.poll() is not None:
                break
        time.sleep(1.0)  # let a late kill land in the counters
        oom1 = _read_int_field("/proc/vmstat", "oom_kill")
        full1 = _psi_full_us()
        first = deaths[0] if deaths else None
        result.update(
            kernel_oom_kills=None if oom0 is None or oom1 is None else oom1 - oom0,
            full_stall_ms=None if full0 is None or full1 is None else round((full1 - full0) / 1000, 1),
            time_to_first_kill_ms=None if first is None else round(first[0] / 1e6, 1),
            time_to_recover_ms=None if recovered_ns is None else round((recovered_ns - t0) / 1e6, 1),
            first_killed=None if first is None else first[1],
            designated_victim_killed_first=first is not None and first[1] == "victim",
            deaths=[{"who": n, "how": h, "at_ms": round(t / 1e6, 1)} for t, n, h in deaths],
            daemon_records=_count_lines(records),
            timed_out=recovered_ns is None and grower.poll() is None,
        )
        if mode == "lmkd-py":
            # Its decisions, timed from the grower's start as the deaths are.
            text = log_path.read_text(errors="replace") if log_path.exists() else ""
            result["daemon_events"] = daemon_events(text, t0_wall)
    except (OSError, RuntimeError, TimeoutError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if grower is not None:
            if grower.poll() is None:
                grower.kill()
            grower.wait()
            for pipe in (grower.stdin, grower.stdout):
                if pipe is not None:
                    pipe.close()
        for child in named.values():
            child.kill()
        _stop(daemon)
        records.unlink(missing_ok=True)
    return result


def _count_lines(path: Path) -> int | None:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.strip())
    except OSError:
        return None


def run_peers(job: dict[str, Any], emit: Emit) -> int:
    """All rounds of all modes; emits one ``peer`` line per episode and returns how many ran."""
    try:
        Path("/proc/self/oom_score_adj").write_text("-1000")
    except OSError as exc:
        emit("note", {"what": "could not protect the lab process", "reason": str(exc)})
    n = 0
    for rnd in range(int(job.get("peer_rounds", 3))):
        for mode in MODES:
            result = episode(mode, rnd)
            emit("peer", json.loads(json.dumps(result, default=str)))
            n += 1
    return n
