"""A records file on a real, tiny tmpfs: the disk fills, records are dropped and counted without
damaging what is already written, and writing resumes when space returns."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmkd_py.records import RecordWriter, iter_records
from tests.conftest import needs_root
from tests.unit.test_records import make

pytestmark = needs_root


@pytest.fixture
def tiny_fs() -> Iterator[Path]:
    mnt = Path(tempfile.mkdtemp(prefix="lmkd-py-tinyfs-"))
    # mode=0700: a tmpfs root is 1777 by default, and the writer refuses a directory others may write.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24k,mode=0700", "lmkd-py-test", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        mnt.rmdir()


def test_full_disk_drops_counts_and_resumes(tiny_fs: Path) -> None:
    path = tiny_fs / "records.jsonl"
    w = RecordWriter(path, max_bytes=1 << 20)
    i = 0
    while w.write(make(i)):
        i += 1
        assert i < 1000, "tmpfs never filled"
    written = i
    assert written > 3 and w.stats.dropped == 1 and "No space" in (w.stats.last_error or "")
    for j in range(5):
        assert not w.write(make(1000 + j))
    assert w.stats.dropped == 6
    # nothing already written was lost or damaged: every line parses, none is half written
    problems: list[str] = []
    assert [r.record_id for r in iter_records(path, problems)] == [f"r{k}" for k in range(written)]
    assert problems == []
    # space comes back (an operator archives the file) -> writing resumes
    path.unlink()
    assert w.write(make(2000))
    assert [r.record_id for r in iter_records(path)] == ["r2000"]
