from __future__ import annotations

import json
from pathlib import Path

from lmkd_py.records import (
    SCHEMA_VERSION,
    KillRecord,
    Mrelease,
    MreleaseStatus,
    Outcome,
    RecordWriter,
    Steps,
    Victim,
    iter_records,
    read_records,
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
    lines = [make(0).model_dump_json(), "{not json", json.dumps({"hello": 1}), make(1).model_dump_json()]
    path.write_text("\n".join(lines) + "\n")
    got = read_records([path])
    assert [r.record_id for r in got.records] == ["r0", "r1"]
    assert len(got.problems) == 2
    assert any(":2:" in p for p in got.problems) and any(":3:" in p and "schema_version" in p for p in got.problems)


def test_newer_schema_is_skipped_and_named_not_misread(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    obj = json.loads(make(0).model_dump_json())
    obj["schema_version"] = SCHEMA_VERSION + 1
    path.write_text(make(1).model_dump_json() + "\n" + json.dumps(obj) + "\n" + make(2).model_dump_json() + "\n")
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
