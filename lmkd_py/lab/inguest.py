"""The lab's program inside the guest: ``python3 -m lmkd_py.lab.inguest /lab/job.json``.

It runs on the guest kernel under test, as root of that (emulated) machine, and reports to the host
over the console: every line it emits is ``@LMKDLAB@ <kind> <json>`` (one ``write`` per line, JSON
in ASCII), and everything else on the console is ignored by the host's parser. Kinds:

- ``hello``: the guest kernel, cmdline, memory, CPUs, PSI, the tracer in use and the image manifest
- ``record``: one KillRecord (``records.record_dict``), made by the same ``Killer`` the daemon uses
- ``peer``: one ``--peers`` episode (see ``peers``)
- ``note``: something the host should show (a victim that failed to start, tracing unavailable...)
- ``done``: counts, at the end

The job file (written by the host, ``run.make_job``) holds: ``label``, ``kills``, ``victims`` (list of
VictimSpec fields, used round-robin), ``shape`` (null, or ``{"shape": a shape file's object, "scale":
F}``: every victim is then a replica of that shape), ``tracing`` ("auto" | "on" | "off"), ``mrelease``,
``settle_ms``, ``ready_timeout_s``, ``mem_recovery_fraction``, ``peers`` and ``peer_rounds``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from lmkd_py.lab.protocol import Emit, emit_line


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace").strip()
    except OSError:
        return None


def hello(tracer_desc: str) -> dict[str, Any]:
    """What the host needs to know about this guest before the records."""
    from lmkd_py.procfs import parse_meminfo

    uts = os.uname()
    mem = parse_meminfo(_read("/proc/meminfo") or "")
    image = _read("/etc/lmkd-lab/image.json")
    return {
        "kernel_release": uts.release, "kernel_version": uts.version, "arch": uts.machine,
        "cmdline": _read("/proc/cmdline"), "mem_total_kib": mem.get("MemTotal"),
        "cpus": os.cpu_count(), "psi": _read("/proc/pressure/memory"),
        "python": sys.version.split()[0], "tracer": tracer_desc,
        "function_graph": "function_graph" in (_read("/sys/kernel/tracing/available_tracers") or ""),
        "image_lmkd_py_version": json.loads(image)["lmkd_py_version"] if image else None,
    }


def _tracer(mode: str, emit: Emit) -> tuple[Any, str]:
    from lmkd_py.tracing import NullTracer, TracingUnavailable, open_tracer

    try:
        tracer = open_tracer(mode)
    except TracingUnavailable as exc:
        emit("note", {"what": "tracing unavailable", "reason": str(exc)})
        return NullTracer(str(exc)), f"none ({exc})"
    except (OSError, ValueError) as exc:  # a tracefs this kernel lays out differently
        emit("note", {"what": "tracing failed to open", "reason": f"{type(exc).__name__}: {exc}"})
        return NullTracer(str(exc)), f"none ({exc})"
    reason = getattr(tracer, "reason", None)
    return tracer, type(tracer).__name__ + (f" ({reason})" if reason else "")


def run_kills(job: dict[str, Any], emit: Emit) -> tuple[int, int]:
    """Spawn each victim, let it settle, kill it with the Killer; emit one record per kill.
    Returns (records emitted, victims that failed to start)."""
    from lmkd_py.killer import Killer, KillOptions
    from lmkd_py.procfs import ProcFs
    from lmkd_py.provenance import collect
    from lmkd_py.records import record_dict
    from lmkd_py.shape import ShapeError, shape_from_dict
    from lmkd_py.stress import StressChildError, VictimSpec, spawn_shape_victim, spawn_victim
    from lmkd_py.syscalls import LinuxSyscalls

    specs = [VictimSpec(**v) for v in job["victims"]]
    shape_job: dict[str, Any] = job.get("shape") or {}
    shape = shape_from_dict(shape_job["shape"]) if shape_job else None
    tracer, desc = _tracer(str(job.get("tracing", "auto")), emit)
    emit("hello", hello(desc))
    proc = ProcFs()
    killer = Killer(LinuxSyscalls(), proc, options=KillOptions(
        mrelease=bool(job.get("mrelease", True)),
        mem_recovery_fraction=float(job.get("mem_recovery_fraction", 0.5)),
    ),
                    tracer=tracer, provenance=collect(virtualised="qemu-tcg"))
    made = failed = 0
    workdir = Path("/tmp")
    try:
        for i in range(int(job["kills"])):
            spec: Any = None
            victim: Any
            try:
                if shape is not None:
                    spec = {"shape": shape.provenance.comm, "scale": shape_job["scale"]}
                    victim = spawn_shape_victim(shape, scale=float(shape_job["scale"]), workdir=workdir)
                else:
                    spec = specs[i % len(specs)].__dict__
                    victim = spawn_victim(specs[i % len(specs)], workdir=workdir)
            except (OSError, ShapeError, StressChildError, TimeoutError) as exc:
                emit("note", {"what": "victim did not start", "kill": i, "reason": str(exc)})
                failed += 1
                continue
            try:
                victim.wait_ready(float(job.get("ready_timeout_s", 600)))
                if i == 0 and getattr(victim, "warnings", None):
                    emit("note", {"what": "replica differs from the shape", "reasons": victim.warnings})
                time.sleep(int(job.get("settle_ms", 200)) / 1000)
                expected = killer.snapshot(victim.pid)
                expected = dataclasses.replace(expected, vma_count=proc.vma_count(victim.pid))
                record = killer.kill(expected)
            except (StressChildError, TimeoutError, FileNotFoundError) as exc:
                emit("note", {"what": "victim failed", "kill": i, "reason": f"{type(exc).__name__}: {exc}"})
                failed += 1
                continue
            finally:
                if victim.wait_exit(30.0) is None:
                    victim.kill()
            note = f"lab {job['label']}: kill {i + 1}/{job['kills']}, spec {spec}, qemu-tcg guest"
            record = dataclasses.replace(record, notes=[*record.notes, note])
            emit("record", record_dict(record))
            made += 1
    finally:
        killer.close()
        tracer.close()
    return made, failed


def main(argv: list[str]) -> int:
    """Run the job at ``argv[1]``. Returns 0, or 1 when the job could not be read (reported)."""
    import structlog

    from lmkd_py import log as logsetup

    logsetup.configure("json", "warning")
    structlog.get_logger("lmkd_py.lab.inguest").debug("lab.guest_start")
    try:
        job = json.loads(Path(argv[1]).read_text())
    except (OSError, ValueError, IndexError) as exc:
        emit_line("note", {"what": "no job", "reason": str(exc)})
        return 1
    t0 = time.monotonic_ns()
    made, failed = run_kills(job, emit_line)
    peers = 0
    if job.get("peers"):
        from lmkd_py.lab.peers import run_peers

        peers = run_peers(job, emit_line)
    emit_line("done", {"records": made, "failed": failed, "peer_episodes": peers,
                       "guest_elapsed_ns": time.monotonic_ns() - t0})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
