"""``lmkd-py lab``: boot two (or more) arm64 kernels under QEMU TCG, kill the same victims on each
with lmkd-py's Killer, bring the records back, and compare them by kernel.

Until the lead wires the subcommand into ``lmkd_py.cli``, run it as ``python -m lmkd_py.lab ...``;
``add_lab_arguments`` is the one definition of its options for both.

Everything a run used is written to ``--out``: ``lab.json`` (kernels with package, version and
sha256; the guest image's sha256 and every .deb and wheel in it; QEMU's version and command line;
the job), ``records-LABEL.jsonl`` and ``console-LABEL.log`` per kernel, ``compare.txt``/``.md`` and
``plots/``, ``peers.txt`` with ``--peers``, and ``summary.txt`` (what was printed).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from lmkd_py.lab.apt import AptError, PrivateApt, system_mirror
from lmkd_py.lab.args import OFFLINE_ENV, add_lab_arguments, default_cache
from lmkd_py.lab.guest import GuestBuilder, GuestBuildError, GuestImage
from lmkd_py.lab.kernels import Kernel, KernelError, KernelStore, parse_kernel_arg
from lmkd_py.lab.run import QEMU, GuestRun, run_guest
from lmkd_py.lab.summary import header_lines, peers_table


def make_job(label: str, args: argparse.Namespace) -> dict[str, Any]:
    """The guest's job (see ``inguest``). Raises ValueError/KeyError for bad victim options.

    The guest has no disk: ``/tmp`` is tmpfs, so a victim's "file" memory is shmem there."""
    from lmkd_py.stress import VictimSpec, scenario_specs

    shape_arg = getattr(args, "shape", None)
    shape: dict[str, Any] | None = None
    if shape_arg and args.scenario:
        raise ValueError("--shape and --scenario exclude each other")
    if shape_arg:
        shape = _shape_job(shape_arg, float(getattr(args, "scale", 1.0)), args.mem_mib)
        specs = []
    elif getattr(args, "scale", 1.0) != 1.0:
        raise ValueError("--scale only makes sense with --shape")
    elif args.scenario:
        specs = scenario_specs(args.scenario, args.seed)
    else:
        specs = [VictimSpec(size_mib=args.size_mib, vmas=args.vmas, kind=args.kind, threads=args.threads)]
    return {
        "label": label, "kills": args.kills, "victims": [s.__dict__ for s in specs], "tracing": args.tracing,
        "shape": shape,
        "mrelease": not args.no_mrelease, "settle_ms": 200, "ready_timeout_s": 600,
        # The guest's rootfs is tmpfs: the interpreter's own file pages count as shmem and stay after
        # the exit, so "memory back" is judged on half of what the victim held.
        "mem_recovery_fraction": 0.5,
        "peers": bool(args.peers), "peer_rounds": args.peer_rounds,
    }


# The guest's own interpreter, lmkd-py and page cache need this much of --mem-mib besides the victim.
GUEST_RESERVE_MIB = 384


def _shape_job(arg: str, scale: float, mem_mib: int) -> dict[str, Any]:
    """The job's ``shape``: the checked shape file and the scale. Raises ValueError (a ShapeError
    naming the field, a missing file, or a shape the guest's memory cannot hold)."""
    from lmkd_py.shape import Machine, check_fits, find_shape, read_shape, shape_to_dict, target_for

    try:
        shape = read_shape(find_shape(arg))
    except OSError as exc:
        raise ValueError(f"--shape {arg}: {exc.strerror or exc}") from None
    # The guest is arm64 with 4 KiB pages; its memory is what --mem-mib leaves after its own needs.
    guest = Machine(arch="aarch64", page_size=4096, hugepage_kib=2048,
                    mem_available_kib=max(0, mem_mib - GUEST_RESERVE_MIB) * 1024)
    check_fits(target_for(shape, guest, scale), guest)
    return {"shape": shape_to_dict(shape), "scale": scale}


def split_kills(kills: int, boots: int) -> list[int]:
    """Kills per boot: ``kills`` spread over ``boots`` as evenly as possible, earlier boots first.
    Raises ValueError unless 1 <= boots <= kills."""
    if kills < 1:
        raise ValueError(f"--kills must be >= 1, not {kills}")
    if not 1 <= boots <= kills:
        raise ValueError(f"--boots must be between 1 and --kills ({kills}), not {boots}")
    base, extra = divmod(kills, boots)
    return [base + (1 if i < extra else 0) for i in range(boots)]


def _qemu_version() -> str | None:
    try:
        out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.splitlines()[0] if out else None


def _compare(runs: list[GuestRun], out: Path, args: argparse.Namespace) -> str:
    """Run the report's compare on the records of the first two kernels; returns its text (or why not)."""
    firsts: dict[str, GuestRun] = {}
    counts: dict[str, int] = {}
    for r in runs:  # every boot of a kernel appends to the same records file
        firsts.setdefault(r.label, r)
        counts[r.label] = counts.get(r.label, 0) + r.records
    with_records = [firsts[label] for label in firsts if counts[label]]
    if len(with_records) < 2:
        return "compare: fewer than two kernels produced records; nothing to compare\n"
    try:
        from lmkd_py.report import cmd_compare
    except ImportError as exc:  # the report module is another helper's; keep the lab usable without it
        return f"compare: lmkd_py.report unavailable ({exc}); compare the records files by hand\n"
    a, b = with_records[0], with_records[1]
    rel_a = next((r.hello.get("kernel_release") for r in runs if r.label == a.label and r.hello), None)
    rel_b = next((r.hello.get("kernel_release") for r in runs if r.label == b.label and r.hello), None)
    texts: dict[str, str] = {}
    for fmt in ("table", "markdown"):
        ns = argparse.Namespace(
            files=[a.records_path, b.records_path], a=None, b=None, by="kernel", format=fmt,
            plots=out / "plots" if fmt == "table" else None, seed=args.seed, resamples=args.resamples,
            label_a=rel_a, label_b=rel_b,
        )
        if rel_a is None or rel_a == rel_b:
            # Same release on both sides (an engineer's patched build of the same version): split by file.
            ns.files, ns.by, ns.a, ns.b = None, None, [a.records_path], [b.records_path]
            ns.label_a, ns.label_b = a.label, b.label
        buf, err = io.StringIO(), io.StringIO()
        rc = cmd_compare(ns, out=buf, err=err)
        texts[fmt] = buf.getvalue() + (f"\n{err.getvalue()}" if err.getvalue() else "")
        if rc != 0:
            texts[fmt] = f"compare failed ({rc}): {err.getvalue()}"
        (out / ("compare.md" if fmt == "markdown" else "compare.txt")).write_text(texts[fmt])
    return texts[args.format]


def _prepare(args: argparse.Namespace, cache: Path, offline: bool, out: Path) -> tuple[list[Kernel], GuestImage]:
    apt: PrivateApt | None = None
    if not offline:
        mirror = system_mirror()
        if mirror is None:
            raise AptError("no Debian mirror in the system's apt sources; set LMKD_PY_LAB_MIRROR")
        apt = PrivateApt(cache / "apt", mirror)
        apt.update()
    store = KernelStore(cache, apt, offline)
    specs = [parse_kernel_arg(k) for k in args.kernel]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--kernel labels must differ, got {labels}")
    kernels = [store.resolve(s, out) for s in specs]
    guest = GuestBuilder(cache, apt, offline).build()
    return kernels, guest


def cmd_lab(args: argparse.Namespace) -> int:
    """The lab command. Returns 0 when every kernel booted and returned records; 1 when a boot failed
    or gave none (what came back is still written) or the guest could not be built; 2 for bad
    options; 3 when QEMU, the kernels or the guest's packages cannot be had (not installed, no
    network and nothing cached, gone from the archive)."""
    if not structlog.is_configured():
        from lmkd_py import log as logsetup

        logsetup.configure("auto", "info")
    t0 = time.monotonic()
    offline = bool(args.offline) or os.environ.get(OFFLINE_ENV, "") not in ("", "0")
    cache = (args.cache or default_cache()).expanduser()
    out = (args.out or Path(f"lab-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}")).expanduser()
    try:
        split_kills(args.kills, args.boots)
        if args.peers and args.peer_rounds < 1:
            raise ValueError(f"--peer-rounds must be >= 1, not {args.peer_rounds}")
        if args.mem_mib < 512:
            raise ValueError(f"--mem-mib {args.mem_mib}: the guest's Python and victims need at least 512")
        jobs = {parse_kernel_arg(k).label: make_job(parse_kernel_arg(k).label, args) for k in args.kernel}
    except (ValueError, KeyError) as exc:
        print(f"lmkd-py lab: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    if not args.build_only and shutil.which(QEMU) is None:
        print(f"lmkd-py lab: {QEMU} not found: install the qemu-system-arm package", file=sys.stderr)
        return 3
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    try:
        kernels, guest = _prepare(args, cache, offline, out)
    except ValueError as exc:
        print(f"lmkd-py lab: {exc}", file=sys.stderr)
        return 2
    except (AptError, KernelError) as exc:
        print(f"lmkd-py lab: kernel or guest packages unavailable: {exc}", file=sys.stderr)
        return 3
    except (GuestBuildError, OSError, subprocess.CalledProcessError) as exc:
        print(f"lmkd-py lab: cannot build the lab: {exc}", file=sys.stderr)
        return 1
    meta: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(), "emulation": "qemu-tcg (qemu-system-aarch64 -M virt -cpu max)",
        "qemu_version": _qemu_version(), "host": {"machine": platform.machine(), "release": platform.release()},
        "offline": offline, "cache": str(cache), "kernels": [k.describe() for k in kernels],
        "guest_image": {"file": guest.path.name, "sha256": guest.sha256, "unresolved_libraries": guest.unresolved,
                        "lmkd_py_sources_sha256": guest.sources_sha256,
                        **guest.lock},
        "jobs": jobs, "runs": [],
    }
    (out / "lab.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    if args.build_only:
        print(f"kernels and guest ready; see {out / 'lab.json'}")
        return 0
    runs: list[GuestRun] = []
    for boot, kills in enumerate(split_kills(args.kills, args.boots)):
        for kernel in kernels:
            job = {**jobs[kernel.label], "kills": kills, "boot": boot}
            per_kill_s = 30 + (60 if args.vmas > 1000 or args.scenario or args.shape else 0)
            timeout = args.timeout or 180 + per_kill_s * kills + (900 * args.peer_rounds if args.peers else 0)
            try:
                runs.append(run_guest(kernel, guest, job, out, mem_mib=args.mem_mib, timeout_s=timeout,
                                      boot=boot, boots=args.boots))
            except FileNotFoundError as exc:
                print(f"lmkd-py lab: {exc}", file=sys.stderr)
                return 3
            meta["runs"] = [r.summary() for r in runs]
            (out / "lab.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    compare_text = _compare(runs, out, args)
    lines = header_lines(runs, kernels, guest, time.monotonic() - t0)
    text = "\n".join(lines) + "\n\n" + compare_text
    if args.peers:
        ptable = peers_table(runs)
        (out / "peers.txt").write_text(ptable)
        text += "\n" + ptable
    meta["wall_s"] = round(time.monotonic() - t0, 1)
    (out / "lab.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    (out / "summary.txt").write_text(text)
    sys.stdout.write(text)
    ok = all(r.ok and r.records > 0 for r in runs)
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lmkd_py.lab", description=__doc__.split("\n\n")[0])
    add_lab_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with contextlib.suppress(BrokenPipeError):
        return cmd_lab(args)
    return 1
