"""The arm64 kernel A/B lab: Debian (or the engineer's own) kernels booted under QEMU TCG from an
initramfs built on the host, the same victims killed by lmkd-py's Killer on each, records brought
back over the serial console and compared by kernel.

Modules: ``apt`` (private apt configuration), ``kernels`` (SPEC resolution and Image extraction),
``image`` (deterministic cpio, ELF NEEDED), ``guest`` (the initramfs), ``run`` (one QEMU boot),
``inguest`` and ``peers`` (what runs inside the guest), ``summary`` (printed text), ``cli``.
Nothing here is imported by the daemon.
"""

from __future__ import annotations

import argparse

from lmkd_py.lab.args import add_lab_arguments  # light: argparse, os and pathlib only

__all__ = ["add_lab_arguments", "cmd_lab"]


def cmd_lab(args: argparse.Namespace) -> int:
    """``lmkd-py lab``; QEMU, apt and image code load only when the command runs."""
    from lmkd_py.lab.cli import cmd_lab as run

    return run(args)
