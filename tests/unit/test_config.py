from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from lmkd_py.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "config" / "lmkd-py.toml"


def test_shipped_file_is_the_defaults_and_documents_every_knob() -> None:
    assert load_config(DEFAULT) == Config()
    text = DEFAULT.read_text()

    def keys(model: type, prefix: str = "") -> list[str]:
        out = []
        for name, f in model.model_fields.items():  # type: ignore[attr-defined]
            ann = f.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
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
        ('{ path = "/usr/sbin/sshd", uid = 0, comm = "sshd" }', "unknown key"),
    ],
)
def test_bad_protect_exe_is_named(tmp_path: Path, entry: str, why: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(f"[policy]\nprotect_exe = [{entry}]\n")
    with pytest.raises(ConfigError, match=re.escape(why)):
        load_config(f)
