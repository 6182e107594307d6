"""The one-shot commands: ``kill``, ``check-config``, ``config-schema``, ``record-schema``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from lmkd_py import log as logsetup
from lmkd_py import provenance, records
from lmkd_py.config import ConfigError, json_schema, load_config
from lmkd_py.killer import Killer, KillOptions
from lmkd_py.procfs import ProcFs, ProcParseError
from lmkd_py.records import KillRecord, RecordsPathError, open_writer, record_json
from lmkd_py.syscalls import LinuxSyscalls, UnsupportedArchitecture
from lmkd_py.text import printable


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.file)
    except ConfigError as exc:
        print(f"lmkd-py: invalid config:\n{exc}", file=sys.stderr)
        return 2
    print(f"{args.file or '(defaults)'}: OK (config hash {cfg.digest()})")
    return 0


def cmd_config_schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_record_schema(args: argparse.Namespace) -> int:
    print(json.dumps(records.json_schema(), indent=2))
    return 0


def summary(record: KillRecord) -> str:
    """A few readable lines about one kill. Text the victim chose (its name, via prctl) and text derived
    from it is shown with control characters escaped: a process named ``\x1b]0;...`` must not drive the
    operator's terminal."""
    v = record.victim

    def ms(ns: int | None) -> str:
        return f"{ns / 1e6:.1f} ms" if ns is not None else "n/a"

    def mib(kib: int | None) -> str:
        return f"{kib / 1024:.1f} MiB" if kib is not None else "n/a"

    lines = [
        f"pid {v.pid} ({printable(str(v.comm))}): {record.outcome.value}"
        + (f" - {printable(record.error)}" if record.error else ""),
        f"  rss {mib(v.rss_kib)} (anon {mib(v.rss_anon_kib)}, file {mib(v.rss_file_kib)}, "
        f"shmem {mib(v.rss_shmem_kib)}, swap {mib(v.swap_kib)})",
    ]
    if record.steps.signal_sent_ns is not None:
        m = record.mrelease
        lines += [
            f"  process_mrelease: {m.status.value}"
            + (f" ({printable(m.errno_name)})" if m.errno_name else "")
            + f", wall {ms(m.wall_ns)}, reaper cpu {ms(m.thread_cpu_ns)}",
            f"  kill -> exit {ms(record.kill_to_exit_ns)}, kill -> memory back {ms(record.kill_to_mem_recovered_ns)}"
            f" (free memory +{mib(record.mem_recovered_kib)})",
        ]
        k = record.kernel
        if k is not None and k.unavailable_reason is None:
            lines.append(
                f"  kernel: reaper work {ms(k.reaper_work_ns)}, exit_mmap {ms(k.exit_mmap_ns)}, "
                f"sum {ms(k.reap_total_ns)}"
            )
        elif k is not None:
            lines.append(f"  kernel timeline: unavailable ({printable(str(k.unavailable_reason))})")
    lines.extend(f"  note: {printable(n)}" for n in record.notes)
    return "\n".join(lines)


def cmd_kill(args: argparse.Namespace) -> int:
    logsetup.configure(args.log_format, "warning")
    try:
        cfg = load_config(args.config)
        syscalls = LinuxSyscalls()
    except (ConfigError, UnsupportedArchitecture) as exc:
        print(f"lmkd-py: {exc}", file=sys.stderr)
        return 2
    writer = open_writer(cfg, args.records)
    try:
        writer.check()  # before the kill: a kill whose record cannot be kept is not worth making here
    except RecordsPathError as exc:
        print(f"lmkd-py: {exc}", file=sys.stderr)
        return 2
    options = KillOptions.from_config(cfg.kill)
    if args.no_mrelease:
        options = dataclasses.replace(options, mrelease=False)
    if args.timeout is not None:
        options = dataclasses.replace(options, exit_timeout_ns=int(args.timeout * 1e9))
    proc = ProcFs()
    killer = Killer(
        syscalls,
        proc,
        options=options,
        provenance=provenance.collect(cfg.digest()),
    )
    tracer = None
    mode = args.tracing or cfg.tracing
    if mode != "off":
        from lmkd_py.tracing import TracingUnavailable, open_tracer

        try:
            tracer = open_tracer(mode)
        except TracingUnavailable as exc:
            print(f"lmkd-py: tracing=on but unavailable: {exc}", file=sys.stderr)
            return 2
        killer.tracer = tracer
    try:
        try:
            expected = killer.snapshot(args.pid)
        except (FileNotFoundError, ProcParseError) as exc:
            print(f"lmkd-py: no process {args.pid}: {exc}", file=sys.stderr)
            return 1
        if args.start_time_ticks is not None:
            expected = dataclasses.replace(expected, start_time_ticks=args.start_time_ticks)
        record = killer.kill(expected)
    finally:
        killer.close()
        if tracer is not None:
            tracer.close()
    stored = writer.write(record)
    print(record_json(record, indent=2) if args.json else summary(record))
    if not stored:
        print(f"lmkd-py: record NOT stored: {writer.stats.last_error}", file=sys.stderr)
    else:
        print(f"record appended to {writer.path}", file=sys.stderr)
    return 0 if record.outcome.value in ("killed", "exit_timeout") and stored else 1


