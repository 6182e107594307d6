"""The guest: an initramfs built on the host, without emulation.

Contents: busybox-static, a Python unpacked from Debian arm64 packages (and their whole dependency
closure as apt resolves it on an empty system), earlyoom (for ``--peers``), lmkd-py's runtime
dependencies as cp313 aarch64 wheels unzipped into ``dist-packages``, lmkd-py's own sources, and
``/init``. Nothing runs under emulation to build it.

What went in is pinned in ``guest-lock.json`` in the cache (every .deb's version and sha256, every
wheel's file name and sha256); with ``offline`` the image is built from that lock and the cached files
alone, and the archive is byte-identical for equal inputs (see ``image``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import posixpath
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog

import lmkd_py
from lmkd_py.lab.apt import AptError, DebFile, PrivateApt, sha256_file, verify_cached
from lmkd_py.lab.image import Entry, gzip_bytes, tree_entries, unresolved_libraries, with_parents, write_newc
from lmkd_py.lab.protocol import MARKER

PY: Final = "3.13"
# libstdc++6: google-re2's extension module (C++) links it; nothing else in the guest pulls it in.
GUEST_PACKAGES: Final = ("busybox-static", f"python{PY}-minimal", f"libpython{PY}-stdlib", "earlyoom", "libstdc++6")
USERLAND_RELEASE: Final = "trixie"
# pip download takes the platform tags literally (no older manylinux implied), so both are named:
# pydantic-core ships manylinux2014 (glibc 2.17) wheels, google-re2 manylinux_2_28 ones. The guest's
# trixie userland has glibc 2.41, so both run.
WHEEL_PLATFORMS: Final = ("manylinux2014_aarch64", "manylinux_2_28_aarch64")
SITE: Final = "usr/lib/python3/dist-packages"
LIB_DIRS: Final = ("usr/lib/aarch64-linux-gnu", "usr/lib", "usr/lib/aarch64-linux-gnu/gconv")
# Binaries whose libraries must all be present, or the guest cannot do its job.
MUST_LINK: Final = (f"usr/bin/python{PY}", "usr/bin/earlyoom")
STRIP_PREFIXES: Final = ("usr/share/doc/", "usr/share/man/", "usr/share/info/", "usr/share/locale/",
                         "usr/share/lintian/", "usr/share/bug/")
KEEP_IMAGES: Final = 4  # each lmkd-py source change makes a new ~22 MB image; keep the newest few
BUILDER_VERSION: Final = 1  # bump when the image layout changes, so cached images are rebuilt

INIT_SCRIPT: Final = f"""#!/usr/bin/busybox sh
# lmkd-py lab guest init: mount what the lab needs, run the job, power off.
/usr/bin/busybox mkdir -p /bb /proc /sys /dev /tmp /run
/usr/bin/busybox --install -s /bb
export PATH=/usr/sbin:/usr/bin:/bb HOME=/root LANG=C.UTF-8 PYTHONUNBUFFERED=1
export LMKD_PY_VIRTUALISED=qemu-tcg
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
echo '{MARKER} boot {{}}'
python{PY} -X utf8 -m lmkd_py.lab.inguest /lab/job.json
echo "{MARKER} exit {{\\"status\\": $?}}"
sync
poweroff -f
"""

log = structlog.get_logger("lmkd_py.lab.guest")


class GuestBuildError(RuntimeError):
    """The guest image cannot be built; the message says what is missing."""


@dataclass(frozen=True)
class GuestImage:
    path: Path
    sha256: str
    lock: dict[str, object]  # the guest-lock.json content it was built from
    unresolved: dict[str, list[str]]  # ELF files whose libraries are not in the image (informational)
    sources_sha256: str  # of lmkd-py's own files in the image (see sources_digest)


def runtime_requirements() -> list[str]:
    """``name==version`` for each runtime dependency of lmkd-py, pinned to what this host has (so the
    guest runs the versions the tests ran). Raises GuestBuildError if lmkd-py is not installed."""
    try:
        reqs = importlib.metadata.requires("lmkd-py") or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise GuestBuildError("lmkd-py is not installed as a distribution (pip install -e .)") from exc
    pins = []
    for req in reqs:
        if ";" in req:
            continue  # an extra's requirement (report, dev): not needed in the guest
        name = re.split(r"[<>=!~ \[]", req, maxsplit=1)[0]
        pins.append(f"{name}=={importlib.metadata.version(name)}")
    return sorted(pins)


def package_source_entries() -> list[Entry]:
    """lmkd-py's own modules, as the guest imports them from dist-packages."""
    root = Path(lmkd_py.__file__).parent
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".typed"):
            out.append(Entry(f"{SITE}/lmkd_py/{p.relative_to(root)}", stat.S_IFREG | 0o644, data=p.read_bytes()))
    return out


def sources_digest(entries: list[Entry]) -> str:
    """sha256 over the paths and contents of lmkd-py's files, as ``package_source_entries`` gives them."""
    h = hashlib.sha256()
    for e in entries:
        h.update(e.path.encode() + b"\0" + hashlib.sha256(e.data or b"").digest())
    return h.hexdigest()


def wheel_entries(path: Path) -> list[Entry]:
    """The files of a wheel as they land in dist-packages (``*.data/purelib|platlib`` included,
    scripts and headers left out). Raises GuestBuildError for a member path that escapes."""
    out = []
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            name = info.filename
            if info.is_dir():
                continue
            parts = name.split("/")
            if ".." in parts or name.startswith("/"):
                raise GuestBuildError(f"{path.name}: member {name!r} escapes the install directory")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                name = "/".join(parts[2:])
            out.append(Entry(f"{SITE}/{name}", stat.S_IFREG | 0o644, data=zf.read(info)))
    return out


def _merge_usr(root: Path) -> None:
    """Debian trixie is merged-/usr: /bin, /sbin and /lib are links into /usr (base-files makes them,
    and the dynamic loader is found as /lib/ld-linux-aarch64.so.1)."""
    for d in ("bin", "sbin", "lib"):
        top = root / d
        if top.is_dir() and not top.is_symlink():
            for item in sorted(top.iterdir()):
                dest = root / "usr" / d / item.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                if not dest.exists():
                    item.rename(dest)
            shutil.rmtree(top)
        if not top.is_symlink():
            top.symlink_to(f"usr/{d}")


def _elf_files(entries: list[Entry]) -> dict[str, bytes]:
    """Path -> content of regular files, with symlinks followed (sonames are links to files)."""
    by_path = {e.path: e for e in entries}
    files: dict[str, bytes] = {}
    for e in entries:
        cur: Entry | None = e
        path = e.path
        for _ in range(8):
            if cur is None or cur.target is None:
                break
            t = cur.target
            joined = t.lstrip("/") if t.startswith("/") else posixpath.join(posixpath.dirname(path), t)
            path = posixpath.normpath(joined)
            if path.split("/", 1)[0] in ("bin", "sbin", "lib"):
                path = f"usr/{path}"  # the merged-/usr links
            cur = by_path.get(path)
        if cur is not None and cur.data is not None:
            files[e.path] = cur.data
    return files


class GuestBuilder:
    """Builds (or reuses) the initramfs under ``cache/images``."""

    def __init__(self, cache: Path, apt: PrivateApt | None, offline: bool) -> None:
        self.cache = cache
        self.apt = apt
        self.offline = offline
        self.lock_path = cache / "guest-lock.json"

    # -- inputs ----------------------------------------------------------------------------------
    def lock(self) -> dict[str, object]:
        """The pinned inputs: resolved and downloaded now (online), or read from the cache (offline).
        Raises GuestBuildError."""
        if self.offline:
            try:
                lock: dict[str, object] = json.loads(self.lock_path.read_text())
            except (OSError, ValueError) as exc:
                raise GuestBuildError(f"offline, and no usable {self.lock_path}: {exc}") from exc
            try:
                for d in self._debs(lock):
                    verify_cached(d, self.cache / "debs")
            except AptError as exc:
                raise GuestBuildError(str(exc)) from exc
            for w in self._wheels(lock):
                self._verify_wheel(w)
            return lock
        assert self.apt is not None
        try:
            debs = self.apt.closure(GUEST_PACKAGES, USERLAND_RELEASE)
            for d in debs:
                self.apt.download(d, self.cache / "debs")
        except AptError as exc:
            raise GuestBuildError(str(exc)) from exc
        wheels = self._download_wheels(runtime_requirements())
        lock = {"packages": [d.as_dict() for d in debs], "wheels": wheels, "python": PY,
                "userland_release": USERLAND_RELEASE, "wheel_platform": " ".join(WHEEL_PLATFORMS)}
        self.lock_path.write_text(json.dumps(lock, indent=2, sort_keys=True) + "\n")
        return lock

    @staticmethod
    def _debs(lock: dict[str, object]) -> list[DebFile]:
        pkgs = lock.get("packages")
        assert isinstance(pkgs, list)
        return [DebFile.from_dict(p) for p in pkgs]

    @staticmethod
    def _wheels(lock: dict[str, object]) -> list[dict[str, str]]:
        wheels = lock.get("wheels")
        assert isinstance(wheels, list)
        return [{"filename": str(w["filename"]), "sha256": str(w["sha256"])} for w in wheels]

    def _verify_wheel(self, w: dict[str, str]) -> Path:
        path = self.cache / "wheels" / w["filename"]
        if not path.is_file() or sha256_file(path) != w["sha256"]:
            raise GuestBuildError(f"{path} is missing or differs from the recorded sha256")
        return path

    def _download_wheels(self, pins: list[str]) -> list[dict[str, str]]:
        with tempfile.TemporaryDirectory(prefix="lmkd-py-lab-wheels-") as tmp:
            argv = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                    "--only-binary=:all:", *(a for p in WHEEL_PLATFORMS for a in ("--platform", p)),
                    "--python-version", PY,
                    "--implementation", "cp", "--abi", f"cp{PY.replace('.', '')}", "-d", tmp, *pins]
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800, check=False)
            if proc.returncode != 0:
                raise GuestBuildError(f"pip download failed ({proc.returncode}): {proc.stderr.strip()[-1500:]}")
            dest = self.cache / "wheels"
            dest.mkdir(parents=True, exist_ok=True)
            out = []
            for p in sorted(Path(tmp).glob("*.whl")):
                shutil.copyfile(p, dest / p.name)
                out.append({"filename": p.name, "sha256": sha256_file(dest / p.name)})
        log.info("lab.wheels", wheels=[w["filename"] for w in out])
        return out

    # -- the image -------------------------------------------------------------------------------
    def build(self, force: bool = False, out: Path | None = None) -> GuestImage:
        """The image for the current inputs: reused from the cache when an equal one exists (unless
        ``force``), else built. ``out`` writes it there instead of the cache. Raises GuestBuildError."""
        lock = self.lock()
        sources = package_source_entries()
        key_doc = json.dumps({"lock": lock, "builder": BUILDER_VERSION, "init": INIT_SCRIPT,
                              "sources": [(e.path, hashlib.sha256(e.data or b"").hexdigest()) for e in sources]},
                             sort_keys=True)
        key = hashlib.sha256(key_doc.encode()).hexdigest()[:24]
        images = self.cache / "images"
        meta_path = images / f"{key}.json"
        if not force and out is None and meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            path = images / meta["file"]
            if path.is_file() and sha256_file(path) == meta["sha256"]:
                return GuestImage(path, meta["sha256"], lock, meta["unresolved"], sources_digest(sources))
        entries, unresolved = self._entries(lock, sources)
        raw = _archive(entries)
        data = gzip_bytes(raw)
        sha = hashlib.sha256(data).hexdigest()
        path = out if out is not None else images / f"initramfs-{sha[:16]}.cpio.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if out is None:
            meta_path.write_text(json.dumps({"file": path.name, "sha256": sha, "unresolved": unresolved}))
            _prune(images, keep=KEEP_IMAGES)
        log.info("lab.guest_built", path=str(path), sha256=sha, size=len(data), entries=len(entries))
        return GuestImage(path, sha, lock, unresolved, sources_digest(sources))

    def _entries(self, lock: dict[str, object], sources: list[Entry]) -> tuple[list[Entry], dict[str, list[str]]]:
        with tempfile.TemporaryDirectory(prefix="lmkd-py-lab-root-") as tmp:
            root = Path(tmp)
            for d in sorted(self._debs(lock), key=lambda d: d.name):
                subprocess.run(["dpkg-deb", "-x", str(self.cache / "debs" / d.filename), str(root)], check=True)
            _merge_usr(root)
            files = [e for e in tree_entries(root) if not e.path.startswith(STRIP_PREFIXES)]
        for w in self._wheels(lock):
            files.extend(wheel_entries(self._verify_wheel(w)))
        files.extend(sources)
        content = {"lock": lock, "lmkd_py_version": lmkd_py.__version__,
                   "sources_sha256": sources_digest(sources)}
        files += [
            Entry("init", stat.S_IFREG | 0o755, data=INIT_SCRIPT.encode()),
            Entry("etc/lmkd-lab/image.json", stat.S_IFREG | 0o644,
                  data=(json.dumps(content, indent=1, sort_keys=True) + "\n").encode()),
            Entry("dev", stat.S_IFDIR | 0o755),
            Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
            *(Entry(d, stat.S_IFDIR | 0o755) for d in ("proc", "sys", "run", "root", "lab", "bb")),
            Entry("tmp", stat.S_IFDIR | 0o1777),
        ]
        entries = with_parents(files)
        elf = _elf_files(entries)
        unresolved = unresolved_libraries(elf, LIB_DIRS)
        fatal = {p: m for p, m in unresolved.items() if p in MUST_LINK}
        if fatal:
            raise GuestBuildError(f"libraries missing from the guest image: {fatal}")
        return entries, unresolved


def _prune(images: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest images and their key files."""
    metas = sorted(images.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for meta in metas[keep:]:
        try:
            name = json.loads(meta.read_text())["file"]
        except (OSError, ValueError, KeyError):
            name = None
        meta.unlink(missing_ok=True)
        if name and not any(json.loads(m.read_text()).get("file") == name for m in metas[:keep]):
            (images / name).unlink(missing_ok=True)


def _archive(entries: list[Entry]) -> bytes:
    import io

    buf = io.BytesIO()
    write_newc(entries, buf)
    return buf.getvalue()


def job_archive(job: dict[str, object]) -> bytes:
    """A small uncompressed newc archive holding ``/lab/job.json``; appended to the image, the kernel
    unpacks it over the first one (the initramfs format allows concatenated archives)."""
    import io

    buf = io.BytesIO()
    data = (json.dumps(job, sort_keys=True) + "\n").encode()
    write_newc([Entry("lab", stat.S_IFDIR | 0o755), Entry("lab/job.json", stat.S_IFREG | 0o644, data=data)], buf)
    raw = buf.getvalue()
    return raw + b"\0" * (-len(raw) % 512)
