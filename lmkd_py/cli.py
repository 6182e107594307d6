"""Command line: argument parsing and dispatch only. Each command's work lives in its module.

``lmkd-py [daemon options]`` runs the daemon; ``lmkd-py COMMAND ...`` runs a tool.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from lmkd_py import __version__
from lmkd_py.lean import defer_asyncio

# The settings records carry besides the kernel (records.Confounders); named here so that parsing the
# command line imports neither pydantic nor numpy.
CONFOUNDER_NAMES = ("thp_enabled", "thp_defrag", "lru_gen", "swappiness", "min_free_kbytes", "watermark_scale_factor",
                    "swap", "zram", "page_size", "cpu_model", "cpu_count", "cpufreq_governor", "kernel_cmdline")
COMMANDS = ("kill", "check-config", "config-schema", "record-schema", "report", "compare", "export", "trace-export",
            "stress", "observe", "lab", "status", "shape")
INPUTS = "record files, directories or globs: JSONL (plain, .gz, .zst) or Parquet datasets from export"


def _add_daemon_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML config file (default: built-in defaults)")
    p.add_argument("--dry-run", action="store_true", default=None,
                   help="decide and record, but never signal or reap (works unprivileged)")
    p.add_argument("--records", type=Path, help="JSONL file the kill records are appended to")
    p.add_argument("--cgroup", type=Path,
                   help="cgroup v2 directory: its memory.pressure is the pressure source and its "
                        "subtree's processes are the only candidates")
    p.add_argument("--duration", type=float, help="stop cleanly after this many seconds")
    p.add_argument("--tracing", choices=["auto", "on", "off"], help="kernel timeline via tracefs")
    p.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None)


def _add_kill(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("kill", help="kill one process now and record how long its memory took to come back")
    p.add_argument("pid", type=int)
    p.add_argument("--records", type=Path, help="JSONL file to append the record to (default: config's)")
    p.add_argument("--config", type=Path)
    p.add_argument("--start-time", type=int, dest="start_time_ticks",
                   help="expected start time (field 22 of /proc/PID/stat); refuse if it differs")
    p.add_argument("--no-mrelease", action="store_true", help="SIGKILL only, no process_mrelease")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait for the exit")
    p.add_argument("--tracing", choices=["auto", "on", "off"], default=None)
    p.add_argument("--json", action="store_true", help="print the record as JSON instead of a summary")
    p.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")


def _add_config_cmds(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("check-config", help="validate a config file: exit 0, or 2 naming the bad key")
    p.add_argument("file", type=Path, nargs="?", help="default: config/lmkd-py.toml defaults")
    sub.add_parser("config-schema", help="print the config's JSON Schema")
    sub.add_parser("record-schema", help="print the JSON Schema of one kill record (one JSONL line)")


def _add_report(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("report", help="summarise record files per kernel and machine")
    p.add_argument("files", type=Path, nargs="+", help=INPUTS)
    p.add_argument("--format", choices=["table", "markdown", "json"], default="table")
    p.add_argument("--plots", type=Path, help="write PNG plots into this directory")
    p.add_argument("--group-by", choices=CONFOUNDER_NAMES, metavar="SETTING",
                   help="also group by one recorded setting: " + ", ".join(CONFOUNDER_NAMES))
    p = sub.add_parser("compare", help="compare two record sets (e.g. patched vs unpatched kernel)")
    p.add_argument("files", type=Path, nargs="*", help="record files to split with --by")
    p.add_argument("--a", type=Path, nargs="+", help="side A record files")
    p.add_argument("--b", type=Path, nargs="+", help="side B record files")
    p.add_argument("--by", choices=["kernel", "machine"], help="split FILES into two sides by this")
    p.add_argument("--label-a", help="name of side A")
    p.add_argument("--label-b", help="name of side B")
    p.add_argument("--format", choices=["table", "markdown", "json"], default="table")
    p.add_argument("--plots", type=Path, help="write PNG ECDF and box plots into this directory")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--paired", action="store_true",
                   help="compare within each board that ran both sides, then across boards")
    p.add_argument("--fail-if", action="append", metavar="METRIC:+N%%", dest="fail_if",
                   help="exit 1 when the difference's 95%% CI lies entirely beyond this threshold, e.g. "
                        "'reap_total:+5%%' or 'kill_to_exit:+2ms' (repeatable); the verdict is the first line")
    p = sub.add_parser("export", help="write records as a Parquet dataset partitioned by kernel and machine")
    p.add_argument("files", type=Path, nargs="+", help="record files, directories or globs (JSONL, .gz, .zst)")
    p.add_argument("--parquet", type=Path, required=True, metavar="DIR", help="dataset directory (appended to)")
    from lmkd_py.report import add_trace_export_arguments  # the face is light: no numpy at import

    p = sub.add_parser("trace-export", help="each kill's timeline as Chrome/Perfetto trace-event JSON")
    add_trace_export_arguments(p)


def _add_stress(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("stress", help="spawn victims (and a pressure source) that live until killed")
    p.add_argument("--size-mib", type=int, default=64)
    p.add_argument("--vmas", type=int, default=1)
    p.add_argument("--kind", choices=["anon", "file", "shmem", "mixed"], default="anon")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--touch", choices=["all", "sparse"], default="all")
    p.add_argument("--adj", type=int, default=None, help="oom_score_adj of the victims")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p.add_argument("--pressure", action="store_true", help="also run a file-thrashing pressure source")
    p.add_argument("--cgroup", type=Path, help="cgroup name or path to create for the victims/pressure")
    p.add_argument("--limit-mib", type=int, help="memory limit of that cgroup")
    p.add_argument("--file-mib", type=int, help="size of the thrashed file")
    p.add_argument("--scenario", help="a preset set of victims, e.g. app-like")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--duration", type=float, help="seconds to hold, then clean up")
    p.add_argument("--shape", help="replay a captured memory shape (lmkd-py shape capture): a file, or a "
                                   "catalog name from workloads/ (node-server)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="with --shape: VMA count, memory and threads times this (default 1)")


def _add_shape(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from lmkd_py.shape import add_shape_arguments  # light: argparse and the stdlib

    p = sub.add_parser("shape", help="capture a process's memory shape (VMAs by class, resident, THP, threads)")
    add_shape_arguments(p)


def _add_observe(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("observe", help="never kill: record the reap latency of every SIGKILL made by others")
    p.add_argument("--records", type=Path, help="JSONL file the observed records are appended to")
    p.add_argument("--duration", type=float, help="stop cleanly after this many seconds")
    p.add_argument("--cgroup", type=Path, help="only victims inside this cgroup v2 directory (subtree)")
    p.add_argument("--config", type=Path)
    p.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None)


def _add_status(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("status", help="what the running daemon sees now (mode, sources, signals, candidates, kills)")
    p.add_argument("--json", action="store_true", help="print the status file's JSON")
    p.add_argument("--runtime-dir", type=Path, default=None,
                   help="the daemon's runtime directory (default: $LMKD_PY_RUNTIME_DIR, /run/lmkd-py, "
                        "$XDG_RUNTIME_DIR/lmkd-py)")


def _add_lab(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from lmkd_py.lab import add_lab_arguments  # the face is light: argparse, os and pathlib only

    p = sub.add_parser("lab", help="A/B arm64 kernels under QEMU TCG: the same victims killed on each, compared")
    add_lab_arguments(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmkd-py",
        description="Userspace low-memory killer: PSI -> victim -> pidfd SIGKILL + process_mrelease, "
        "with a timestamped record of how long each victim's memory took to come back.",
        epilog="commands: " + ", ".join(COMMANDS) + " (lmkd-py COMMAND --help)",
    )
    parser.add_argument("--version", action="version", version=f"lmkd-py {__version__}")
    _add_daemon_args(parser)
    return parser


def build_command_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of the one-shot commands and observe mode. ``command``: build only the families that
    command needs (the others' arguments would import their families: report's and shape's faces cost
    observe mode ~60 ms of start-up and their modules' memory for nothing); None: all of them."""
    parser = argparse.ArgumentParser(prog="lmkd-py")
    sub = parser.add_subparsers(dest="command", required=True)
    adders = ((("kill",), _add_kill), (("check-config", "config-schema", "record-schema"), _add_config_cmds),
              (("report", "compare", "export", "trace-export"), _add_report), (("stress",), _add_stress),
              (("observe",), _add_observe), (("lab",), _add_lab), (("status",), _add_status), (("shape",), _add_shape))
    for commands, add in adders:
        if command is None or command in commands:
            add(sub)
    return parser


def _dispatch(args: argparse.Namespace) -> int:
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {}
    if args.command == "kill":
        from lmkd_py.tools import cmd_kill

        handlers["kill"] = cmd_kill
    elif args.command in ("check-config", "config-schema", "record-schema"):
        from lmkd_py.tools import cmd_check_config, cmd_config_schema, cmd_record_schema

        handlers.update(
            {"check-config": cmd_check_config, "config-schema": cmd_config_schema, "record-schema": cmd_record_schema}
        )
    elif args.command in ("report", "compare", "export"):
        from lmkd_py.report import cmd_compare, cmd_export, cmd_report

        handlers.update({"report": cmd_report, "compare": cmd_compare, "export": cmd_export})
    elif args.command == "trace-export":
        from lmkd_py.report import cmd_trace_export

        handlers["trace-export"] = cmd_trace_export
    elif args.command == "observe":
        defer_asyncio()
        from lmkd_py.observe import cmd_observe

        handlers["observe"] = cmd_observe
    elif args.command == "lab":
        from lmkd_py.lab import cmd_lab

        handlers["lab"] = cmd_lab
    elif args.command == "status":
        from lmkd_py.status import cmd_status

        handlers["status"] = cmd_status
    elif args.command == "shape":
        from lmkd_py.shape import cmd_shape

        handlers["shape"] = cmd_shape
    elif args.command == "stress":
        from lmkd_py.stress import cmd_stress

        handlers["stress"] = cmd_stress
    return handlers[args.command](args)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        args = build_command_parser(argv[0]).parse_args(argv)
        return _dispatch(args)
    args = build_parser().parse_args(argv)
    defer_asyncio()  # before structlog is first imported (lean.py)
    from lmkd_py.config import PendingConfig

    pending = PendingConfig(args.config)  # validated in a child while this process imports the daemon
    from lmkd_py.service import cmd_daemon

    return cmd_daemon(args, pending)


if __name__ == "__main__":
    sys.exit(main())
