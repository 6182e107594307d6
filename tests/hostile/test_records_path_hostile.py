"""The records path as an attacker sets it up (issue 18, item 1): a root writer must never write through a
symlink at the records path, nor into (or below) a directory another user owns or may write.

Every directory an "attacker" owns here really belongs to ``nobody`` (os.chown), and where the attacker
acts (plants a symlink) it does so as ``nobody`` in a forked child, so the kernel's own rules
(fs.protected_symlinks, directory permissions) are part of what is tested.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lmkd_py.records import RecordsPathError, RecordWriter, iter_records
from lmkd_py.safepath import UntrustedPath, open_trusted_dir
from tests.conftest import NOBODY, Children, needs_root
from tests.unit.test_records import make

pytestmark = needs_root

SECRET = b"# a root-owned file the attacker wants appended to\n"


def as_nobody(fn: Callable[[], None]) -> None:
    """Run ``fn`` in a forked child as uid/gid nobody; fail the test when it fails."""
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            fn()
            code = 0
        except BaseException as exc:  # reported through the exit status: the child must reach _exit
            sys.stderr.write(f"as_nobody: {exc!r}\n")
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the nobody child failed (see stderr)"


@pytest.fixture
def attacker_dir() -> Iterator[Path]:
    """A directory under /tmp (root-owned, sticky: a trusted ancestor) that belongs to nobody."""
    d = Path(tempfile.mkdtemp(prefix="lmkd-py-attacker-"))
    try:
        os.chown(d, NOBODY, NOBODY)
        os.chmod(d, 0o755)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def target(tmp_path: Path) -> Path:
    """The root-owned file an attacker aims at (a shell startup file in the report)."""
    t = tmp_path / "bashrc"
    t.write_bytes(SECRET)
    return t


def test_symlink_at_the_records_path_is_refused_and_the_target_untouched(tmp_path: Path, target: Path) -> None:
    path = tmp_path / "records.jsonl"
    path.symlink_to(target)
    w = RecordWriter(path)
    with pytest.raises(RecordsPathError, match=r"records path .*records\.jsonl: it is a symlink") as err:
        w.check()
    assert err.value.insecure
    assert not w.write(make(0))
    assert w.stats.dropped == 1 and "symlink" in (w.stats.last_error or "")
    assert target.read_bytes() == SECRET
    assert path.is_symlink()


def test_dangling_symlink_at_the_records_path_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    path.symlink_to(tmp_path / "made-through-the-link")
    assert not RecordWriter(path).write(make(0))
    assert not (tmp_path / "made-through-the-link").exists()


def test_attacker_symlink_in_attacker_directory_via_the_cli(
    attacker_dir: Path, target: Path, children: Children
) -> None:
    """The report's attack end to end: nobody plants records.jsonl -> a root file in nobody's directory,
    root runs ``lmkd-py kill --records`` there. Refused before anything is killed, target untouched."""
    records = attacker_dir / "records.jsonl"
    as_nobody(lambda: os.symlink(target, records))
    assert records.is_symlink() and os.lstat(records).st_uid == NOBODY
    victim = children.sleeper()
    out = subprocess.run(
        [sys.executable, "-m", "lmkd_py.cli", "kill", "--records", str(records), str(victim.pid)],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2, out.stderr
    assert f"records path {records}" in out.stderr
    assert f"directory {attacker_dir} is owned by uid {NOBODY} (nobody)" in out.stderr
    assert "Traceback" not in out.stderr
    assert victim.poll() is None, "the kill went ahead although its record could not be kept"
    assert target.read_bytes() == SECRET


def test_attacker_owned_parent_is_refused_even_without_a_symlink(attacker_dir: Path) -> None:
    path = attacker_dir / "records.jsonl"
    w = RecordWriter(path)
    with pytest.raises(RecordsPathError, match=f"directory {attacker_dir} is owned by uid {NOBODY}"):
        w.check()
    assert not w.write(make(0))
    assert f"directory {attacker_dir} is owned by uid {NOBODY}" in (w.stats.last_error or "")
    assert list(attacker_dir.iterdir()) == []


def test_root_directory_below_an_attacker_directory_is_refused(attacker_dir: Path) -> None:
    """A root-owned 0755 parent is worth nothing when nobody may rename it away: the walk checks every
    component, and names the one that is wrong."""
    sub = attacker_dir / "sub"
    sub.mkdir(mode=0o755)
    w = RecordWriter(sub / "records.jsonl")
    with pytest.raises(RecordsPathError, match=f"directory {attacker_dir} is owned by uid {NOBODY}"):
        w.check()
    assert not w.write(make(0))
    assert list(sub.iterdir()) == []


def test_attacker_symlink_as_a_directory_is_not_followed(attacker_dir: Path, tmp_path: Path) -> None:
    """/tmp is sticky and root-owned, so it may lie above the records; a symlink nobody made in it is
    not followed (the kernel's fs.protected_symlinks rule, applied by the writer itself)."""
    real = tmp_path / "real"
    real.mkdir()
    link = Path(tempfile.gettempdir()) / f"lmkd-py-link-{os.getpid()}"
    try:
        as_nobody(lambda: os.symlink(real, link))
        w = RecordWriter(link / "records.jsonl")
        with pytest.raises(RecordsPathError, match=f"symlink {link} is owned by uid {NOBODY}"):
            w.check()
        assert not w.write(make(0)) and list(real.iterdir()) == []
    finally:
        link.unlink(missing_ok=True)


def test_a_symlink_root_made_on_the_way_is_followed(tmp_path: Path) -> None:
    """Like /var/run -> /run: a trusted symlink above the records is fine; only the file name itself
    is never followed."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to("real")
    w = RecordWriter(tmp_path / "alias" / "records.jsonl")
    w.check()
    assert w.write(make(0))
    assert [r.record_id for r in iter_records(real / "records.jsonl")] == ["r0"]


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o1777])
def test_directory_writable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, mode)
    w = RecordWriter(d / "records.jsonl")
    with pytest.raises(RecordsPathError, match=rf"directory {d} is writable by .*mode {mode:04o}"):
        w.check()
    assert not w.write(make(0)) and list(d.iterdir()) == []


def test_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    path.write_bytes(b"")
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(RecordsPathError, match=f"the file is owned by uid {NOBODY}"):
        RecordWriter(path).check()
    assert not RecordWriter(path).write(make(0)) and path.read_bytes() == b""


def test_fifo_at_the_records_path_neither_blocks_nor_is_written(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    os.mkfifo(path, 0o600)
    w = RecordWriter(path)
    with pytest.raises(RecordsPathError, match="records path"):
        w.check()
    assert not w.write(make(0))


def test_new_file_is_0640_and_new_directories_0750(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = tmp_path / "a" / "b" / "records.jsonl"
        w = RecordWriter(path)
        w.check()
        assert not path.exists(), "check() must not leave an empty records file"
        assert w.write(make(0))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "a" / "b").stat().st_mode) == 0o750


def test_rotation_replaces_a_symlink_at_a_rotated_name_and_never_writes_through_it(
    tmp_path: Path, target: Path
) -> None:
    path = tmp_path / "records.jsonl"
    w = RecordWriter(path, max_bytes=4096, keep=2)
    (tmp_path / "records.jsonl.1").symlink_to(target)
    (tmp_path / "records.jsonl.2").symlink_to(target)
    n = 12
    for i in range(n):
        assert w.write(make(i))
    assert w.stats.rotations >= 2
    assert target.read_bytes() == SECRET
    assert not any(p.is_symlink() for p in tmp_path.glob("records.jsonl*"))
    files = [tmp_path / "records.jsonl.2", tmp_path / "records.jsonl.1", path]
    ids = [r.record_id for f in files for r in iter_records(f)]
    assert ids == [f"r{i}" for i in range(n - len(ids), n)]


def test_check_finds_an_unwritable_path_at_start(tmp_path: Path) -> None:
    """A records directory nobody cannot write: check() says so (not insecure, just unwritable)."""
    d = Path(tempfile.mkdtemp(prefix="lmkd-py-rootdir-"))
    try:
        os.chmod(d, 0o755)
        w = RecordWriter(d / "records.jsonl")

        def probe() -> None:
            try:
                w.check()
            except RecordsPathError as exc:
                assert not exc.insecure and "Permission denied" in str(exc) and str(d) in str(exc), exc
            else:
                raise AssertionError("check() passed in a directory nobody cannot write")

        as_nobody(probe)
        assert list(d.iterdir()) == []
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_nobody_writes_in_its_own_directory(attacker_dir: Path) -> None:
    """The rules are about who owns what, not about being root: nobody's own 0755 directory is trusted
    by nobody (the unprivileged dry run writes there)."""
    path = attacker_dir / "records.jsonl"

    def write() -> None:
        w = RecordWriter(path)
        w.check()
        assert w.write(make(0)), w.stats.last_error

    as_nobody(write)
    assert os.stat(path).st_uid == NOBODY


def test_too_many_trusted_symlinks_is_an_error_not_a_hang(tmp_path: Path) -> None:
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(UntrustedPath, match="more than 40 symlinks"):
        open_trusted_dir(tmp_path / "loop" / "x")


def test_relative_path_and_trusted_relative_symlink_with_dotdot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "up").symlink_to("../real")
    monkeypatch.chdir(tmp_path)
    w = RecordWriter(Path("links/up/records.jsonl"))
    monkeypatch.chdir("/")  # the path was pinned when the writer was made
    w.check()
    assert w.write(make(0))
    assert [r.record_id for r in iter_records(tmp_path / "real" / "records.jsonl")] == ["r0"]


def test_a_file_where_a_directory_should_be_names_it(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(RecordsPathError, match=f"records path .*: Not a directory \\({tmp_path}/f\\)") as err:
        RecordWriter(tmp_path / "f" / "sub" / "records.jsonl").check()
    assert not err.value.insecure


def test_observe_refuses_at_start(attacker_dir: Path) -> None:
    """Observe checks the records path before it reports ready, not at the first kill it sees."""
    records = attacker_dir / "records.jsonl"
    out = subprocess.run(
        [sys.executable, "-m", "lmkd_py.cli", "observe", "--records", str(records), "--duration", "30",
         "--log-format", "json"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2, out.stderr
    assert f"records path {records}: directory {attacker_dir} is owned by uid {NOBODY}" in out.stderr
    assert "observe.ready" not in out.stderr and "Traceback" not in out.stderr
    assert list(attacker_dir.iterdir()) == []
