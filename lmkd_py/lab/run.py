"""One guest boot on the host: QEMU (aarch64, TCG), the console read line by line, and the guest's
``@LMKDLAB@`` lines turned into files under the run's output directory.

The guest reports only over its serial console (PL011, built into every arm64 kernel that boots on
``-M virt``), so no virtio module, 9p or disk image is needed, and a kernel the engineer built with
a small config works too. The kernel's own console messages are kept quiet (``loglevel=1``) so that
they do not split the guest's lines; the full console is kept in ``console-LABEL.log``.

The only process this starts is QEMU, through its own ``Popen``; on a timeout or an interruption it
is killed through that handle and reaped.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import structlog
from pydantic import ValidationError

from lmkd_py.lab.guest import GuestImage, job_archive
from lmkd_py.lab.kernels import Kernel
from lmkd_py.lab.protocol import parse_marker
from lmkd_py.records import RecordWriter, validate_record

QEMU: Final = "qemu-system-aarch64"
# pauth-impdef: QEMU's cheap pointer-authentication algorithm. The CPU model stays "max" (the guest
# still sees and uses PAC); the architected QARMA5 cipher is many times slower to emulate under TCG.
CPU: Final = "max,pauth-impdef=on"
APPEND: Final = "console=ttyAMA0 psi=1 loglevel=1 panic=-1 rdinit=/init"

log = structlog.get_logger("lmkd_py.lab.run")


@dataclass
class GuestRun:
    """What came back from one boot."""

    label: str
    kernel: Kernel
    records_path: Path
    console_path: Path
    qemu_argv: list[str]
    boot: int = 0  # which boot of this kernel (with --boots)
    # The host's 1-minute load average when the boot started and ended: TCG's vCPUs are host threads,
    # so other work on the host slows the guest down (seen: a busy loop elsewhere doubled kill times).
    host_load_start: float | None = None
    host_load_end: float | None = None
    hello: dict[str, Any] | None = None
    records: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    peers: list[dict[str, Any]] = field(default_factory=list)
    notes: list[dict[str, Any]] = field(default_factory=list)
    done: dict[str, Any] | None = None
    guest_exit: int | None = None
    returncode: int | None = None
    timed_out: bool = False
    wall_ns: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.done is not None and not self.timed_out and self.guest_exit == 0

    def summary(self) -> dict[str, Any]:
        return {
            "label": self.label, "boot": self.boot, "kernel": self.kernel.describe(),
            "records_file": self.records_path.name,
            "console_file": self.console_path.name, "qemu_argv": self.qemu_argv, "hello": self.hello,
            "records": self.records, "outcomes": self.outcomes, "peers": self.peers, "notes": self.notes,
            "done": self.done,
            "guest_exit": self.guest_exit, "qemu_returncode": self.returncode, "timed_out": self.timed_out,
            "wall_s": round(self.wall_ns / 1e9, 1), "problems": self.problems,
            "host_load_start": self.host_load_start, "host_load_end": self.host_load_end,
        }


def qemu_argv(image: Path, initrd: Path, mem_mib: int, smp: int = 2) -> list[str]:
    """The QEMU command line of one guest boot (TCG: KVM is not used even where it exists, so every
    figure is from the same kind of emulation)."""
    return [
        QEMU, "-M", "virt", "-cpu", CPU, "-smp", str(smp), "-accel", "tcg,thread=multi", "-m", str(mem_mib),
        "-kernel", str(image), "-initrd", str(initrd), "-append", APPEND,
        "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot", "-nodefaults",
    ]


class _Collector:
    """Feeds console bytes in, keeps the console log and the records file, collects the rest."""

    def __init__(self, run: GuestRun) -> None:
        self.run = run
        self.buf = b""
        self.console = run.console_path.open("wb")
        self.writer = RecordWriter(run.records_path, max_bytes=1 << 40, keep=0, fsync=False)

    def feed(self, data: bytes) -> None:
        self.console.write(data)
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        for raw in lines:
            self._line(raw.decode("utf-8", errors="replace").rstrip("\r"))

    def close(self) -> None:
        if self.buf:
            self._line(self.buf.decode("utf-8", errors="replace"))
            self.buf = b""
        self.console.close()

    def _line(self, line: str) -> None:
        run = self.run
        try:
            parsed = parse_marker(line)
        except ValueError as exc:
            run.problems.append(f"damaged guest line ({exc}): {line[:200]}")
            return
        if parsed is None:
            return
        kind, obj = parsed
        if kind == "record":
            try:
                record = validate_record(obj)
            except ValidationError as exc:
                run.problems.append(f"record that does not validate: {exc.errors()[0]}")
                return
            if self.writer.write(record):
                run.records += 1
                run.outcomes[record.outcome.value] = run.outcomes.get(record.outcome.value, 0) + 1
                log.info("lab.record", label=run.label, n=run.records, outcome=record.outcome.value,
                         kill_to_exit_ms=None if record.kill_to_exit_ns is None else record.kill_to_exit_ns / 1e6)
            else:
                # Disk full, or a records path the writer refuses (e.g. an output directory others may
                # write): a lost record must show in the run's problems, not vanish.
                run.problems.append(f"record not stored: {self.writer.stats.last_error}")
        elif kind == "hello":
            run.hello = obj
            log.info("lab.guest_up", label=run.label, kernel=obj.get("kernel_release"), tracer=obj.get("tracer"))
        elif kind == "peer":
            run.peers.append(obj)
        elif kind == "note":
            run.notes.append(obj)
            log.warning("lab.guest_note", label=run.label, **{k: str(v) for k, v in obj.items()})
        elif kind == "done":
            run.done = obj
        elif kind == "exit":
            run.guest_exit = int(obj.get("status", -1))


def run_guest(kernel: Kernel, guest: GuestImage, job: dict[str, Any], out_dir: Path, *, mem_mib: int,
              timeout_s: float, boot: int = 0, boots: int = 1) -> GuestRun:
    """Boot ``kernel`` with ``guest`` plus the job, collect until the guest powers off (or
    ``timeout_s``), and return what came back. Boot ``boot`` of ``boots`` appends to the kernel's
    records file (the first boot starts it afresh) and keeps its own console log.
    Raises FileNotFoundError if QEMU is not installed."""
    if shutil.which(QEMU) is None:
        raise FileNotFoundError(f"{QEMU} not found: install the qemu-system-arm package")
    label = kernel.label
    with tempfile.TemporaryDirectory(prefix="lmkd-py-lab-boot-") as tmp:
        initrd = Path(tmp) / "initrd.cpio"
        with initrd.open("wb") as fh:
            fh.write(guest.path.read_bytes())
            fh.write(b"\0" * (-guest.path.stat().st_size % 4))
            fh.write(job_archive(job))
        argv = qemu_argv(kernel.image, initrd, mem_mib)
        console = f"console-{label}.log" if boots == 1 else f"console-{label}-{boot + 1}.log"
        run = GuestRun(label=label, kernel=kernel, records_path=out_dir / f"records-{label}.jsonl",
                       console_path=out_dir / console, qemu_argv=argv, boot=boot)
        if boot == 0:
            run.records_path.unlink(missing_ok=True)
        collector = _Collector(run)
        run.host_load_start = round(os.getloadavg()[0], 2)
        t0 = time.monotonic_ns()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        log.info("lab.boot", label=label, kernel=kernel.release or kernel.spec, qemu_pid=proc.pid)
        try:
            assert proc.stdout is not None
            fd = proc.stdout.fileno()
            deadline = time.monotonic() + timeout_s
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    run.timed_out = True
                    run.problems.append(f"the guest did not power off within {timeout_s:.0f} s; QEMU killed")
                    break
                readable, _, _ = select.select([fd], [], [], min(left, 5.0))
                if not readable:
                    continue
                data = os.read(fd, 65536)
                if not data:
                    break
                collector.feed(data)
        finally:
            if proc.poll() is None:
                proc.kill()
            run.returncode = proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
            collector.close()
            run.wall_ns = time.monotonic_ns() - t0
            run.host_load_end = round(os.getloadavg()[0], 2)
    if run.done is None and not run.timed_out:
        run.problems.append("the guest stopped before it reported 'done' (see the console log)")
    log.info("lab.guest_done", label=label, records=run.records, wall_s=round(run.wall_ns / 1e9, 1),
             ok=run.ok)
    return run
