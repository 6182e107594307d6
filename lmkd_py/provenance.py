"""Where a record was made: kernel, architecture, machine model, boot, lmkd-py version, config hash.

Read once at start (never on the kill path) and stamped on every record, so record sets from many
boards and kernels can be told apart offline.
"""

from __future__ import annotations

import os
from pathlib import Path

from lmkd_py import __version__
from lmkd_py.records import Provenance


def _read_text(path: Path) -> str | None:
    try:
        # Device-tree strings end in NUL; DMI files in a newline.
        text = path.read_bytes().rstrip(b"\0\n").decode(errors="replace").strip()
    except OSError:
        return None
    return text or None


def machine_model(sys_root: Path = Path("/sys"), proc_root: Path = Path("/proc")) -> str | None:
    """The board or machine name: device tree ``model`` on arm64 boards, DMI vendor + product on PCs."""
    for dt in (sys_root / "firmware/devicetree/base/model", proc_root / "device-tree/model"):
        model = _read_text(dt)
        if model:
            return model
    vendor = _read_text(sys_root / "class/dmi/id/sys_vendor")
    product = _read_text(sys_root / "class/dmi/id/product_name")
    parts = [p for p in (vendor, product) if p]
    return " ".join(parts) if parts else None


def collect(
    config_hash: str | None = None,
    *,
    sys_root: Path = Path("/sys"),
    proc_root: Path = Path("/proc"),
    virtualised: str | None = None,
) -> Provenance:
    """Provenance of this machine now. Missing pieces are None."""
    uts = os.uname()
    return Provenance(
        hostname=uts.nodename,
        kernel_release=uts.release,
        kernel_version=uts.version,
        arch=uts.machine,
        machine_model=machine_model(sys_root, proc_root),
        boot_id=_read_text(proc_root / "sys/kernel/random/boot_id"),
        lmkd_py_version=__version__,
        config_hash=config_hash,
        virtualised=virtualised or os.environ.get("LMKD_PY_VIRTUALISED") or None,
    )
