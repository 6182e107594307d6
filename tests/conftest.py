"""Fixtures shared by every tier: child processes that the test itself starts (and always reaps)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

VICTIM_CODE = """
import sys, time
size = int(sys.argv[1]) << 20
b = bytearray(size)
for i in range(0, size, 4096):
    b[i] = 1
print("ready", flush=True)
time.sleep(3600)
"""


class Children:
    """Processes a test started; everything still alive is SIGKILLed (through its own handle) and
    reaped at teardown, so a failing test leaves nothing behind."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def victim(self, size_mib: int) -> subprocess.Popen[str]:
        """A Python child that has touched ``size_mib`` MiB of anonymous memory when this returns."""
        p = subprocess.Popen(
            [sys.executable, "-c", VICTIM_CODE, str(size_mib)], stdout=subprocess.PIPE, text=True
        )
        self.procs.append(p)
        assert p.stdout is not None
        line = p.stdout.readline()
        assert line.strip() == "ready", f"victim did not start: {line!r}"
        return p

    def sleeper(self) -> subprocess.Popen[str]:
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"], text=True)
        self.procs.append(p)
        return p

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()


@pytest.fixture(scope="session", autouse=True)
def own_runtime_dir() -> Iterator[Path]:
    """Every lmkd-py the tests start (they inherit the environment) keeps its instance lock and status in
    a directory of this test session, not /run/lmkd-py: a daemon of another session on the same machine
    (or a real service) would otherwise refuse the tests' daemons ("another lmkd-py already runs here"),
    as it did once on this shared machine. Tests about the lock itself set their own directory."""
    if os.environ.get("LMKD_PY_RUNTIME_DIR"):
        yield Path(os.environ["LMKD_PY_RUNTIME_DIR"])
        return
    d = Path(tempfile.mkdtemp(prefix="lmkd-py-test-run-"))
    os.environ["LMKD_PY_RUNTIME_DIR"] = str(d)
    try:
        yield d
    finally:
        os.environ.pop("LMKD_PY_RUNTIME_DIR", None)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def children() -> Iterator[Children]:
    c = Children()
    try:
        yield c
    finally:
        c.cleanup()


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (cgroups, tracefs, other users' processes)")


NOBODY = 65534
NOBODY_MODULES = ("lmkd_py", "pydantic", "pydantic_core", "structlog", "typing_extensions", "annotated_types", "re2",
                  "typing_inspection")


@pytest.fixture(scope="session")
def nobody_python() -> Iterator[tuple[list[str], dict[str, str]]]:
    """A command prefix and environment that run lmkd-py as ``nobody`` wherever the checkout lives.

    The venv sits inside the checkout, which ``nobody`` may not be able to reach (CI clones into a folder
    of its choosing; root's home is 0700 here). So lmkd-py and its runtime dependencies are copied into
    a world-readable directory and run with the system interpreter, which every user can execute."""
    import importlib.util

    base = Path(tempfile.mkdtemp(prefix="lmkd-py-nobody-"))
    try:
        for name in NOBODY_MODULES:
            spec = importlib.util.find_spec(name)
            assert spec is not None and spec.origin is not None, f"{name} is not installed"
            origin = Path(spec.origin)
            if origin.name == "__init__.py":
                shutil.copytree(origin.parent, base / origin.parent.name,
                                ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(origin, base / origin.name)
        for root, _dirs, files in os.walk(base):
            os.chmod(root, 0o755)
            for f in files:
                os.chmod(os.path.join(root, f), 0o644)
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(base), "PYTHONDONTWRITEBYTECODE": "1"}
        yield [SYSTEM_PYTHON, "-m", "lmkd_py.cli"], env
    finally:
        shutil.rmtree(base, ignore_errors=True)


SYSTEM_PYTHON = "/usr/bin/python3"


def our_tracefs_instances(root: Path) -> set[str]:
    """lmkd-py tracefs instances of this test process or of a process that is gone. Instances of other
    live processes (another lmkd-py running on this machine) are theirs: never touched."""
    import re

    out = set()
    for p in (root / "instances").iterdir():
        m = re.fullmatch(r"lmkd-py-(\d+)(?:-.*)?", p.name)
        if m and (int(m.group(1)) == os.getpid() or not Path(f"/proc/{m.group(1)}").exists()):
            out.add(p.name)
    return out


@pytest.fixture(scope="module")
def tracefs_root() -> Iterator[Path]:
    """The tracefs mount for tests that trace; mounted at the first default place when nothing is mounted,
    and unmounted afterwards unless someone else has an instance in it by then. Skips where tracefs cannot
    be mounted."""
    from lmkd_py.tracing import DEFAULT_ROOTS

    for root in DEFAULT_ROOTS:
        if (root / "instances").is_dir():
            yield root
            return
    root = DEFAULT_ROOTS[0]
    out = subprocess.run(["mount", "-t", "tracefs", "nodev", str(root)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"tracefs is not mounted and cannot be mounted here: {out.stderr.strip()}")
    try:
        yield root
    finally:
        if (root / "instances").is_dir() and not any((root / "instances").iterdir()):
            subprocess.run(["umount", str(root)], capture_output=True)


def check_no_instance_left(root: Path) -> Iterator[None]:
    """Body of an autouse fixture: fails a test that leaves an lmkd-py instance behind, and removes it
    so the machine stays clean even then."""
    before = our_tracefs_instances(root)
    yield
    left = our_tracefs_instances(root) - before
    for name in left:
        (root / "instances" / name).rmdir()
    assert not left, f"tracefs instances left behind: {left}"
