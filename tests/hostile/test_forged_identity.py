"""Protect lists against a user who forges what they can: the process name (prctl PR_SET_NAME), argv
(exec -a), and even the executable's path inside a mount namespace of their own (issue 18, item 3).
Every process here is a real child this test started; nothing else is signalled."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmkd_py.candidates import CandidateTable
from lmkd_py.config import ExeIdentity, PolicyConfig
from lmkd_py.policy import Candidate, Rules, exclusion
from lmkd_py.procfs import ProcFs

PYTHON_EXE = os.path.realpath(sys.executable)  # what /proc/PID/exe shows for a Python child
NOBODY = 65534

# A child that renames itself to "sshd" (comm) after exec -a gave it argv[0] "/usr/sbin/sshd", then waits.
RENAMING_CHILD = textwrap.dedent("""
    import ctypes, sys
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_NAME = 15
    assert libc.prctl(PR_SET_NAME, b"sshd", 0, 0, 0) == 0, ctypes.get_errno()
    print("ready", flush=True)
    sys.stdin.readline()
""")


def start(argv: list[str], *, executable: str | None = None, **kw: object) -> subprocess.Popen[str]:
    p = subprocess.Popen(argv, executable=executable, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, **kw)  # type: ignore[call-overload]
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line.strip() == "ready", f"child did not start: {line!r}"
    return p  # type: ignore[no-any-return]


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    try:
        yield started
    finally:
        for p in started:
            if p.poll() is None:
                p.kill()
            p.wait()


def seen(pid: int, cfg: PolicyConfig) -> tuple[Candidate, bool]:
    """The child as a real table refresh over /proc reads it, and whether the ranking under ``cfg``'s
    rules includes it."""
    rules = Rules.from_config(cfg)
    table = CandidateTable(ProcFs(), rules, clock=time.monotonic_ns)
    table.refresh()
    ranked = {ch.candidate.pid for ch in table.rank(-999)}
    everything = CandidateTable(ProcFs(), Rules(), clock=time.monotonic_ns)
    everything.refresh()
    (cand,) = [ch.candidate for ch in everything.rank(-999) if ch.candidate.pid == pid]
    return cand, pid in ranked


def test_a_hog_named_sshd_is_protected_by_comm_but_not_by_exe_and_uid(procs: list[subprocess.Popen[str]]) -> None:
    hog = start(["/usr/sbin/sshd", "-c", RENAMING_CHILD], executable=sys.executable)
    procs.append(hog)
    forged, _ = seen(hog.pid, PolicyConfig(min_rss_kib=0))
    assert forged.comm == "sshd" and forged.cmdline.startswith("/usr/sbin/sshd ")  # the forgery took
    assert forged.exe == PYTHON_EXE and forged.uid == os.geteuid()  # what it cannot forge
    # The forgeable keys fall for it...
    by_name = PolicyConfig(protect_comm=("sshd",), protect_cmdline=("^/usr/sbin/sshd",), min_rss_kib=0)
    assert exclusion(forged, Rules.from_config(by_name)) == "protected comm"
    assert not seen(hog.pid, by_name)[1]
    # ...the executable with its owner does not: the hog stays a candidate and is ranked.
    by_exe = PolicyConfig(protect_exe=(ExeIdentity(path="/usr/sbin/sshd", uid=0),), min_rss_kib=0)
    assert exclusion(forged, Rules.from_config(by_exe)) is None
    assert seen(hog.pid, by_exe)[1]


def test_a_process_whose_exe_and_uid_match_is_protected(procs: list[subprocess.Popen[str]]) -> None:
    child = start([sys.executable, "-c", "import sys; print('ready', flush=True); sys.stdin.readline()"])
    procs.append(child)
    me = os.geteuid()
    for entry, protected in [
        (ExeIdentity(path=PYTHON_EXE, uid=me), True),
        (ExeIdentity(path=os.path.dirname(PYTHON_EXE) + "/", uid=me), True),  # directory form
        (ExeIdentity(path=PYTHON_EXE, uid=me + 1), False),  # the right exe, run by another uid
        (ExeIdentity(path=PYTHON_EXE + "x", uid=me), False),  # a path is not a string prefix
        (ExeIdentity(path=os.path.dirname(PYTHON_EXE), uid=me), False),  # a directory needs its "/"
    ]:
        cfg = PolicyConfig(protect_exe=(entry,), min_rss_kib=0)
        cand, ranked = seen(child.pid, cfg)
        assert ranked is not protected, entry
        assert exclusion(cand, Rules.from_config(cfg)) == ("protected exe" if protected else None), entry


def test_exe_faked_in_a_private_mount_namespace_does_not_protect(procs: list[subprocess.Popen[str]]) -> None:
    """nobody bind-mounts /bin/sleep over /usr/bin/true in a user+mount namespace of its own and runs it:
    /proc/PID/exe then reads "/usr/bin/true". Only the uid tells it apart from root's true."""
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("needs unshare(1) and root to start a child as nobody")
    script = "mount --bind /bin/sleep /usr/bin/true && echo ready && exec /usr/bin/true 60"
    p = subprocess.Popen([unshare, "-Urm", "sh", "-c", script], stdout=subprocess.PIPE, text=True,
                         user=NOBODY, group=NOBODY, extra_groups=[])
    procs.append(p)
    assert p.stdout is not None
    if p.stdout.readline().strip() != "ready":
        pytest.skip("unprivileged user namespaces are not available here")
    deadline = time.monotonic() + 10
    while os.readlink(f"/proc/{p.pid}/exe") != "/usr/bin/true" and time.monotonic() < deadline:
        time.sleep(0.01)  # between the echo and the exec
    cfg = PolicyConfig(protect_exe=(ExeIdentity(path="/usr/bin/true", uid=0),), min_rss_kib=0)
    cand, ranked = seen(p.pid, cfg)
    assert cand.exe == "/usr/bin/true" and cand.uid == NOBODY  # the path is faked, the uid is not
    assert ranked and exclusion(cand, Rules.from_config(cfg)) is None


def test_exec_in_place_is_seen_although_pid_and_start_time_stay(procs: list[subprocess.Popen[str]]) -> None:
    """execve() keeps the pid and the start time, so identity cached per (pid, start time) would go
    stale: a protected process that execs something else must lose its protection at the next refresh."""
    code = "import os, sys; print('ready', flush=True); sys.stdin.readline(); os.execv('/bin/sleep', ['sleep', '60'])"
    child = start([sys.executable, "-c", code])
    procs.append(child)
    cfg = PolicyConfig(protect_exe=(ExeIdentity(path=PYTHON_EXE, uid=os.geteuid()),), min_rss_kib=0)
    rules = Rules.from_config(cfg)
    table = CandidateTable(ProcFs(), rules, clock=time.monotonic_ns)
    table.refresh()
    assert child.pid not in {ch.candidate.pid for ch in table.rank(-999)}  # protected as Python
    start_ticks = ProcFs().stat(child.pid).start_time_ticks
    assert child.stdin is not None
    child.stdin.write("go\n")
    child.stdin.flush()
    sleep_exe = os.path.realpath("/bin/sleep")
    deadline = time.monotonic() + 10
    while os.readlink(f"/proc/{child.pid}/exe") != sleep_exe and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ProcFs().stat(child.pid).start_time_ticks == start_ticks  # same (pid, start time)...
    table.refresh()
    now = {ch.candidate.pid: ch.candidate for ch in table.rank(-999)}
    assert child.pid in now  # ...but no longer the protected executable
    assert now[child.pid].exe == sleep_exe and now[child.pid].cmdline == "sleep 60"


def test_deleted_executable_keeps_its_path(tmp_path: Path, procs: list[subprocess.Popen[str]]) -> None:
    """A package upgrade unlinks /usr/sbin/sshd under the running daemon; /proc/PID/exe then ends in
    " (deleted)". The protection must survive that."""
    copy = tmp_path / "sleep-copy"
    shutil.copy2("/bin/sleep", copy)
    p = subprocess.Popen([str(copy), "60"])
    procs.append(p)  # type: ignore[arg-type]
    deadline = time.monotonic() + 10
    while os.readlink(f"/proc/{p.pid}/exe") != str(copy) and time.monotonic() < deadline:
        time.sleep(0.01)
    copy.unlink()
    assert os.readlink(f"/proc/{p.pid}/exe") == f"{copy} (deleted)"
    assert ProcFs().exe(p.pid) == str(copy)
    cfg = PolicyConfig(protect_exe=(ExeIdentity(path=str(copy), uid=os.geteuid()),), min_rss_kib=0)
    assert not seen(p.pid, cfg)[1]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to the nobody user")
def test_unreadable_exe_means_unknown_not_a_crash(nobody_python: tuple[list[str], dict[str, str]],
                                                  procs: list[subprocess.Popen[str]]) -> None:
    """As nobody (no CAP_SYS_PTRACE), root's processes' exe links give EACCES: the table keeps them,
    with the exe unknown, so protect_exe cannot protect them — and says so once, at debug."""
    root_child = start([sys.executable, "-c", "import sys; print('ready', flush=True); sys.stdin.readline()"])
    procs.append(root_child)
    prefix, env = nobody_python
    code = textwrap.dedent(f"""
        import json, time
        import structlog
        from structlog.testing import capture_logs
        from lmkd_py.candidates import CandidateTable
        from lmkd_py.config import ExeIdentity, PolicyConfig
        from lmkd_py.policy import Rules
        from lmkd_py.procfs import ProcFs
        try:
            ProcFs().exe({root_child.pid})
            direct = "readable"
        except PermissionError:
            direct = "EACCES"
        cfg = PolicyConfig(protect_exe=(ExeIdentity(path={PYTHON_EXE!r}, uid=0),), min_rss_kib=0)
        table = CandidateTable(ProcFs(), Rules.from_config(cfg), clock=time.monotonic_ns)
        with capture_logs() as logs:
            table.refresh()
            table.refresh()
        cands = {{c.candidate.pid: c.candidate for c in table.rank(-999)}}
        c = cands.get({root_child.pid})
        unknown = [e for e in logs if e["event"] == "candidates.exe_unknown" and e["pid"] == {root_child.pid}]
        print(json.dumps({{"direct": direct, "ranked": c is not None, "exe": c.exe if c else "-",
                          "logged": len(unknown)}}))
    """)
    out = subprocess.run([prefix[0], "-c", code], capture_output=True, text=True, timeout=60, user=NOBODY,
                         group=NOBODY, extra_groups=[], env=env, cwd="/")
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    result = json.loads(out.stdout.splitlines()[-1])
    assert result == {"direct": "EACCES", "ranked": True, "exe": None, "logged": 1}
