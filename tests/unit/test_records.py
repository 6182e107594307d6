from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import jsonschema
from hypothesis import given, settings
from hypothesis import strategies as st

from lmkd_py.records import (
    SCHEMA_VERSION,
    KillRecord,
    Mrelease,
    MreleaseStatus,
    Outcome,
    RecordWriter,
    Steps,
    Victim,
    adapter,
    iter_records,
    json_schema,
    read_records,
    record_json,
    validate_record,
)


def make(i: int = 0) -> KillRecord:
    return KillRecord(
        record_id=f"r{i}",
        wall_time="2026-11-26T00:00:00+00:00",
        outcome=Outcome.KILLED,
        victim=Victim(pid=100 + i, rss_kib=1000 * i),
        steps=Steps(start_ns=i, signal_sent_ns=i + 1, exit_observed_ns=i + 5, end_ns=i + 10),
        mrelease=Mrelease(status=MreleaseStatus.OK, ret=0, wall_ns=3),
        kill_to_exit_ns=4,
    )


def test_roundtrip_and_flush_per_record(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    w = RecordWriter(path)
    for i in range(3):
        assert w.write(make(i))
        # flushed per record: another reader sees it at once
        assert len(path.read_text().splitlines()) == i + 1
    got = read_records([path])
    assert [r.record_id for r in got.records] == ["r0", "r1", "r2"]
    assert got.problems == []
    assert got.records[1] == make(1)


def test_truncated_last_line_is_skipped_with_a_note(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    RecordWriter(path).write(make(0))
    RecordWriter(path).write(make(1))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20])  # cut the second line short, as a power loss would
    problems: list[str] = []
    recs = list(iter_records(path, problems))
    assert [r.record_id for r in recs] == ["r0"]
    assert len(problems) == 1 and ":2:" in problems[0] and "truncated" in problems[0]


def test_bad_middle_line_costs_only_itself(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    lines = [record_json(make(0)), "{not json", json.dumps({"hello": 1}), record_json(make(1))]
    path.write_text("\n".join(lines) + "\n")
    got = read_records([path])
    assert [r.record_id for r in got.records] == ["r0", "r1"]
    assert len(got.problems) == 2
    assert any(":2:" in p for p in got.problems) and any(":3:" in p and "schema_version" in p for p in got.problems)


def test_newer_schema_is_skipped_and_named_not_misread(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    obj = json.loads(record_json(make(0)))
    obj["schema_version"] = SCHEMA_VERSION + 1
    path.write_text(record_json(make(1)) + "\n" + json.dumps(obj) + "\n" + record_json(make(2)) + "\n")
    got = read_records([path])
    assert [r.record_id for r in got.records] == ["r1", "r2"]
    assert len(got.problems) == 1
    assert got.problems[0].startswith(f"{path}:2: skipped: record schema_version {SCHEMA_VERSION + 1} is newer")
    assert "upgrade lmkd-py" in got.problems[0]


def test_rotation_caps_the_disk_use(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    w = RecordWriter(path, max_bytes=4096, keep=2)
    n = 60
    for i in range(n):
        assert w.write(make(i))
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["r.jsonl", "r.jsonl.1", "r.jsonl.2"]
    assert all(f.stat().st_size <= 4096 for f in files)
    assert w.stats.rotations > 2
    # the newest records are kept, in order, across the files
    ids = [r.record_id for f in reversed(files) for r in iter_records(f)]
    assert ids == [f"r{i}" for i in range(n - len(ids), n)]


def test_unwritable_path_drops_and_counts_then_resumes(tmp_path: Path) -> None:
    blocker = tmp_path / "dir"
    blocker.write_text("a file where the directory should be")
    w = RecordWriter(blocker / "r.jsonl")
    assert not w.write(make(0))
    assert w.stats.dropped == 1 and "dir" in (w.stats.last_error or "")
    blocker.unlink()
    assert w.write(make(1))
    assert [r.record_id for r in iter_records(blocker / "r.jsonl")] == ["r1"]


# One definition, three uses (issue 13): the dataclasses the daemon writes with the stdlib are the ones
# the reader validates and the JSON Schema describes. These tests hold the three equal.
@settings(max_examples=150, deadline=None)
@given(st.from_type(KillRecord))
def test_writer_reader_and_schema_are_one_definition(rec: KillRecord) -> None:
    text = record_json(rec)
    obj = json.loads(text)
    # The stdlib writer says what pydantic's own serializer of the same class says...
    assert obj == json.loads(adapter().dump_json(rec))
    # ...the reader takes it back to the same record, and writing that again changes nothing...
    back = validate_record(obj)
    assert record_json(back) == text
    # ...and the published JSON Schema accepts it.
    jsonschema.validate(obj, json_schema())


def _fields_by_schema(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref") or next((a["$ref"] for a in node.get("anyOf", []) if "$ref" in a), None)
    return schema["$defs"][ref.rsplit("/", 1)[1]] if ref else node


def test_schema_lists_every_field_of_every_record_class() -> None:
    schema = json_schema()
    todo: list[tuple[type[Any], dict[str, Any]]] = [(KillRecord, schema)]
    seen: set[type[Any]] = set()
    while todo:
        cls, node = todo.pop()
        fields = {f.name: f for f in dataclasses.fields(cls)}
        assert set(node["properties"]) == set(fields), cls
        required = {n for n, f in fields.items()
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        assert set(node.get("required", [])) == required, cls
        for name in fields:
            hint = typing.get_type_hints(cls)[name]
            for arg in (hint, *typing.get_args(hint)):
                if dataclasses.is_dataclass(arg):
                    todo.append((arg, _fields_by_schema(schema, node["properties"][name])))  # type: ignore[arg-type]
        seen.add(cls)
    assert len(seen) == 10  # KillRecord and its nine parts


def test_writing_a_record_does_not_load_pydantic() -> None:
    """The daemon writes records; pydantic (~17 MiB resident with the schemas built) is for readers."""
    code = (
        "import sys, tempfile, pathlib\n"
        "from lmkd_py.records import RecordWriter, KillRecord, Victim, Steps, Mrelease, MreleaseStatus, Outcome\n"
        "d = pathlib.Path(tempfile.mkdtemp())\n"
        "w = RecordWriter(d / 'r.jsonl')\n"
        "assert w.write(KillRecord(record_id='x', wall_time='t', outcome=Outcome.KILLED, victim=Victim(pid=1),\n"
        "    steps=Steps(start_ns=0, end_ns=1), mrelease=Mrelease(status=MreleaseStatus.OK)))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pydantic', 'pydantic_core')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
