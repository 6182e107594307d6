"""``lmkd-py shape``: ``capture PID -o FILE`` and ``compare A B``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmkd_py.shape.capture import CaptureError, capture, read_shape, write_shape
from lmkd_py.shape.compare import compare, format_table
from lmkd_py.shape.model import ShapeError, dumps


def add_shape_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="shape_command", required=True)
    c = sub.add_parser("capture", help="the memory shape of a running process, from /proc/PID/smaps, status, task/")
    c.add_argument("pid", type=int)
    c.add_argument("-o", "--output", type=Path, help="shape file to write (default: print it)")
    c.add_argument("--keep-paths", action="store_true",
                   help="keep the names of mapped files (by default no file name leaves the machine)")
    c.add_argument("--note", help="free text kept in the shape's provenance (how the process was started)")
    m = sub.add_parser("compare", help="class by class: VMA count and resident memory of B against A")
    m.add_argument("a", type=Path)
    m.add_argument("b", type=Path)


def cmd_shape(args: argparse.Namespace) -> int:
    """Returns 0; 1 when the process or a file cannot be read; 2 for a bad shape file."""
    if args.shape_command == "capture":
        return _capture(args)
    try:
        a, b = read_shape(args.a), read_shape(args.b)
    except ShapeError as exc:
        print(f"lmkd-py shape: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"lmkd-py shape: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(format_table(compare(a, b)))
    return 0


def _capture(args: argparse.Namespace) -> int:
    import dataclasses

    def warn(msg: str) -> None:
        print(f"lmkd-py shape: could not read {msg}", file=sys.stderr)

    try:
        shape = capture(args.pid, keep_paths=args.keep_paths, warn=warn)
    except CaptureError as exc:
        print(f"lmkd-py shape: {exc}", file=sys.stderr)
        return 1
    if args.note:
        shape = dataclasses.replace(shape, provenance=dataclasses.replace(shape.provenance, note=args.note[:256]))
    if args.output is None:
        sys.stdout.write(dumps(shape))
        return 0
    try:
        write_shape(shape, args.output)
    except OSError as exc:
        print(f"lmkd-py shape: cannot write {args.output}: {exc}", file=sys.stderr)
        return 1
    s = shape.summary()
    parts = ", ".join(f"{c} {v.vmas}" for c, v in s.items() if v.vmas)
    print(f"{args.output}: {len(shape.vmas)} VMAs ({parts}), {shape.rss_kib / 1024:.1f} MiB resident, "
          f"{shape.threads} threads", file=sys.stderr)
    return 0
