"""A private apt configuration for arm64 Debian packages, kept in the lab cache.

The system's apt configuration is never read for packages and never written: this module writes its
own ``apt.conf`` (``Dir::Etc``, ``Dir::State``, ``Dir::Cache`` and the dpkg status all under the
cache, ``APT::Architectures`` = arm64) and passes it to ``apt-get``/``apt-cache`` through
``APT_CONFIG``. Only the mirror URL is taken from the system's sources (so no host name is written
into the project), and the archive keyring is the system's ``debian-archive-keyring``.

Every download is checked against the SHA256 the signed index gives, and described by a
``DebFile`` (name, version, file name, sha256, size) that the manifests record.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

import structlog

SUITES: Final = ("trixie", "trixie-backports", "sid")
ARCH: Final = "arm64"
KEYRING: Final = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
SYSTEM_SOURCES: Final = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
MIRROR_ENV: Final = "LMKD_PY_LAB_MIRROR"
_TIMEOUT_S: Final = 1800.0

log = structlog.get_logger("lmkd_py.lab.apt")


class AptError(RuntimeError):
    """An apt step failed; the message carries the command and the tail of its stderr."""


@dataclass(frozen=True)
class DebFile:
    """One .deb as the archive index describes it (and, once downloaded, as the cache holds it)."""

    name: str
    version: str
    arch: str
    filename: str  # basename of the pool file
    sha256: str
    size: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> DebFile:
        return cls(
            name=str(d["name"]), version=str(d["version"]), arch=str(d["arch"]),
            filename=str(d["filename"]), sha256=str(d["sha256"]), size=int(str(d["size"])),
        )


# --- pure parsers ---------------------------------------------------------------------------------


def parse_stanzas(text: str) -> list[dict[str, str]]:
    """Split deb822 text (``apt-cache show`` output, a .sources file) into field dicts. Continuation
    lines are joined to their field with a newline."""
    out: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    last: str | None = None
    for line in text.splitlines():
        if not line.strip():
            if cur:
                out.append(cur)
            cur, last = {}, None
            continue
        if line.startswith("#"):
            continue
        if line[0] in " \t" and last is not None:
            cur[last] += "\n" + line.strip()
            continue
        key, sep, value = line.partition(":")
        if sep:
            last = key.strip()
            cur[last] = value.strip()
    if cur:
        out.append(cur)
    return out


def mirror_from_sources(one_line: Iterable[str], deb822: Iterable[str]) -> str | None:
    """The first Debian archive URI of the system's sources (not a security or ports archive).

    ``one_line``: texts of ``sources.list`` style files; ``deb822``: texts of ``.sources`` files."""
    uris: list[str] = []
    for text in one_line:
        for line in text.splitlines():
            parts = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
            if len(parts) >= 2 and parts[0] == "deb":
                uris.append(parts[1])
    for text in deb822:
        for stanza in parse_stanzas(text):
            if "deb" in stanza.get("Types", "").split() and stanza.get("Enabled", "yes") != "no":
                uris.extend(stanza.get("URIs", "").split())
    for uri in uris:
        if re.fullmatch(r"https?://[^ ]+/debian/?", uri):
            return uri.rstrip("/")
    return None


def parse_simulated_install(text: str) -> list[tuple[str, str]]:
    """``(name, version)`` of every ``Inst`` line of ``apt-get -s install`` output, in order."""
    out: list[tuple[str, str]] = []
    for m in re.finditer(r"^Inst (\S+) (?:\[[^]]*\] )?\((\S+) ", text, re.MULTILINE):
        name = m.group(1).split(":", 1)[0]
        out.append((name, m.group(2)))
    return out


def parse_policy_candidate(text: str) -> str | None:
    """The ``Candidate:`` version of ``apt-cache policy NAME`` output; None for none or "(none)"."""
    m = re.search(r"^\s*Candidate:\s*(\S+)", text, re.MULTILINE)
    return None if m is None or m.group(1) == "(none)" else m.group(1)


def deb_from_stanza(stanza: Mapping[str, str]) -> DebFile:
    """A DebFile from one ``apt-cache show`` stanza. Raises KeyError if a field is missing."""
    return DebFile(
        name=stanza["Package"], version=stanza["Version"], arch=stanza["Architecture"],
        filename=stanza["Filename"].rsplit("/", 1)[-1], sha256=stanza["SHA256"], size=int(stanza["Size"]),
    )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# --- the private configuration --------------------------------------------------------------------


def system_mirror() -> str | None:
    """The mirror URL: ``$LMKD_PY_LAB_MIRROR``, else the first Debian archive of the system's sources."""
    env = os.environ.get(MIRROR_ENV)
    if env:
        return env.rstrip("/")
    one_line: list[str] = []
    deb822: list[str] = []
    main, parts = SYSTEM_SOURCES
    for path in [main, *sorted(parts.glob("*"))] if parts.is_dir() else [main]:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        if path.suffix == ".sources":
            deb822.append(text)
        elif path.suffix == ".list" or path == main:
            one_line.append(text)
    return mirror_from_sources(one_line, deb822)


class PrivateApt:
    """apt-get and apt-cache on a configuration of our own under ``root``."""

    def __init__(self, root: Path, mirror: str, suites: tuple[str, ...] = SUITES, keyring: Path = KEYRING):
        self.root = root
        self.mirror = mirror
        self.suites = suites
        self.keyring = keyring
        self.conf = root / "apt.conf"

    def setup(self) -> None:
        """Write the configuration (idempotent). Raises AptError if the keyring is missing."""
        if not self.keyring.is_file():
            raise AptError(f"{self.keyring} is missing: install the debian-archive-keyring package")
        for d in ("etc/apt.conf.d", "etc/preferences.d", "etc/sources.list.d", "state/lists/partial",
                  "cache/archives/partial"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        (self.root / "status").touch()
        # check-valid-until=no: sid's Release carries a Valid-Until a week out, and mirrors that lag
        # (seen here) would otherwise fail the update; the signature is still checked.
        sources = "".join(
            f"deb [arch={ARCH} signed-by={self.keyring} check-valid-until=no] {self.mirror} {s} main\n"
            for s in self.suites
        )
        (self.root / "etc/sources.list").write_text(sources)
        r = self.root
        self.conf.write_text(
            f'Dir::Etc "{r}/etc";\nDir::Etc::Parts "{r}/etc/apt.conf.d";\n'
            f'Dir::Etc::sourcelist "{r}/etc/sources.list";\nDir::Etc::sourceparts "{r}/etc/sources.list.d";\n'
            f'Dir::Etc::preferences "{r}/etc/preferences";\nDir::Etc::preferencesparts "{r}/etc/preferences.d";\n'
            f'Dir::State "{r}/state";\nDir::State::status "{r}/status";\nDir::Cache "{r}/cache";\n'
            f'APT::Architecture "{ARCH}";\nAPT::Architectures {{ "{ARCH}"; }};\n'
            'Acquire::Languages "none";\nAPT::Sandbox::User "root";\n'
            'APT::Install-Recommends "false";\nAPT::Get::AllowUnauthenticated "false";\n'
        )

    def _run(self, argv: list[str], cwd: Path | None = None) -> str:
        env = {**os.environ, "APT_CONFIG": str(self.conf), "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"}
        try:
            proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=_TIMEOUT_S,
                                  check=False)
        except FileNotFoundError as exc:
            raise AptError(f"{argv[0]} not found: this needs apt (Debian or Ubuntu host)") from exc
        except subprocess.TimeoutExpired as exc:
            raise AptError(f"{' '.join(argv)} took longer than {_TIMEOUT_S:.0f} s") from exc
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip()[-1500:]
            raise AptError(f"{' '.join(argv)} failed with status {proc.returncode}: {tail}")
        return proc.stdout

    def update(self) -> None:
        """Fetch the package indexes of our suites. Raises AptError (e.g. no network)."""
        self.setup()
        out = self._run(["apt-get", "update", "-q"])
        log.info("lab.apt_updated", suites=list(self.suites), lines=len(out.splitlines()))

    def has_lists(self) -> bool:
        lists = self.root / "state/lists"
        return lists.is_dir() and any(lists.glob("*_Packages*"))

    def package_names(self, prefix: str) -> list[str]:
        """Names apt knows that start with ``prefix`` (real and virtual)."""
        return sorted(set(self._run(["apt-cache", "pkgnames", prefix]).split()))

    def show(self, name: str) -> list[DebFile]:
        """Every downloadable version of ``name`` the indexes list (empty if none)."""
        try:
            text = self._run(["apt-cache", "show", name])
        except AptError:
            return []
        out = []
        for st in parse_stanzas(text):
            try:
                out.append(deb_from_stanza(st))
            except KeyError:
                continue  # a virtual package's pseudo-stanza has no Filename
        return out

    def candidate(self, name: str) -> DebFile:
        """The version apt's policy picks for ``name`` (dependencies are not resolved: the lab only
        unpacks it). Raises AptError if ``name`` has none."""
        version = parse_policy_candidate(self._run(["apt-cache", "policy", name]))
        if version is None:
            raise AptError(f"apt has no installable candidate for {name}")
        return self.exact(name, version)

    def exact(self, name: str, version: str) -> DebFile:
        for deb in self.show(name):
            if deb.version == version:
                return deb
        raise AptError(f"{name} {version} is not in the archive indexes (any more?)")

    def closure(self, names: Iterable[str], default_release: str | None) -> list[DebFile]:
        """Every package (with its version) that installing ``names`` on an empty system pulls in,
        sorted by name. Raises AptError if apt cannot resolve them."""
        argv = ["apt-get", "-s", "install", *names]
        if default_release:
            argv[1:1] = ["-o", f"APT::Default-Release={default_release}"]
        pairs = parse_simulated_install(self._run(argv))
        return sorted((self.exact(n, v) for n, v in pairs), key=lambda d: d.name)

    def download(self, deb: DebFile, dest: Path) -> Path:
        """``dest/deb.filename``, downloaded unless the cache already holds it with the right sha256.
        Raises AptError on a failed download or a hash mismatch."""
        dest.mkdir(parents=True, exist_ok=True)
        path = dest / deb.filename
        if path.is_file() and sha256_file(path) == deb.sha256:
            return path
        self._run(["apt-get", "download", "-q", f"{deb.name}={deb.version}"], cwd=dest)
        if not path.is_file():
            # apt names the file name_version_arch.deb with ':' as %3a; the pool may use a plain ':'.
            alt = dest / f"{deb.name}_{deb.version.replace(':', '%3a')}_{deb.arch}.deb"
            if alt.is_file():
                alt.rename(path)
        if not path.is_file():
            raise AptError(f"apt-get download {deb.name}={deb.version} left no {path.name} in {dest}")
        got = sha256_file(path)
        if got != deb.sha256:
            path.unlink()
            raise AptError(f"{path.name}: sha256 {got} does not match the index's {deb.sha256}")
        log.info("lab.deb_downloaded", name=deb.name, version=deb.version, size=deb.size)
        return path


def verify_cached(deb: DebFile, dest: Path) -> Path:
    """The cached file of ``deb``, checked against its recorded sha256 (offline builds).
    Raises AptError naming what is missing or different."""
    path = dest / deb.filename
    if not path.is_file():
        raise AptError(f"{path} is not in the cache; run once with network to fill it")
    got = sha256_file(path)
    if got != deb.sha256:
        raise AptError(f"{path}: sha256 {got} differs from the recorded {deb.sha256}")
    return path
