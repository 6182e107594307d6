"""The layering of lmkd_py, written down as contracts and checked on the source (issue 17 item 5).

Each room (a flat module, or a package taken whole) lists the rooms it may import at run time; imports
under ``if TYPE_CHECKING:`` are for types only and do not count. The allowed graph itself must be
acyclic, so no module can import a higher layer. A package is entered only through its ``__init__``:
no module outside ``lmkd_py.tracing`` imports ``lmkd_py.tracing.raw``, and so on. Observe mode may not
import anything of kill mode. Plain ``ast``: no dependency, and the message names file and line.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "lmkd_py"
PACKAGES = {"tracing", "observe", "report", "stress", "lab", "shape"}
KILL_MODE = {"daemon", "killer", "candidates", "service", "policy", "psi", "protect"}

# room -> rooms it may import at run time ("lmkd_py" is the package root: __version__).
ALLOWED: dict[str, set[str]] = {
    "lmkd_py": set(),
    "patterns": set(),  # the one room that imports re2
    "config": {"lean", "patterns", "plain"},
    "log": {"journal", "text"},
    "journal": set(),  # journald: priority prefixes, kill entries over the native protocol; stdlib only
    "syscalls": set(),
    "sdnotify": set(),
    "procfs": set(),
    "text": set(),  # printable(): text from processes and record files made safe to show
    "lean": set(),  # what the long-running processes do not load (asyncio behind structlog)
    "plain": set(),  # dataclasses as JSON builtins: the records writer and the config digest
    "safepath": set(),  # open a directory only root or we can have changed (the records writer)
    "records": {"plain", "safepath", "text"},
    "metrics": {"lmkd_py", "safepath"},  # the node_exporter textfile; stdlib only (daemon's resident memory)
    "provenance": {"lmkd_py", "lean", "records"},
    "status": {"text"},  # the status file the daemon keeps and lmkd-py status reads
    "psi": {"config", "procfs"},
    "policy": {"config", "patterns", "procfs"},
    "protect": {"config", "procfs", "syscalls"},
    "tracing": {"procfs", "records"},
    "candidates": {"policy", "procfs"},
    "reaper": {"syscalls"},
    "killer": {"config", "procfs", "reaper", "records", "syscalls"},
    "signals": {"config", "procfs", "psi"},
    "headroom": {"config", "procfs", "psi", "reasons", "signals"},
    "reasons": {"config", "procfs", "psi", "signals"},
    "builder": {"config", "headroom", "killer", "policy", "procfs", "provenance", "psi", "reasons", "signals",
                "syscalls", "tracing"},
    "daemon": {"builder", "candidates", "config", "journal", "killer", "metrics", "policy", "procfs", "psi",
               "records", "sdnotify", "status"},
    "observe": {"lmkd_py", "config", "journal", "log", "metrics", "procfs", "provenance", "records", "sdnotify",
                "status", "tracing"},
    "service": {"config", "daemon", "journal", "log", "observe", "procfs", "protect", "records", "sdnotify",
                "status", "syscalls", "tracing"},
    "tools": {"config", "killer", "log", "procfs", "provenance", "records", "syscalls", "text", "tracing"},
    "shape": {"lmkd_py", "procfs"},  # capture, plan and compare memory shapes; stdlib only
    "stress": {"log", "shape"},
    "report": {"records", "text"},
    # The lab's in-guest program runs one kill at a time with the killer itself (no daemon).
    "lab": {"lmkd_py", "killer", "reaper", "log", "procfs", "provenance", "records", "report", "shape", "stress",
            "syscalls", "tracing"},
    "cli": {"lmkd_py", "config", "lab", "lean", "observe", "report", "service", "shape", "status", "stress", "tools"},
}


def room_of(module: str) -> str:
    """'lmkd_py.tracing.raw' -> 'tracing'; 'lmkd_py.killer' -> 'killer'; 'lmkd_py' -> 'lmkd_py'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "lmkd_py"


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports(path: Path, here: str | None = None) -> Iterator[tuple[int, str]]:
    """(line, imported lmkd_py module) for every run-time import in a file, nested ones included;
    ``here`` is the file's module name (derived from its place in lmkd_py/ by default)."""
    tree = ast.parse(path.read_text(), str(path))
    typing_only = _type_checking_lines(tree)
    here = here or module_name(path)
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(tree):
        if node.lineno in typing_only if hasattr(node, "lineno") else False:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "lmkd_py":
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = here.split(".") if is_pkg else here.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                if not node.module:  # `from . import x` names modules
                    for alias in node.names:
                        yield node.lineno, ".".join([*base, alias.name])
                    continue
                mod = ".".join([*base, node.module])
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "lmkd_py":
                continue
            if mod == "lmkd_py":  # `from lmkd_py import log` names modules
                for alias in node.names:
                    sub = f"lmkd_py.{alias.name}"
                    is_module = (PKG / f"{alias.name}.py").exists() or (PKG / alias.name).is_dir()
                    yield node.lineno, sub if is_module else mod
            else:
                yield node.lineno, mod


SOURCES = sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_room_is_listed() -> None:
    rooms = {room_of(module_name(p)) for p in SOURCES}
    assert rooms <= ALLOWED.keys(), f"rooms without a contract: {sorted(rooms - ALLOWED.keys())}"


def test_the_allowed_graph_is_acyclic() -> None:
    state: dict[str, int] = {}

    def visit(room: str, path: list[str]) -> None:
        if state.get(room) == 1:
            raise AssertionError(f"cycle in the contracts: {' -> '.join([*path, room])}")
        if state.get(room) == 2:
            return
        state[room] = 1
        for dep in sorted(ALLOWED[room]):
            visit(dep, [*path, room])
        state[room] = 2

    for room in ALLOWED:
        visit(room, [])


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_follow_the_contracts(path: Path) -> None:
    here = module_name(path)
    mine = room_of(here)
    bad = []
    for line, target in imports(path):
        theirs = room_of(target)
        where = f"{path.relative_to(PKG.parent)}:{line}"
        if theirs != mine and theirs not in ALLOWED[mine]:
            bad.append(f"{where}: {mine} may not import {target}")
        if theirs in PACKAGES and theirs != mine and target != f"lmkd_py.{theirs}":
            bad.append(f"{where}: enter {theirs} through its face (lmkd_py.{theirs}), not {target}")
        if mine == "observe" and theirs in KILL_MODE:
            bad.append(f"{where}: observe mode may not import kill mode ({target})")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The check itself can fail: a planted import of a private module and of a higher layer."""
    probe = tmp_path / "probe.py"
    probe.write_text("from typing import TYPE_CHECKING\nfrom lmkd_py.tracing.raw import RawInstance\n"
                     "from . import track\nif TYPE_CHECKING:\n    from lmkd_py.daemon import Daemon\n"
                     "def f():\n    from lmkd_py.daemon import build\n")
    found = [t for _, t in imports(probe, here="lmkd_py.observe.probe")]
    assert found == ["lmkd_py.tracing.raw", "lmkd_py.observe.track", "lmkd_py.daemon"]
    assert "daemon" not in ALLOWED["observe"]
