"""The ``lab`` command's options, in a module light enough for ``lmkd_py.cli`` to import when it
builds its parser (nothing here imports pydantic, QEMU helpers or the report extra)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Final

CACHE_ENV: Final = "LMKD_PY_LAB_CACHE"
OFFLINE_ENV: Final = "LMKD_PY_LAB_OFFLINE"


def add_lab_arguments(p: argparse.ArgumentParser) -> None:
    """The ``lab`` options (shared by ``lmkd-py lab`` and ``python -m lmkd_py.lab``)."""
    p.add_argument("--kernel", action="append", required=True, metavar="LABEL=SPEC",
                   help="deb:6.12 (newest 6.12.x arm64 cloud kernel), deb:7, deb:7.3.4+deb13-cloud-arm64, "
                        "or a path to an arm64 Image/vmlinuz; give it twice (A=..., B=...)")
    p.add_argument("--kills", type=int, default=30, help="kills per kernel (default 30)")
    p.add_argument("--boots", type=int, default=1,
                   help="boot each kernel this many times, alternating A, B, A, B..., the kills split between "
                        "the boots (spreads slow drift of the host over both kernels; default 1)")
    p.add_argument("--scenario", help="stress scenario for the victims (app-like, many-vmas, big-anon)")
    p.add_argument("--seed", type=int, default=0, help="scenario seed and bootstrap seed")
    p.add_argument("--size-mib", type=int, default=64, help="victim size without --scenario")
    p.add_argument("--vmas", type=int, default=1, help="victim VMAs without --scenario")
    p.add_argument("--threads", type=int, default=1, help="victim threads without --scenario")
    p.add_argument("--kind", choices=["anon", "file", "shmem", "mixed"], default="anon")
    p.add_argument("--shape", metavar="FILE",
                   help="replay a captured memory shape as the victim (lmkd-py shape capture), e.g. "
                        "workloads/node-server.json, or a catalog name (node-server)")
    p.add_argument("--scale", type=float, default=1.0, help="with --shape: VMAs, memory and threads times this")
    p.add_argument("--peers", action="store_true",
                   help="also run the same pressure episode under lmkd-py, earlyoom and no daemon")
    p.add_argument("--peer-rounds", type=int, default=3, help="episodes per peer (default 3)")
    p.add_argument("--tracing", choices=["auto", "on", "off"], default="auto", help="kernel timeline in the guest")
    p.add_argument("--no-mrelease", action="store_true", help="SIGKILL only in the guest")
    p.add_argument("--out", type=Path, help="output directory (default ./lab-YYYYmmdd-HHMMSS)")
    p.add_argument("--cache", type=Path, help=f"download cache (default ${CACHE_ENV} or ~/.cache/lmkd-py/lab)")
    p.add_argument("--offline", action="store_true", default=None,
                   help=f"use only the cache, never the network (also ${OFFLINE_ENV}=1)")
    p.add_argument("--mem-mib", type=int, default=1024, help="guest memory (default 1024)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per guest boot (default: from --kills)")
    p.add_argument("--format", choices=["table", "markdown"], default="table", help="printed compare table")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples of the compare step")
    p.add_argument("--build-only", action="store_true", help="resolve kernels and build the guest, boot nothing")


def default_cache() -> Path:
    """``$LMKD_PY_LAB_CACHE``, else ``$XDG_CACHE_HOME/lmkd-py/lab``, else ``~/.cache/lmkd-py/lab``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lmkd-py" / "lab"
