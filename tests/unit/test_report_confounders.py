"""compare names the settings its two sides differ in; report groups by one on request; a hostile
confounder value cannot break or garble either."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("numpy", reason="the report extra (numpy) is not installed")
pytest.importorskip("scipy", reason="the report extra (scipy) is not installed")

from lmkd_py import report
from lmkd_py.cli import CONFOUNDER_NAMES
from lmkd_py.records import Confounders, Provenance, Setting
from tests.unit.test_report import rec, run_compare, write


def _prov(kernel: str, **settings: str | None) -> Provenance:
    base = {"page_size": "4096", "swappiness": "60", "thp_enabled": "madvise", "cpu_count": "4"}
    base.update(settings)
    cf = Confounders(**{k: Setting(value=v) if v is not None else Setting(unreadable="gone")
                        for k, v in base.items()})
    return Provenance(kernel_release=kernel, machine_model="board", confounders=cf)


def _side(path: Path, kernel: str, n: int = 5, **settings: str | None) -> Path:
    return write(path, [rec(provenance=_prov(kernel, **settings), wall_ns=10_000_000 + i) for i in range(n)])


def test_cli_names_every_confounder_the_records_carry() -> None:
    assert tuple(f.name for f in dataclasses.fields(Confounders)) == CONFOUNDER_NAMES


def test_compare_warns_naming_the_setting_and_both_values(tmp_path: Path) -> None:
    a = _side(tmp_path / "a.jsonl", "6.12", swappiness="60")
    b = _side(tmp_path / "b.jsonl", "7.3", swappiness="100")
    rc, out, _err = run_compare(a=[a], b=[b], format="json")
    assert rc == 0
    warnings = json.loads(out)["warnings"]
    hits = [w for w in warnings if "swappiness" in w]
    assert len(hits) == 1 and "'60'" in hits[0] and "'100'" in hits[0]
    assert not [w for w in warnings if "thp_enabled" in w or "page_size" in w]  # held equal: no warning
    rc, text, _ = run_compare(a=[a], b=[b], format="table")
    assert "confounder swappiness differs" in text


def test_compare_says_when_one_side_cannot_be_checked(tmp_path: Path) -> None:
    a = _side(tmp_path / "a.jsonl", "6.12")
    b = write(tmp_path / "b.jsonl", [rec(kernel_release="7.3") for _ in range(5)])  # older records
    _rc, out, _ = run_compare(a=[a], b=[b], format="json")
    assert any("5 of 5 records carry no confounders" in w for w in json.loads(out)["warnings"])
    # Two sets of old records alone: nothing to say about settings.
    _rc, out, _ = run_compare(a=[b], b=[b], format="json")
    assert not any("confounder" in w for w in json.loads(out)["warnings"])


def test_an_unknown_value_is_not_a_difference(tmp_path: Path) -> None:
    a = _side(tmp_path / "a.jsonl", "6.12", lru_gen="0x0007")
    b = _side(tmp_path / "b.jsonl", "7.3", lru_gen=None)  # unreadable on B
    _rc, out, _ = run_compare(a=[a], b=[b], format="json")
    assert not any("lru_gen" in w for w in json.loads(out)["warnings"])


def _report(files: list[Path], fmt: str, group_by: str | None) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = report.cmd_report(argparse.Namespace(files=files, format=fmt, plots=None, group_by=group_by), out=out, err=err)
    return rc, out.getvalue()


def test_report_groups_by_a_setting_on_request(tmp_path: Path) -> None:
    f = tmp_path / "all.jsonl"
    lines: list[Any] = [rec(provenance=_prov("6.12", thp_enabled=v)) for v in ("always", "never", "never")]
    write(f, lines)
    rc, out = _report([f], "json", None)
    assert rc == 0 and len(json.loads(out)["groups"]) == 1
    rc, out = _report([f], "json", "thp_enabled")
    groups = json.loads(out)["groups"]
    assert [(g["setting"], g["records"]) for g in groups] == [
        ({"name": "thp_enabled", "value": "always"}, 1), ({"name": "thp_enabled", "value": "never"}, 2)]
    _rc, text = _report([f], "table", "thp_enabled")
    assert "thp_enabled always" in text and "thp_enabled never" in text


def test_a_hostile_confounder_value_neither_breaks_nor_garbles(tmp_path: Path) -> None:
    evil = "\x1b]0;owned\x07\x1b[2J\n# forged line\u202e" + "x" * 200_000
    a = _side(tmp_path / "a.jsonl", "6.12", kernel_cmdline=evil)
    b = _side(tmp_path / "b.jsonl", "7.3", kernel_cmdline="quiet")
    for fmt in ("table", "markdown", "json"):
        rc, out, _err = run_compare(a=[a], b=[b], format=fmt)
        assert rc == 0
        assert "\x1b" not in out and "\u202e" not in out and "\x07" not in out
        assert "\n# forged line" not in out
        assert len(out) < 50_000
        rc, text = _report([a], fmt, "kernel_cmdline")
        assert rc == 0 and "\x1b" not in text and "\u202e" not in text and "\n# forged line" not in text
        assert len(text) < 50_000
