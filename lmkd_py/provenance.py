"""Where a record was made: kernel, architecture, machine model, boot, lmkd-py version, config hash,
and the settings besides the kernel that sway reap latency (``confounders``).

Read once at start and on reload (never on the kill path) and stamped on every record, so record sets
from many boards and kernels can be told apart offline. Every confounder is optional: a source that is
missing or unreadable is recorded as unknown with the reason, never an error.
"""

from __future__ import annotations

import os
from pathlib import Path

from lmkd_py import __version__
from lmkd_py.lean import sha256_hex
from lmkd_py.records import Confounders, Provenance, Setting

# One setting's text is bounded: a kernel command line is at most a few KiB, a swap list a few lines.
MAX_SETTING_CHARS = 2048


def _read_text(path: Path) -> str | None:
    try:
        # Device-tree strings end in NUL; DMI files in a newline.
        text = path.read_bytes().rstrip(b"\0\n").decode(errors="replace").strip()
    except OSError:
        return None
    return text or None


# The app-specific machine id: systemd's machine-id(5) asks applications not to expose the id itself
# (it is a unique, stable secret of the installation), so a record carries a keyed hash of it instead,
# which tells boards apart without revealing the id (as sd_id128_get_machine_app_specific does).
_MACHINE_ID_KEY = b"lmkd-py board id v1\0"


def machine_id(etc_root: Path = Path("/etc")) -> str | None:
    """This board's id for records: 32 hex digits derived from /etc/machine-id, None when unreadable."""
    raw = _read_text(etc_root / "machine-id")
    if raw is None or len(raw) != 32:
        return None
    return sha256_hex(_MACHINE_ID_KEY + raw.lower().encode())[:32]


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


def _known(value: str) -> Setting:
    return Setting(value=value[:MAX_SETTING_CHARS])


def _unknown(why: str) -> Setting:
    return Setting(unreadable=why)


def _read_setting(path: Path) -> tuple[str | None, Setting | None]:
    """(text, None), or (None, the unknown Setting saying why)."""
    try:
        return path.read_bytes().decode(errors="replace").strip(), None
    except FileNotFoundError:
        return None, _unknown(f"{path}: no such file (this kernel lacks it)")
    except OSError as exc:
        return None, _unknown(f"{path}: {exc.strerror or exc}")


def _file(path: Path, bracketed: bool = False) -> Setting:
    """A one-value file; ``bracketed``: the choice sysfs marks ``[so]`` among the offered ones."""
    text, bad = _read_setting(path)
    if text is None:
        return bad or _unknown(str(path))
    if bracketed and "[" in text:
        text = text[text.index("[") + 1:text.find("]", text.index("["))]
    return _known(text)


def _swaps(proc_root: Path) -> Setting:
    text, bad = _read_setting(proc_root / "swaps")
    if text is None:
        return bad or _unknown("swaps")
    entries = []
    for line in text.splitlines()[1:]:  # the first line is the header
        f = line.split()
        if len(f) >= 5:
            entries.append(f"{f[0]} {f[1]} {f[2]} KiB prio {f[4]}")
    return _known("; ".join(entries) or "none")


def _zram(sys_root: Path) -> Setting:
    try:
        devices = sorted(p for p in (sys_root / "block").iterdir() if p.name.startswith("zram"))
    except OSError as exc:
        return _unknown(f"{sys_root / 'block'}: {exc.strerror or exc}")
    out = []
    for dev in devices:
        alg, size, streams = (_file(dev / name, bracketed=name == "comp_algorithm")
                              for name in ("comp_algorithm", "disksize", "max_comp_streams"))
        out.append(f"{dev.name} {alg.value or '?'} {size.value or '?'} B streams {streams.value or '?'}")
    return _known("; ".join(out) or "none")


def _cpu_model(proc_root: Path) -> Setting:
    text, bad = _read_setting(proc_root / "cpuinfo")
    if text is None:
        return bad or _unknown("cpuinfo")
    names: dict[str, None] = {}
    implementer = None
    for line in text.splitlines():
        key, _, value = (x.strip() for x in line.partition(":"))
        if key == "model name":
            names[value] = None
        elif key == "CPU implementer":  # arm64 names no model: its implementer and part number do
            implementer = value
        elif key == "CPU part" and implementer is not None:
            names[f"implementer {implementer} part {value}"] = None
    return _known(" + ".join(names)) if names else _unknown(f"{proc_root / 'cpuinfo'}: no model name or CPU part")


def _cpu_count(sys_root: Path) -> Setting:
    path = sys_root / "devices/system/cpu/online"
    text, bad = _read_setting(path)
    if text is None:
        return bad or _unknown(str(path))
    count = 0
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            count += int(hi or lo) - int(lo) + 1
    except ValueError:
        return _unknown(f"{path}: not a CPU list: {text[:80]!r}")
    return _known(str(count))


def _governors(sys_root: Path) -> Setting:
    cpus = sys_root / "devices/system/cpu"
    try:
        files = sorted(cpus.glob("cpu[0-9]*/cpufreq/scaling_governor"))
    except OSError as exc:
        return _unknown(f"{cpus}: {exc.strerror or exc}")
    found = {t for f in files if (t := _file(f).value)}
    if not found:
        return _unknown(f"{cpus}/cpu*/cpufreq: none (no cpufreq driver, e.g. a virtual machine)")
    return _known(", ".join(sorted(found)))


def _cmdline(proc_root: Path) -> Setting:
    text, bad = _read_setting(proc_root / "cmdline")
    if text is None:
        return bad or _unknown("cmdline")
    # BOOT_IMAGE= and initrd= name the kernel under test itself: an A/B would always differ in them.
    kept = [w for w in text.split() if not w.startswith(("BOOT_IMAGE=", "initrd="))]
    return _known(" ".join(kept))


def confounders(
    sys_root: Path = Path("/sys"), proc_root: Path = Path("/proc"), page_size: int | None = None
) -> Confounders:
    """The settings a kernel comparison must hold equal (records.Confounders), each read or explained."""
    mm = sys_root / "kernel/mm"
    vm = proc_root / "sys/vm"
    return Confounders(
        thp_enabled=_file(mm / "transparent_hugepage/enabled", bracketed=True),
        thp_defrag=_file(mm / "transparent_hugepage/defrag", bracketed=True),
        lru_gen=_file(mm / "lru_gen/enabled"),
        swappiness=_file(vm / "swappiness"),
        min_free_kbytes=_file(vm / "min_free_kbytes"),
        watermark_scale_factor=_file(vm / "watermark_scale_factor"),
        swap=_swaps(proc_root),
        zram=_zram(sys_root),
        page_size=_known(str(page_size if page_size is not None else os.sysconf("SC_PAGE_SIZE"))),
        cpu_model=_cpu_model(proc_root),
        cpu_count=_cpu_count(sys_root),
        cpufreq_governor=_governors(sys_root),
        kernel_cmdline=_cmdline(proc_root),
    )


def collect(
    config_hash: str | None = None,
    *,
    sys_root: Path = Path("/sys"),
    proc_root: Path = Path("/proc"),
    virtualised: str | None = None,
    etc_root: Path = Path("/etc"),
) -> Provenance:
    """Provenance of this machine now. Missing pieces are None (confounders: unknown with the reason)."""
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
        confounders=confounders(sys_root, proc_root),
        machine_id=machine_id(etc_root),
    )
