"""What every benchmark shares: the ``--smoke`` flag and the one way to say "this benchmark is broken".

``--smoke`` runs the same code path at the smallest size, in a few seconds, so CI can run every benchmark
(tests/system/test_benchmarks_smoke.py) and none rots unseen. Its figures prove the path ran; they are not
results. A benchmark never fails on a time: it exits non-zero only when it is broken (an exception, or no
data to print figures from).
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import tempfile
from typing import NoReturn

SMOKE_HELP = ("smallest size, a few seconds: check that the benchmark still runs (what CI does); the figures "
              "prove the path ran and are not results. Explicit options still win")


def parse_args(ap: argparse.ArgumentParser, smoke: dict[str, object]) -> argparse.Namespace:
    """Add ``--smoke`` to ``ap`` and parse. With ``--smoke`` the defaults become ``smoke`` (option
    destinations -> values) and ``args.smoke`` is True; options given on the command line still win."""
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    known, _ = ap.parse_known_args()
    if known.smoke:
        ap.set_defaults(**smoke)
    args = ap.parse_args()
    _own_runtime_dir()
    return args


def _own_runtime_dir() -> None:
    """The lmkd-py daemons a benchmark starts keep their lock and status in a directory of its own, so a
    running lmkd-py service (or another benchmark) neither refuses them nor is disturbed by them."""
    if os.environ.get("LMKD_PY_RUNTIME_DIR"):
        return
    d = tempfile.mkdtemp(prefix="lmkd-py-bench-run-")
    os.environ["LMKD_PY_RUNTIME_DIR"] = d
    atexit.register(shutil.rmtree, d, True)


def broken(why: str) -> NoReturn:
    """Stop with exit status 1: the benchmark could not measure (not: a figure was bad)."""
    raise SystemExit(f"benchmark broken: {why}")
