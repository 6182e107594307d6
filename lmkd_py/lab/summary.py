"""What the lab prints around the compare table: the honest header (TCG, kernels with their exact
packages and hashes, kills per kernel) and the ``--peers`` table. Pure: runs in, text out."""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from typing import Any

from lmkd_py.lab.guest import GuestImage
from lmkd_py.lab.kernels import Kernel
from lmkd_py.lab.peers import MODES
from lmkd_py.lab.run import GuestRun

TCG_NOTE = (
    "All figures were measured inside QEMU TCG emulation (qemu-system-aarch64 -M virt -cpu max -smp 2, "
    "no KVM): they compare these kernels under the same emulator on the same host, and say nothing "
    "direct about their speed on arm64 hardware."
)


def _kernel_line(k: Kernel) -> str:
    if k.package is not None:
        src = f"{k.package.name} {k.package.version} (.deb sha256 {k.package.sha256[:16]}...)"
    else:
        src = f"file {k.source_file} (sha256 {(k.source_sha256 or '')[:16]}...)"
    return f"{k.release or 'own build'} from {src}; Image sha256 {k.image_sha256[:16]}..."


def header_lines(runs: Sequence[GuestRun], kernels: Sequence[Kernel], guest: GuestImage, wall_s: float) -> list[str]:
    """The lines printed above the compare table."""
    lines = ["lmkd-py lab: arm64 kernel A/B", TCG_NOTE, ""]
    for k in kernels:
        lines.append(f"kernel {k.label} ({k.spec}): {_kernel_line(k)}")
        boots = [r for r in runs if r.label == k.label]
        if not boots:
            lines.append("  not booted")
            continue
        outcomes: dict[str, int] = {}
        for r in boots:
            for o, n in r.outcomes.items():
                outcomes[o] = outcomes.get(o, 0) + n
        listed = ", ".join(f"{n} {o}" for o, n in sorted(outcomes.items())) or "none"
        hello = next((r.hello for r in boots if r.hello), None)
        uname = hello.get("kernel_release") if hello else None
        tracer = hello.get("tracer") if hello else None
        records = sum(r.records for r in boots)
        wall = sum(r.wall_ns for r in boots) / 1e9
        n_boots = f" in {len(boots)} boots" if len(boots) > 1 else ""
        complete = "" if all(r.ok for r in boots) else "; INCOMPLETE"
        lines.append(f"  guest uname -r {uname}; {records} kill records ({listed}){n_boots}; tracer {tracer}; "
                     f"boot-to-poweroff {wall:.0f} s{complete}")
        loads = [x for r in boots for x in (r.host_load_start, r.host_load_end) if x is not None]
        if loads:
            lines.append(f"  host 1-min load average during its boots: {min(loads):.2f}-{max(loads):.2f} "
                         f"(the guest's vCPUs share the host's {os.cpu_count()} CPUs)")
        for r in boots:
            lines.extend(f"  problem: {p}" for p in r.problems)
            lines.extend(f"  guest note: {n}" for n in r.notes)
    if len(kernels) > 1 and all(r.boot == 0 for r in runs):
        lines.append("note: each kernel was booted once, one after the other, so a change in host load during "
                     "the run falls on one side only; --boots N alternates the kernels")
    pkgs, wheels = guest.lock.get("packages"), guest.lock.get("wheels")
    lines.append(f"guest image {guest.path.name} (sha256 {guest.sha256[:16]}...), "
                 f"{len(pkgs) if isinstance(pkgs, list) else 0} Debian packages, "
                 f"{len(wheels) if isinstance(wheels, list) else 0} wheels")
    lines.append(f"total wall time {wall_s:.0f} s")
    return lines


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.0f}"
    return f"{med:.0f} [{min(values):.0f}-{max(values):.0f}]"


def peers_rows(episodes: list[dict[str, Any]]) -> list[list[str]]:
    """One row per mode: episodes, kernel OOM kills, full stall, first kill, recovery, victim first."""
    rows = []
    for mode in MODES:
        eps = [e for e in episodes if e.get("mode") == mode]
        if not eps:
            continue
        good = [e for e in eps if "error" not in e]

        def vals(key: str, good: list[dict[str, Any]] = good) -> list[float]:
            return [float(e[key]) for e in good if e.get(key) is not None]

        recovered = len(vals("time_to_recover_ms"))
        rows.append([
            mode, f"{len(good)}/{len(eps)}", f"{int(sum(vals('kernel_oom_kills')))}",
            _spread(vals("full_stall_ms")), _spread(vals("time_to_first_kill_ms")),
            f"{_spread(vals('time_to_recover_ms'))} ({recovered} recovered)",
            f"{sum(1 for e in good if e.get('designated_victim_killed_first'))}/{len(good)}",
        ])
    return rows


def peers_table(runs: Sequence[GuestRun]) -> str:
    """The ``--peers`` table of every kernel (medians with [min-max]: a range, not a CI)."""
    head = ["daemon", "episodes ok", "kernel OOM kills", "full stall ms", "first kill ms",
            "recover ms", "victim first"]
    out = ["Peers: the same pressure episode under lmkd-py, earlyoom and no daemon (kernel OOM killer).",
           "Values are median [min-max] over the episodes (a range, not a confidence interval); "
           "TCG emulation, whole-guest memory.", ""]
    labels = list(dict.fromkeys(r.label for r in runs))
    for label in labels:
        boots = [r for r in runs if r.label == label]
        episodes = [e for r in boots for e in r.peers]
        rows = peers_rows(episodes)
        hello = next((r.hello for r in boots if r.hello), None)
        kernel = hello.get("kernel_release") if hello else label
        out.append(f"kernel {label} ({kernel})")
        if not rows:
            out.append("  no peer episodes came back\n")
            continue
        widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
        out.append("  " + "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
        out.append("  " + "  ".join("-" * w for w in widths))
        out.extend("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)
        errors = [e for e in episodes if "error" in e]
        out.extend(f"  error in {e['mode']} round {e.get('round')}: {e['error']}" for e in errors)
        out.append("")
    return "\n".join(out) + "\n"
