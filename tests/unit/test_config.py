from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lmkd_py.config import Config, ConfigError, load_config, load_config_isolated, parse_config

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "config" / "lmkd-py.toml"


def field_types(model: type) -> dict[str, Any]:
    """The config dataclass' fields and their resolved types, in declaration order."""
    hints = typing.get_type_hints(model)
    return {f.name: hints[f.name] for f in dataclasses.fields(model)}


def test_shipped_file_is_the_defaults_and_documents_every_knob() -> None:
    assert load_config(DEFAULT) == Config()
    text = DEFAULT.read_text()

    def keys(model: type, prefix: str = "") -> list[str]:
        out = []
        for name, ann in field_types(model).items():
            if dataclasses.is_dataclass(ann):
                out += keys(ann, f"{prefix}{name}.")
            else:
                out.append(name)
        return out

    missing = [k for k in keys(Config) if k not in text]
    assert not missing, f"knobs not documented in {DEFAULT.name}: {missing}"


@pytest.mark.parametrize(
    ("toml", "culprit"),
    [
        ("dry_rum = true", "dry_rum: unknown key"),
        ("[kill]\nexit_timeout_ms = -5", "kill.exit_timeout_ms"),
        ("[kill]\nmrelease = 'perhaps'", "kill.mrelease"),
        ("[records]\nmax_bytes = 10", "records.max_bytes"),
        ("[policy]\nprotect_comm = ['(']", "policy.protect_comm"),
        ("[[pressure.levels]]\nname='x'\nstall='some'\nthreshold_us=3000000\nwindow_us=2000000\nmin_oom_score_adj=0",
         "pressure.levels.0"),
        ("[[pressure.levels]]\nname='x'\nstall='most'\nthreshold_us=1\nwindow_us=2000000\nmin_oom_score_adj=0",
         "pressure.levels.0.stall"),
        ("[pressure]\nwindow_us = 1", "pressure.window_us: unknown key"),
        ("tracing = 'maybe'", "tracing"),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, toml: str, culprit: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError, match=culprit.replace(".", r"\.").replace("(", r"\(")):
        load_config(f)
    out = subprocess.run([sys.executable, "-m", "lmkd_py.cli", "check-config", str(f)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert culprit.split(":")[0] in out.stderr and str(f) in out.stderr


def test_check_config_ok_and_schema() -> None:
    out = subprocess.run([sys.executable, "-m", "lmkd_py.cli", "check-config", str(DEFAULT)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "OK" in out.stdout
    out = subprocess.run([sys.executable, "-m", "lmkd_py.cli", "config-schema"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0
    import json

    schema = json.loads(out.stdout)
    assert "kill" in schema["properties"] and "$defs" in schema
    assert schema["$defs"]["KillConfig"]["properties"]["exit_timeout_ms"]["description"]


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(Path("/nonexistent/lmkd.toml"))


def test_protect_exe_entries(tmp_path: Path) -> None:
    from lmkd_py.config import ExeIdentity

    f = tmp_path / "c.toml"
    f.write_text('[policy]\nprotect_exe = [{ path = "/usr/sbin/sshd", uid = 0 }, { path = "/opt/db/", uid = 112 }]\n')
    assert load_config(f).policy.protect_exe == (ExeIdentity(path="/usr/sbin/sshd", uid=0),
                                                 ExeIdentity(path="/opt/db/", uid=112))


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ('"/usr/sbin/sshd"', "policy.protect_exe.0"),  # a bare path: the uid is required
        ('{ path = "/usr/sbin/sshd" }', "policy.protect_exe.0.uid: Field required"),
        ('{ path = "usr/sbin/sshd", uid = 0 }', "not an absolute path"),
        ('{ path = "/usr/sbin/ssh*", uid = 0 }', "globs are not supported"),
        ('{ path = "/usr//sbin/sshd", uid = 0 }', "not canonical"),
        ('{ path = "/usr/sbin/../bin/x", uid = 0 }', "not canonical"),
        ('{ path = "/usr/sbin/sshd", uid = -1 }', "policy.protect_exe.0.uid"),
        ('{ path = "/usr/sbin/sshd", uid = "0" }', "policy.protect_exe.0.uid"),
        ('{ path = "/usr/sbin/sshd", uid = 0, comm = "sshd" }', "unknown key"),
    ],
)
def test_bad_protect_exe_is_named(tmp_path: Path, entry: str, why: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(f"[policy]\nprotect_exe = [{entry}]\n")
    with pytest.raises(ConfigError, match=re.escape(why)):
        load_config(f)


BOOL_KEYS = ["dry_run", "kill.mrelease", "kill.recheck_pressure", "records.fsync", "self_protection.mlockall",
             "observe.trace_mrelease", "signals.cgroup_headroom", "signals.lmkd_reasons"]


def _nest(dotted: str, value: object) -> dict[str, object]:
    *tables, key = dotted.split(".")
    doc: dict[str, object] = {key: value}
    for t in reversed(tables):
        doc = {t: doc}
    return doc


def test_every_bool_field_is_listed() -> None:
    def bools(model: type, prefix: str = "") -> list[str]:
        out = []
        for name, ann in field_types(model).items():
            if ann is bool:
                out.append(prefix + name)
            elif dataclasses.is_dataclass(ann):
                out += bools(ann, f"{prefix}{name}.")
        return out

    assert sorted(bools(Config)) == sorted(BOOL_KEYS)


@pytest.mark.parametrize("key", BOOL_KEYS)
@pytest.mark.parametrize("value", ["off", "on", "yes", "no", "true", "false", 0, 1, 0.0, "1"])
def test_booleans_are_true_or_false_only(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=re.escape(key) + ": Input should be a valid boolean"):
        parse_config(_nest(key, value))
    assert parse_config(_nest(key, True)) is not None and parse_config(_nest(key, False)) is not None


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.integers(), st.floats(allow_nan=True), st.text(max_size=8), st.lists(st.booleans(), max_size=2)))
def test_no_non_boolean_passes_for_a_boolean(value: object) -> None:
    with pytest.raises(ConfigError, match=r"kill\.mrelease"):
        parse_config({"kill": {"mrelease": value}})


@pytest.mark.parametrize(
    ("toml", "culprit"),
    [
        ("[kill]\nmax_attempts = '3'", "kill.max_attempts"),
        ("[kill]\nmax_attempts = true", "kill.max_attempts"),
        ("[kill]\nmax_attempts = 3.0", "kill.max_attempts"),
        ("[pressure]\nmem_floor_pct = '5'", "pressure.mem_floor_pct"),
        ("[pressure]\nmem_floor_pct = true", "pressure.mem_floor_pct"),
        ("[policy]\nprotect_uid = ['0']", "policy.protect_uid.0"),
        ("[policy]\nprotect_uid = [true]", "policy.protect_uid.0"),
        ("[policy]\nprotect_comm = [1]", "policy.protect_comm.0"),
    ],
)
def test_numbers_and_strings_are_not_coerced(tmp_path: Path, toml: str, culprit: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError, match=re.escape(culprit)):
        load_config(f)


def test_lists_paths_and_ints_for_floats_still_load(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[pressure]\ncgroup = '/sys/fs/cgroup/unified/x'\nmem_floor_pct = 7\n"
                 "[records]\npath = '/tmp/r.jsonl'\n[policy]\nprotect_uid = [0, 42]\n")
    cfg = load_config(f)
    assert cfg.pressure.cgroup == Path("/sys/fs/cgroup/unified/x") and cfg.pressure.mem_floor_pct == 7.0
    assert cfg.records.path == Path("/tmp/r.jsonl") and cfg.policy.protect_uid == (0, 42)


@pytest.mark.parametrize(
    ("value", "expected"), [("0", None), ("0.0", None), ("0.1", 0.1), ("5", 5.0), ("50", 50.0)]
)
def test_mem_floor_zero_turns_it_off(tmp_path: Path, value: str, expected: float | None) -> None:
    f = tmp_path / "c.toml"
    f.write_text(f"[pressure]\nmem_floor_pct = {value}\n")
    assert load_config(f).pressure.mem_floor_pct == expected


@pytest.mark.parametrize("value", ["0.05", "-1", "50.5"])
def test_mem_floor_between_off_and_the_minimum_is_refused(tmp_path: Path, value: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(f"[pressure]\nmem_floor_pct = {value}\n")
    with pytest.raises(ConfigError, match=r"pressure\.mem_floor_pct"):
        load_config(f)


def test_mem_floor_off_reaches_the_daemon() -> None:
    """0 in the file means no floor check in the daemon's source (polling /proc/pressure/memory)."""
    from lmkd_py.builder import Builder
    from lmkd_py.procfs import ProcFs
    from lmkd_py.signals import FloorCheck

    for pct, floor in ((0, False), (5, True)):
        cfg = parse_config({"pressure": {"source": "poll", "mem_floor_pct": pct}, "signals": {"lmkd_reasons": False}})
        src = Builder(ProcFs(), None).source(cfg)
        try:
            assert any(isinstance(c, FloorCheck) for c in getattr(src, "checks", [])) is floor
        finally:
            src.close()


def test_kill_waits_must_fit_the_watchdog(tmp_path: Path) -> None:
    from lmkd_py.config import KILL_BUDGET_MS, KillConfig

    d = KillConfig()
    assert d.max_attempts * d.exit_timeout_ms + d.mem_recovery_timeout_ms <= KILL_BUDGET_MS == 12_000
    assert parse_config({"kill": {"max_attempts": 2, "exit_timeout_ms": 5000, "mem_recovery_timeout_ms": 2000}})
    f = tmp_path / "c.toml"
    f.write_text("[kill]\nexit_timeout_ms = 5000\nmax_attempts = 3\nmem_recovery_timeout_ms = 2000\n")
    with pytest.raises(ConfigError, match=r"kill: .*max_attempts 3 x exit_timeout_ms 5000 \+ "
                                          r"mem_recovery_timeout_ms 2000 = 17000 ms.*WatchdogSec=30s"):
        load_config(f)
    out = subprocess.run([sys.executable, "-m", "lmkd_py.cli", "check-config", str(f)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "kill:" in out.stderr and "17000 ms" in out.stderr


def test_watchdog_constant_matches_the_unit_file() -> None:
    from lmkd_py.config import WATCHDOG_SEC

    unit = (ROOT / "systemd" / "lmkd-py.service").read_text()
    (line,) = [ln for ln in unit.splitlines() if ln.startswith("WatchdogSec=")]
    assert line == f"WatchdogSec={WATCHDOG_SEC}s"


# -- the daemon's loader: validated in a child, so pydantic never loads into the daemon (issue 13) --------

ISOLATED_TOML = """
dry_run = true
[pressure]
cgroup = "/sys/fs/cgroup/unified/x"
mem_floor_pct = 0
[policy]
protect_exe = [{path = "/usr/sbin/sshd", uid = 0}]
protect_cmdline = ["--keep$"]
[kill]
exit_timeout_ms = 2500
"""


def test_isolated_loader_gives_what_the_in_process_one_gives(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(ISOLATED_TOML)
    got = load_config_isolated(f)
    assert got == load_config(f)
    assert got.pressure.cgroup == Path("/sys/fs/cgroup/unified/x") and got.pressure.mem_floor_pct is None
    assert isinstance(got.policy.protect_exe, tuple) and got.digest() == load_config(f).digest()
    assert load_config_isolated(None) == Config()


@pytest.mark.parametrize(
    "toml", ["[kill]\nexit_timeout_ms = 'x'", "dry_rum = true", "[[", "[policy]\nprotect_comm = ['(a']"]
)
def test_isolated_loader_names_the_same_culprit(tmp_path: Path, toml: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError) as direct:
        load_config(f)
    with pytest.raises(ConfigError) as isolated:
        load_config_isolated(f)
    assert str(isolated.value) == str(direct.value)


def test_isolated_loader_keeps_pydantic_out_of_the_caller(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(ISOLATED_TOML)
    code = (f"from pathlib import Path\nimport sys\nfrom lmkd_py.config import load_config_isolated\n"
            f"cfg = load_config_isolated(Path({str(f)!r}))\nassert cfg.kill.exit_timeout_ms == 2500\n"
            "print(sorted(m for m in sys.modules if m.startswith(('pydantic', 'hashlib'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    # Not re2: the config has patterns, which lean_parse compiles as the validator does (PolicyConfig's
    # rule), and which the daemon compiles anyway when it builds its Rules.
    assert out.stdout.strip() == "[]"


def test_the_validators_answer_can_hold_only_config_classes() -> None:
    import io
    import os
    import pickle

    from lmkd_py.config import _ConfigUnpickler

    with pytest.raises(pickle.UnpicklingError, match=r"posix\.system is not part of a config"):
        _ConfigUnpickler(io.BytesIO(pickle.dumps(os.system))).load()
    assert _ConfigUnpickler(io.BytesIO(pickle.dumps(Config()))).load() == Config()


def test_config_hash_is_the_hash_pydantic_would_give() -> None:
    # Field records carry config_hash. It was the sha256 of pydantic's model_dump_json when the config was
    # a pydantic model; the stdlib writer must produce the very same JSON, so that a config keeps its hash.
    import hashlib

    from lmkd_py.config import _adapter

    cfg = parse_config({"pressure": {"cgroup": "/sys/fs/cgroup/x", "mem_floor_pct": 2.5},
                        "policy": {"protect_exe": [{"path": "/usr/sbin/sshd", "uid": 0}],
                                   "protect_comm": ["sshd", "é"]},
                        "kill": {"mem_recovery_fraction": 0.75}, "metrics": {"textfile": "/x/m.prom"}})
    for c in (Config(), cfg):
        assert c.digest() == hashlib.sha256(_adapter().dump_json(c)).hexdigest()[:16]


# -- an ordinary file needs no validator: lean_parse (start-up, issue 13) --------------------------------

def _default_doc() -> dict[str, Any]:
    """The defaults as a TOML document would write them (no nulls: TOML has none)."""
    from lmkd_py.plain import plain as _plain

    def strip(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if x is not None}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v

    out: dict[str, Any] = strip(_plain(Config()))
    return out


_leaf = st.one_of(st.booleans(), st.integers(-5, 2_000_000), st.floats(-1, 100, allow_nan=False),
                  st.sampled_from(["auto", "some", "full", "kill", "x", "medium"]), st.just([]))


def test_the_shipped_file_and_an_ordinary_one_need_no_validator(tmp_path: Path) -> None:
    import tomllib

    from lmkd_py.config import PendingConfig, lean_parse

    assert lean_parse(tomllib.loads(DEFAULT.read_text())) == Config()
    assert lean_parse({}) == Config() and lean_parse(_default_doc()) == Config()
    doc = tomllib.loads(ISOLATED_TOML)
    lean = lean_parse(doc)
    assert lean is not None and lean == parse_config(doc) and lean.digest() == parse_config(doc).digest()
    f = tmp_path / "c.toml"
    f.write_text(ISOLATED_TOML)
    pending = PendingConfig(f)
    assert pending._proc is None and pending.result() == load_config(f)  # no child process started
    f.write_text("[kill]\nexit_timeout_ms = 'x'")
    pending = PendingConfig(f)
    assert pending._proc is not None  # a bad file goes to the validator, which names the key
    with pytest.raises(ConfigError, match=r"kill\.exit_timeout_ms: Input should be a valid integer"):
        pending.result()


_wide_leaf = st.one_of(_leaf, st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
                       st.sampled_from(["", "/x/m.prom", "/sys/fs/cgroup/a", "rel/path", "/usr/sbin/", "(a", "x*"]),
                       st.lists(st.sampled_from(["sshd", "a.*", "(b", ""]), max_size=3),
                       st.lists(st.integers(-1, 70000), max_size=3),
                       # fresh objects each draw: a later mutation must not change an earlier example
                       st.builds(lambda: [{"path": "/usr/sbin/sshd", "uid": 0}]),
                       st.builds(lambda: {"path": "/bin/", "uid": 1}), st.builds(dict))


@st.composite
def mutated_documents(draw: st.DrawFn, leaf: st.SearchStrategy[Any] = _wide_leaf, edits: int = 4,
                      added: tuple[str, ...] = ("extra", "dry_rum", "name", "window_us", "cgroup", "textfile"),
                      ) -> dict[str, Any]:
    """The defaults' document with up to ``edits`` keys dropped, replaced or added, anywhere in it."""
    doc = _default_doc()
    for _ in range(draw(st.integers(0, edits))):
        node: Any = doc
        while True:  # walk down to a random table or array
            keys = list(node.keys()) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            k = draw(st.sampled_from(keys))
            child = node[k]
            if isinstance(child, dict | list) and child and draw(st.booleans()):
                node = child
                continue
            action = draw(st.sampled_from(["drop", "replace", "replace", "add"]))
            if action == "drop" and isinstance(node, dict):
                del node[k]
            elif action == "add" and isinstance(node, dict):
                node[draw(st.sampled_from(added))] = draw(leaf)
            else:
                node[k] = draw(leaf)
            break
    return doc


@settings(max_examples=600, deadline=None)
@example({"pressure": {"mem_floor_min_oom_score_adj": False}})
@example({"kill": {"mem_recovery_fraction": 1}})
@example({"pressure": {"mem_floor_pct": 0}})
@example({"records": {"path": ""}})
@given(st.one_of(mutated_documents(_leaf, 3, ("extra", "dry_rum", "name", "window_us")), mutated_documents()))
def test_what_lean_parse_accepts_the_validator_reads_the_same(doc: dict[str, Any]) -> None:
    """Exactness: whatever lean_parse builds, the validator accepts too and builds an equal Config with the
    same digest (an int for a float field is a float in both, so the hash on records is the same)."""
    from lmkd_py.config import lean_parse

    lean = lean_parse(doc)
    if lean is None:
        return
    try:
        full = parse_config(doc)
    except ConfigError as exc:
        raise AssertionError(f"lean_parse accepted what the validator refuses: {exc}") from None
    assert lean == full and lean.digest() == full.digest()


@pytest.mark.parametrize(
    ("path", "value"),
    [(("dry_run",), 0), (("kill", "mrelease"), 1), (("kill", "exit_timeout_ms"), 3000.0),
     (("pressure", "mem_floor_min_oom_score_adj"), False),  # False == 0 in Python: strict validation refuses it
     (("candidates", "recheck_top"), True), (("nope",), 1), (("kill", "exit_timeout_ms"), 99),
     (("pressure", "mem_floor_pct"), 0.05), (("mode",), "Kill")],
)
def test_a_value_strict_validation_refuses_goes_to_the_validator(path: tuple[str, ...], value: object) -> None:
    from lmkd_py.config import lean_parse

    doc: dict[str, Any] = _default_doc()
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert lean_parse(doc) is None
    with pytest.raises(ConfigError):
        parse_config(doc)
