"""Kernels for the lab: ``--kernel LABEL=SPEC`` parsing, Debian arm64 cloud kernel resolution and
download, and turning a vmlinuz into the raw arm64 ``Image`` that ``qemu-system-aarch64 -kernel`` boots.

SPEC forms:

- ``deb:6.12`` — the newest 6.12.x arm64 cloud kernel the archive has now; ``deb:7`` the newest 7.x
- ``deb:7.3.4+deb13-cloud-arm64`` — exactly that release (the name ``uname -r`` prints)
- anything else — a path to an arm64 ``Image``, ``Image.gz``, ``vmlinuz`` or EFI zboot image

The archive drops old versions, so every resolved kernel is kept in the cache with the exact package,
version and sha256 it came from (``kernels/<release>/kernel.json``); ``--offline`` resolves from there.
Newer Debian kernels ship the image in ``linux-binary-<release>`` (``usr/lib/modules/*/vmlinuz``),
older ones in ``linux-image-<release>`` (``boot/vmlinuz-*``): both are handled.
"""

from __future__ import annotations

import gzip
import json
import re
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import structlog

from lmkd_py.lab.apt import AptError, DebFile, PrivateApt, sha256_file

RELEASE_RE: Final = re.compile(r"(?P<upstream>\d+\.\d+(?:\.\d+)?)\+deb(?P<deb>\d+)-cloud-arm64")
PACKAGE_RE: Final = re.compile(r"linux-(?:image|binary)-(?P<release>" + RELEASE_RE.pattern + ")")
ARM64_IMAGE_MAGIC: Final = b"ARMd"  # at offset 0x38 of an arm64 Image (Documentation/arch/arm64/booting.rst)
ZBOOT_MAGIC: Final = b"zimg"  # at offset 4 of an EFI zboot image (drivers/firmware/efi/libstub/zboot-header.S)

log = structlog.get_logger("lmkd_py.lab.kernels")


class KernelError(RuntimeError):
    """A kernel SPEC that cannot be resolved, fetched or booted; the message says why."""


@dataclass(frozen=True)
class KernelSpec:
    label: str
    kind: str  # "deb-series" | "deb-release" | "path"
    value: str  # the series ("6.12"), the release, or the path


@dataclass
class Kernel:
    """A kernel ready to boot: ``image`` is a raw arm64 Image."""

    label: str
    spec: str
    image: Path
    image_sha256: str
    release: str | None  # from the package name; None for a file the user built
    package: DebFile | None = None
    source_file: str | None = None  # for SPEC paths: the file given and its sha256
    source_sha256: str | None = None
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, object]:
        return {
            "label": self.label, "spec": self.spec, "release": self.release,
            "image_sha256": self.image_sha256,
            "package": None if self.package is None else self.package.as_dict(),
            "source_file": self.source_file, "source_sha256": self.source_sha256, "notes": list(self.notes),
        }


# --- pure ----------------------------------------------------------------------------------------


def parse_kernel_arg(arg: str) -> KernelSpec:
    """``LABEL=SPEC`` -> KernelSpec. Raises ValueError with a message for the user."""
    label, sep, spec = arg.partition("=")
    if not sep or not label or not spec:
        raise ValueError(f"--kernel {arg!r}: expected LABEL=SPEC, e.g. A=deb:6.12 or B=/path/to/Image")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", label):
        raise ValueError(f"--kernel {arg!r}: the label may use letters, digits, '.', '_' and '-' only")
    if spec.startswith("deb:"):
        value = spec[4:]
        if RELEASE_RE.fullmatch(value):
            return KernelSpec(label, "deb-release", value)
        if re.fullmatch(r"\d+(\.\d+){0,2}", value):
            return KernelSpec(label, "deb-series", value)
        raise ValueError(
            f"--kernel {arg!r}: after deb: give a series (6.12, 7) or a release such as 7.3.4+deb13-cloud-arm64"
        )
    return KernelSpec(label, "path", spec)


def release_key(release: str) -> tuple[tuple[int, ...], int]:
    """Sort key of a release name: upstream version numbers, then the Debian release number."""
    m = RELEASE_RE.fullmatch(release)
    if m is None:
        raise ValueError(f"not a Debian arm64 cloud kernel release: {release!r}")
    return tuple(int(x) for x in m.group("upstream").split(".")), int(m.group("deb"))


def matching_releases(package_names: list[str], series: str) -> list[str]:
    """Releases named by ``package_names`` whose upstream version starts with ``series`` (numerically:
    6.1 does not match 6.12), newest first."""
    want = tuple(int(x) for x in series.split("."))
    found: set[str] = set()
    for name in package_names:
        m = PACKAGE_RE.fullmatch(name)
        if m is None:
            continue
        release = m.group("release")
        if release_key(release)[0][: len(want)] == want:
            found.add(release)
    return sorted(found, key=release_key, reverse=True)


def image_kind(head: bytes) -> str:
    """What a kernel file is, from its first 64 bytes: "image" (raw arm64 Image, maybe with an EFI
    stub), "gzip", "zboot" (EFI zboot), or "unknown"."""
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:2] == b"MZ" and head[4:8] == ZBOOT_MAGIC:
        return "zboot"
    if head[0x38:0x3C] == ARM64_IMAGE_MAGIC:
        return "image"
    return "unknown"


def zboot_payload(data: bytes) -> tuple[str, bytes]:
    """(compression name, compressed payload) of an EFI zboot image. Raises KernelError."""
    offset, size = struct.unpack_from("<II", data, 8)
    comp = data[24:32].rstrip(b"\0").decode(errors="replace")
    if offset + size > len(data):
        raise KernelError("EFI zboot header points past the end of the file")
    return comp, data[offset : offset + size]


def to_raw_image(src: Path, dest: Path) -> list[str]:
    """Write the raw arm64 Image of ``src`` to ``dest``; returns notes on what was done.
    Raises KernelError if ``src`` is not an arm64 kernel this can unpack."""
    data = src.read_bytes()
    kind = image_kind(data[:64])
    notes: list[str] = []
    if kind == "gzip":
        data = gzip.decompress(data)
        notes.append("gunzipped")
    elif kind == "zboot":
        comp, payload = zboot_payload(data)
        if comp != "gzip":
            raise KernelError(f"{src}: EFI zboot image compressed with {comp!r}; give the raw Image instead")
        data = gzip.decompress(payload)
        notes.append("unpacked from EFI zboot (gzip)")
    if image_kind(data[:64]) != "image":
        raise KernelError(f"{src}: not an arm64 kernel Image (no 'ARMd' magic at 0x38)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(dest)
    return notes


# --- resolution -----------------------------------------------------------------------------------


class KernelStore:
    """Kernels in ``cache/kernels/<release>/`` (``Image`` + ``kernel.json``) and how to get more."""

    def __init__(self, cache: Path, apt: PrivateApt | None, offline: bool) -> None:
        self.dir = cache / "kernels"
        self.debs = cache / "debs"
        self.apt = apt
        self.offline = offline

    def resolve(self, spec: KernelSpec, work: Path) -> Kernel:
        """A bootable Kernel for ``spec``; files the user gave are converted under ``work``.
        Raises KernelError."""
        if spec.kind == "path":
            return self._from_path(spec, work)
        release = spec.value if spec.kind == "deb-release" else self._newest(spec.value)
        kernel = self._cached(release) if self.offline else self._fetch(release)
        kernel.label = spec.label
        kernel.spec = f"deb:{spec.value}"
        return kernel

    def _newest(self, series: str) -> str:
        if self.offline:
            names = [f"linux-image-{p.name}" for p in self.dir.glob("*") if (p / "kernel.json").is_file()]
            where = f"the cache {self.dir} (offline)"
        else:
            assert self.apt is not None
            names = self.apt.package_names("linux-image-") + self.apt.package_names("linux-binary-")
            where = "the archive"
        releases = matching_releases(names, series)
        if not releases:
            raise KernelError(f"no arm64 cloud kernel {series}.x in {where}")
        if self.offline:
            return releases[0]
        for release in releases:  # the newest that has a downloadable package
            if self._image_package(release) is not None:
                return release
        raise KernelError(f"no downloadable arm64 cloud kernel package for {series}.x in the archive")

    def _image_package(self, release: str) -> DebFile | None:
        assert self.apt is not None
        for name in (f"linux-binary-{release}", f"linux-image-{release}"):
            try:
                return self.apt.candidate(name)
            except AptError:
                continue
        return None

    def _cached(self, release: str) -> Kernel:
        info_path = self.dir / release / "kernel.json"
        try:
            info = json.loads(info_path.read_text())
        except (OSError, ValueError) as exc:
            raise KernelError(f"kernel {release} is not in the cache ({info_path}): {exc}") from exc
        image = self.dir / release / "Image"
        if not image.is_file() or sha256_file(image) != info["image_sha256"]:
            raise KernelError(f"{image} is missing or differs from its recorded sha256; fetch it again online")
        return Kernel(label="", spec="", image=image, image_sha256=info["image_sha256"], release=release,
                      package=DebFile.from_dict(info["package"]), notes=list(info.get("notes", [])))

    def _fetch(self, release: str) -> Kernel:
        assert self.apt is not None
        deb = self._image_package(release)
        if deb is None:
            raise KernelError(f"the archive has no package with the kernel image of {release} (any more?)")
        try:
            cached = self._cached(release)
        except KernelError:
            cached = None
        if cached is not None and cached.package == deb:
            return cached
        try:
            path = self.apt.download(deb, self.debs)
        except AptError as exc:
            raise KernelError(str(exc)) from exc
        with tempfile.TemporaryDirectory(prefix="lmkd-py-lab-kernel-") as tmp:
            subprocess.run(["dpkg-deb", "-x", str(path), tmp], check=True)
            found = sorted(Path(tmp).glob("boot/vmlinuz-*")) + sorted(Path(tmp).glob("usr/lib/modules/*/vmlinuz"))
            if not found:
                raise KernelError(f"{deb.filename} holds no vmlinuz (boot/ or usr/lib/modules/)")
            image = self.dir / release / "Image"
            notes = to_raw_image(found[0], image)
            notes.append(f"image from {found[0].relative_to(tmp)} in {deb.filename}")
        sha = sha256_file(image)
        info = {"release": release, "package": deb.as_dict(), "image_sha256": sha, "notes": notes}
        (self.dir / release / "kernel.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        log.info("lab.kernel_cached", release=release, package=deb.name, version=deb.version)
        return Kernel(label="", spec="", image=image, image_sha256=sha, release=release, package=deb, notes=notes)

    def _from_path(self, spec: KernelSpec, work: Path) -> Kernel:
        src = Path(spec.value).expanduser()
        if not src.is_file():
            raise KernelError(f"--kernel {spec.label}={spec.value}: no such file")
        src_sha = sha256_file(src)
        with src.open("rb") as fh:
            kind = image_kind(fh.read(64))
        if kind == "image":
            image, notes = src, ["raw Image, booted as given"]
        else:
            image = work / f"Image-{spec.label}"
            notes = to_raw_image(src, image)
        return Kernel(label=spec.label, spec=spec.value, image=image, image_sha256=sha256_file(image),
                      release=None, source_file=str(src.resolve()), source_sha256=src_sha, notes=notes)
