"""The systemd unit: static checks with systemd-analyze, its syscall filter, ExecReload, the daemon's
sd_notify traffic on a real socket, and (slow) the unit run by a real systemd inside systemd-nspawn.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import sysconfig
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "lmkd-py.service"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed (Debian package: systemd)")

REQUIRED_CAPS = {
    "CAP_KILL",
    "CAP_SYS_PTRACE",
    "CAP_IPC_LOCK",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_DAC_READ_SEARCH",
}

# What the daemon calls (syscalls.py, psi.py, tracing.py, records, the interpreter and its threads).
MUST_ALLOW = [
    "pidfd_open",
    "pidfd_send_signal",
    "process_mrelease",
    "mlockall",
    "munlockall",
    "sched_setscheduler",
    "sched_getscheduler",
    "setpriority",
    "poll",
    "ppoll",
    "epoll_create1",
    "epoll_ctl",
    "epoll_wait",
    "waitid",
    "socket",
    "bind",
    "sendto",
    "sendmsg",
    "memfd_create",  # a journal entry too big for one datagram (lmkd_py/journal.py)
    "fcntl",  # ... sealed before it is sent
    "recvfrom",
    "recvmsg",
    "openat",
    "read",
    "write",
    "pread64",
    "getdents64",
    "newfstatat",
    "statx",
    "mkdir",
    "mkdirat",
    "rmdir",
    "unlinkat",
    "rename",
    "fsync",
    "ioctl",
    "prctl",
    "clone",
    "clone3",
    "futex",
    "getrandom",
    "rt_sigaction",
    "rt_sigprocmask",
    "tgkill",
    "kill",
    "mmap",
    "munmap",
    "mprotect",
    "madvise",
    "clock_gettime",
    "clock_nanosleep",
    "timerfd_create",
    "uname",
    "exit_group",
]
# Privileged or unused calls that must stay filtered.
MUST_DENY = [
    "mount",
    "umount2",
    "pivot_root",
    "ptrace",
    "perf_event_open",
    "bpf",
    "init_module",
    "finit_module",
    "kexec_load",
    "reboot",
    "swapon",
    "settimeofday",
    "clock_settime",
    "setuid",
    "setresuid",
    "chroot",
    "iopl",
]


# --- a small parser for unit files and SystemCallFilter semantics ----------------------------------


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections → key → every assignment in order (systemd keeps repeated keys; '' resets a list)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"assignment outside a section: {line!r}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def parse_syscall_groups(text: str) -> dict[str, set[str]]:
    """Parse `systemd-analyze syscall-filter` (all groups) into group → fully expanded syscall names."""
    raw: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("@"):
            current = raw.setdefault(line.strip(), [])
        elif current is not None and line[0].isspace():
            item = line.strip()
            if not item.startswith("#"):
                current.append(item)
        else:
            current = None  # trailing notes such as "# Unlisted system calls..."

    def expand(name: str, seen: frozenset[str]) -> set[str]:
        out: set[str] = set()
        for item in raw[name]:
            if item.startswith("@"):
                if item not in seen:
                    out |= expand(item, seen | {item})
            else:
                out.add(item)
        return out

    return {name: expand(name, frozenset({name})) for name in raw}


def effective_syscall_filter(assignments: list[str], groups: dict[str, set[str]]) -> tuple[bool, set[str]]:
    """Apply systemd's SystemCallFilter= semantics; return (is_allow_list, set).

    As in systemd's config_parse_syscall_filter(): the first non-empty assignment fixes the mode (a
    leading "~" makes a deny list, otherwise an allow list that also gets @default); later assignments
    in the same mode add, those with the other sense remove; an empty assignment resets. ":errno"
    suffixes are ignored.
    """
    allow_list: bool | None = None
    chosen: set[str] = set()
    for value in assignments:
        if not value:
            allow_list, chosen = None, set()
            continue
        invert = value.startswith("~")
        body = value[1:] if invert else value
        if allow_list is None:
            allow_list = not invert
            if allow_list:
                chosen |= groups["@default"]
        for token in body.split():
            name = token.split(":", 1)[0]
            names = groups[name] if name.startswith("@") else {name}
            if invert != allow_list:
                chosen |= names
            else:
                chosen -= names
    return bool(allow_list), chosen


def is_allowed(name: str, allow_list: bool, chosen: set[str]) -> bool:
    return (name in chosen) if allow_list else (name not in chosen)


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT.read_text())


@pytest.fixture(scope="module")
def service(unit: dict[str, dict[str, list[str]]]) -> dict[str, list[str]]:
    return unit["Service"]


def last(service: dict[str, list[str]], key: str) -> str:
    assert key in service, f"{key}= missing from the unit"
    return service[key][-1]


# --- the test's own filter logic can fail ----------------------------------------------------------


def test_filter_semantics_on_a_made_up_table() -> None:
    groups = {"@default": {"read"}, "@a": {"x", "y"}, "@b": {"y", "z"}}
    allow, chosen = effective_syscall_filter(["@a w", "~@b"], groups)
    assert allow and chosen == {"read", "x", "w"}
    assert not is_allowed("y", allow, chosen)
    allow, chosen = effective_syscall_filter(["~@a:EPERM", "y"], groups)
    assert not allow and chosen == {"x"}
    assert is_allowed("y", allow, chosen) and not is_allowed("x", allow, chosen)
    allow, chosen = effective_syscall_filter(["@a", "", "~z"], groups)
    assert not allow and chosen == {"z"}


def test_unit_parser_joins_continuations_and_keeps_repeats() -> None:
    parsed = parse_unit("[S]\n# c\nA=1\nA=2 \\\n  3\n; c\nB=\n")
    assert parsed == {"S": {"A": ["1", "2 3"], "B": [""]}}


def test_group_parser_expands_nested_groups() -> None:
    text = "@outer\n    # doc\n    @inner\n    a\n\n@inner\n    # doc\n    b\n"
    assert parse_syscall_groups(text) == {"@outer": {"a", "b"}, "@inner": {"b"}}


# --- the unit's settings ---------------------------------------------------------------------------


def test_lifecycle_settings(service: dict[str, list[str]]) -> None:
    assert last(service, "Type") == "notify"
    assert last(service, "NotifyAccess") == "main"
    assert last(service, "Restart") == "always"
    assert last(service, "OOMScoreAdjust") == "-1000"
    assert re.fullmatch(r"\d+[KMG]", last(service, "MemoryMin"))
    watchdog = last(service, "WatchdogSec")
    assert re.fullmatch(r"\d+s", watchdog) and int(watchdog[:-1]) > 0
    exec_start = last(service, "ExecStart").split()
    assert exec_start[0] == "/usr/bin/lmkd-py"
    assert exec_start[1:3] == ["--config", "/etc/lmkd-py/lmkd-py.toml"]
    assert last(service, "StateDirectory") == "lmkd-py"


def test_hardening_settings(service: dict[str, list[str]]) -> None:
    assert last(service, "NoNewPrivileges") == "yes"
    assert last(service, "ProtectSystem") == "strict"
    assert "/var/lib/lmkd-py" in " ".join(service["ReadWritePaths"]).split()
    assert last(service, "PrivateNetwork") == "yes"
    assert set(last(service, "RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_NETLINK"}
    assert last(service, "SystemCallArchitectures") == "native"
    # The killer must see every process: no hidepid and no subset=pid.
    assert service.get("ProtectProc", ["default"])[-1] == "default"
    assert service.get("ProcSubset", ["all"])[-1] == "all"
    # tracefs stays writable through the bind mount the daemon is pointed at.
    assert "-/sys/kernel/tracing:/run/lmkd-py/tracefs" in service["BindPaths"]
    assert "LMKD_PY_TRACEFS=/run/lmkd-py/tracefs" in service["Environment"]


def test_capabilities_are_exactly_the_needed_ones_and_each_is_justified(
    service: dict[str, list[str]],
) -> None:
    caps = set(" ".join(service["CapabilityBoundingSet"]).split())
    assert caps == REQUIRED_CAPS
    assert "AmbientCapabilities" not in service
    comments = "\n".join(line for line in UNIT.read_text().splitlines() if line.startswith("#"))
    for cap in sorted(caps):
        assert re.search(rf"^# {cap}: \S", comments, re.MULTILINE), f"{cap} has no justification comment"


# --- systemd-analyze --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def syscall_groups() -> dict[str, set[str]]:
    assert ANALYZE is not None
    out = subprocess.run([ANALYZE, "syscall-filter"], capture_output=True, text=True, check=True).stdout
    groups = parse_syscall_groups(out)
    assert "@system-service" in groups and "@default" in groups
    return groups


@needs_analyze
@pytest.mark.parametrize("name", MUST_ALLOW)
def test_syscall_filter_allows(name: str, service: dict[str, list[str]], syscall_groups: dict[str, set[str]]) -> None:
    allow, chosen = effective_syscall_filter(service["SystemCallFilter"], syscall_groups)
    assert is_allowed(name, allow, chosen), f"SystemCallFilter blocks {name}"


@needs_analyze
@pytest.mark.parametrize("name", MUST_DENY)
def test_syscall_filter_denies(name: str, service: dict[str, list[str]], syscall_groups: dict[str, set[str]]) -> None:
    allow, chosen = effective_syscall_filter(service["SystemCallFilter"], syscall_groups)
    assert not is_allowed(name, allow, chosen), f"SystemCallFilter allows {name}"


def _unit_copy_runnable_here(tmp_path: Path) -> Path:
    # verify insists that ExecStart's binary exists; point it at this checkout's console script.
    exe = Path(sys.prefix) / "bin" / "lmkd-py"
    if not exe.exists():
        exe = Path(sys.executable)
    text = UNIT.read_text().replace("ExecStart=/usr/bin/lmkd-py ", f"ExecStart={exe} ", 1)
    assert str(exe) in text
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    return copy


@needs_analyze
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    assert ANALYZE is not None
    copy = _unit_copy_runnable_here(tmp_path)
    proc = subprocess.run(
        [ANALYZE, "verify", "--man=no", "--recursive-errors=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # verify exits 0 on unknown keys and bad values, and only says so on stderr: demand silence.
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


@needs_analyze
def test_systemd_analyze_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    assert ANALYZE is not None
    copy = _unit_copy_runnable_here(tmp_path)
    copy.write_text(copy.read_text().replace("ProtectSystem=strict", "ProtectSytem=strict"))
    proc = subprocess.run(
        [ANALYZE, "verify", "--man=no", "--recursive-errors=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "ProtectSytem" in proc.stderr


def exposure_of(path: Path) -> float:
    assert ANALYZE is not None
    proc = subprocess.run(
        [ANALYZE, "security", "--offline=true", "--no-pager", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    return float(match.group(1))


@needs_analyze
def test_security_exposure_is_at_most_2() -> None:
    exposure = exposure_of(UNIT)
    print(f"systemd-analyze security exposure: {exposure}")
    assert exposure <= 2.0


@needs_analyze
def test_security_exposure_would_notice_a_weaker_unit(tmp_path: Path) -> None:
    weaker = tmp_path / UNIT.name
    weaker.write_text(UNIT.read_text().replace("PrivateNetwork=yes", "PrivateNetwork=no"))
    assert exposure_of(weaker) > exposure_of(UNIT)


# --- ExecReload ------------------------------------------------------------------------------------


def test_exec_reload_delivers_sighup(service: dict[str, list[str]], tmp_path: Path) -> None:
    marker = tmp_path / "got-hup"
    code = (
        "import signal, sys, time\n"
        f"signal.signal(signal.SIGHUP, lambda *_: (open({str(marker)!r}, 'w').close(), sys.exit(0)))\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
        "sys.exit(3)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        argv = [arg.replace("$MAINPID", str(child.pid)) for arg in last(service, "ExecReload").split()]
        assert argv[0].startswith("/") and Path(argv[0]).exists(), argv
        subprocess.run(argv, check=True, timeout=10)
        assert child.wait(timeout=10) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert marker.exists()


# --- the daemon under a real NOTIFY_SOCKET --------------------------------------------------------


class NotifyListener:
    """The manager's end of $NOTIFY_SOCKET: a datagram socket that records (fields, sender pid)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(path))
        self.messages: list[tuple[dict[str, str], int]] = []

    def wait_for(self, key: str, value: str, timeout_s: float, count: int = 1) -> list[dict[str, str]]:
        deadline = time.monotonic() + timeout_s
        while True:
            hits = [m for m, _ in self.messages if m.get(key) == value]
            if len(hits) >= count:
                return hits
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {count}x {key}={value} in {timeout_s}s; got {self.messages}")
            self.sock.settimeout(left)
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                continue
            pid = -1
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", payload[:12])[0]
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((fields, pid))

    def close(self) -> None:
        self.sock.close()


def _daemon_missing() -> bool:
    return importlib.util.find_spec("lmkd_py.daemon") is None or importlib.util.find_spec("lmkd_py.cli") is None


@pytest.fixture
def daemon_under_notify(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], NotifyListener]]:
    if _daemon_missing():
        pytest.skip("the daemon (lmkd_py.daemon / lmkd_py.cli) is not in this tree yet")
    listener = NotifyListener(tmp_path / "notify.sock")
    env = dict(os.environ, NOTIFY_SOCKET=str(listener.path), WATCHDOG_USEC="1000000")
    env.pop("WATCHDOG_PID", None)
    exe = Path(sys.prefix) / "bin" / "lmkd-py"
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "lmkd_py.cli"]
    argv += ["--dry-run", "--records", str(tmp_path / "kills.jsonl"), "--log-format", "json"]
    log = (tmp_path / "daemon.log").open("wb")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc, listener
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        listener.close()


def test_daemon_sends_ready_and_watchdog_pings(
    daemon_under_notify: tuple[subprocess.Popen[bytes], NotifyListener],
) -> None:
    proc, listener = daemon_under_notify
    listener.wait_for("READY", "1", timeout_s=30)
    # WATCHDOG_USEC=1 s asks for a ping every 0.5 s; three within 4 s leaves room for a slow CI.
    listener.wait_for("WATCHDOG", "1", timeout_s=4, count=3)
    assert proc.poll() is None
    # NotifyAccess=main: every message must come from the daemon's own process.
    assert {pid for _, pid in listener.messages} == {proc.pid}


def test_daemon_announces_reload_and_stop(
    daemon_under_notify: tuple[subprocess.Popen[bytes], NotifyListener],
) -> None:
    proc, listener = daemon_under_notify
    listener.wait_for("READY", "1", timeout_s=30)
    proc.send_signal(signal.SIGHUP)  # what ExecReload does
    listener.wait_for("RELOADING", "1", timeout_s=10)
    listener.wait_for("READY", "1", timeout_s=10, count=2)
    proc.send_signal(signal.SIGTERM)
    listener.wait_for("STOPPING", "1", timeout_s=10)
    assert proc.wait(timeout=15) == 0


# --- the unit under a real systemd (PID 1 of a systemd-nspawn container) ---------------------------

NSPAWN = shutil.which("systemd-nspawn")

# Stands in for the daemon inside the real unit: does each thing lmkd-py needs, reports, then speaks
# sd_notify until stopped. Results go to the state directory, the only writable place.
PROBE = r"""
import ctypes, errno, json, os, select, signal, socket, struct, time
from lmkd_py.sdnotify import SdNotifier

res = {}
def attempt(name, fn):
    try:
        res[name] = "ok:" + str(fn())
    except OSError as exc:
        res[name] = errno.errorcode.get(exc.errno, str(exc.errno))

libc = ctypes.CDLL(None, use_errno=True)
def sc(nr, *args):
    r = libc.syscall(nr, *args)
    if r < 0:
        e = ctypes.get_errno(); raise OSError(e, os.strerror(e))
    return r
def mlockall():
    if libc.mlockall(3) != 0:
        e = ctypes.get_errno(); raise OSError(e, os.strerror(e))
    return libc.munlockall()
attempt("mlockall", mlockall)
attempt("sched_fifo", lambda: os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1)))
os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
vpid = int(open("/run/victim.pid").read())
res["victim_uid"] = os.stat(f"/proc/{vpid}").st_uid
attempt("smaps_rollup", lambda: len(open(f"/proc/{vpid}/smaps_rollup").read()))
attempt("proc_io", lambda: len(open(f"/proc/{vpid}/io").read()))
attempt("proc_fd", lambda: len(os.listdir(f"/proc/{vpid}/fd")))
fd = sc(434, vpid, 0)                                   # pidfd_open
attempt("pidfd_send_signal", lambda: sc(424, fd, 9, None, 0))
attempt("process_mrelease", lambda: sc(448, fd, 0))
attempt("pidfd_exit", lambda: bool(select.select([fd], [], [], 10)[0]))
def instance(root):
    inst = os.path.join(root, "instances", "lmkd-py-unit-test")
    os.mkdir(inst)
    try:
        with open(os.path.join(inst, "trace_clock"), "w") as f:
            f.write("mono")
    finally:
        os.rmdir(inst)
    return "made"
attempt("tracefs_bind", lambda: instance(os.environ["LMKD_PY_TRACEFS"]))
attempt("tracefs_sys", lambda: instance("/sys/kernel/tracing"))
def connector():
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 11)
    s.bind((0, 1))
    op = struct.pack("I", 1)
    msg = struct.pack("IIIIHH", 1, 1, 0, 0, len(op), 0) + op
    s.send(struct.pack("IHHII", 16 + len(msg), 3, 0, 0, 0) + msg)
attempt("proc_connector", connector)
attempt("inet", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
attempt("sysctl_write", lambda: open("/proc/sys/vm/swappiness", "w"))
attempt("etc_write", lambda: open("/etc/lmkd-py-unit-test", "w"))
attempt("state_write", lambda: open("/var/lib/lmkd-py/kills.jsonl", "a").write("{}\n"))
attempt("psi_trigger", lambda: os.write(os.open("/proc/pressure/memory", os.O_RDWR), b"some 500000 2000000\0"))
attempt("mount", lambda: sc(165, b"none", b"/tmp", b"tmpfs", 0, None))
json.dump(res, open("/var/lib/lmkd-py/probe.json", "w"))

n = SdNotifier.from_env()
state = {"stop": False, "hup": 0}
signal.signal(signal.SIGTERM, lambda *_: state.update(stop=True))
signal.signal(signal.SIGHUP, lambda *_: state.update(hup=state["hup"] + 1))
n.ready(status="probe ready")
seen = 0
while not state["stop"]:
    time.sleep(0.2)
    n.watchdog()
    if state["hup"] != seen:
        seen = state["hup"]
        n.reloading()
        n.ready(status=f"reloaded {seen}")
n.stopping()
"""

VICTIM = """[Service]
User=nobody
ExecStart=/usr/bin/python3 -c "import time; b = bytearray(64 << 20); b[::4096] = bytes(len(b) // 4096); \
time.sleep(600)"
ExecStartPost=+/bin/sh -c 'sleep 1; echo $MAINPID > /run/victim.pid'
"""

DRIVER = """[Unit]
After=multi-user.target
[Service]
Type=oneshot
StandardOutput=append:/out/driver.log
StandardError=inherit
ExecStart=/bin/sh -c 'systemctl start victim.service; systemctl start lmkd-py.service; \
echo start_rc=$?; sleep 2; systemctl reload lmkd-py.service; echo reload_rc=$?; sleep 1; \
systemctl show lmkd-py.service -p ActiveState -p SubState -p StatusText -p WatchdogTimestampMonotonic \
-p NRestarts; cp /var/lib/lmkd-py/probe.json /out/; systemctl stop lmkd-py.service; \
systemctl show lmkd-py.service -p Result -p ExecMainStatus | sed s/^/after_/; \
journalctl --no-pager -u lmkd-py.service > /out/journal.txt'
ExecStartPost=/bin/systemctl poweroff
"""


# Observe mode under the unit: a victim in a memory-limited unit (MemoryMax=) named so it can be told
# apart, killed by another process (/bin/kill, from the driver); then `lmkd-py status` as nobody.
OBSERVE_VICTIM = """[Service]
User=nobody
MemoryMax=128M
ExecStart=/usr/bin/python3 -c "import ctypes, time; ctypes.CDLL(None).prctl(15, b'lmkd-field-vic', 0, 0, 0); \\
b = bytearray(64 << 20); b[::4096] = bytes(len(b) // 4096); time.sleep(600)"
ExecStartPost=+/bin/sh -c 'sleep 1; echo $MAINPID > /run/victim.pid'
"""

OBSERVE_DRIVER = """[Unit]
After=multi-user.target
[Service]
Type=oneshot
StandardOutput=append:/out/driver.log
StandardError=inherit
ExecStart=/bin/sh -c 'systemctl start victim.service; systemctl start lmkd-py.service; echo start_rc=$?; \\
systemctl show victim.service -p MemoryMax | sed s/^/victim_/; /bin/kill -KILL $(cat /run/victim.pid); \\
echo kill_rc=$?; sleep 2; systemctl reload lmkd-py.service; echo reload_rc=$?; sleep 1; \\
setpriv --reuid=nobody --regid=nogroup --clear-groups env PYTHONPATH=/opt/lmkd-py-src:/opt/lmkd-py-site \\
/usr/bin/python3 -m lmkd_py.cli status --json > /out/status.json 2> /out/status.err; echo status_rc=$?; \\
systemctl show lmkd-py.service -p ActiveState -p SubState -p StatusText -p WatchdogTimestampMonotonic \\
-p NRestarts; systemctl stop lmkd-py.service; \\
systemctl show lmkd-py.service -p Result -p ExecMainStatus | sed s/^/after_/; \\
cp /var/lib/lmkd-py/records.jsonl /out/ 2>/dev/null; journalctl --no-pager -u lmkd-py.service > /out/journal.txt; \
journalctl --no-pager -o json -u lmkd-py.service -p warning > /out/journal-warning.json; \
journalctl --no-pager -o json -u lmkd-py.service LMKD_OUTCOME=observed > /out/journal-kills.json'
ExecStartPost=/bin/systemctl poweroff
"""


def _cgroup_roots() -> list[Path]:
    """Hierarchies in which nspawn (without a host systemd) creates its payload/supervisor cgroups."""
    roots = [Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified")]
    found = [r for r in roots if (r / "cgroup.procs").exists()]
    if not found and (Path("/sys/fs/cgroup") / "cgroup.controllers").exists():
        found = [Path("/sys/fs/cgroup")]
    return found


@pytest.fixture
def nspawn_cgroups() -> Iterator[list[Path]]:
    made = []
    name = f"lmkd-py-unit-test-{uuid.uuid4().hex[:8]}"
    try:
        for root in _cgroup_roots():
            (root / name).mkdir()
            made.append(root / name)
        yield made
    finally:
        for top in made:
            for sub in sorted(top.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if sub.is_dir():
                    sub.rmdir()
            top.rmdir()


_NSPAWN_MARKS = (
    pytest.mark.slow,
    pytest.mark.root,
    pytest.mark.skipif(NSPAWN is None, reason="systemd-nspawn is not installed (Debian package: systemd-container)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="booting a systemd-nspawn container needs root"),
)


def needs_nspawn(fn: Callable[..., None]) -> Callable[..., None]:
    for mark in _NSPAWN_MARKS:
        fn = mark(fn)
    return fn


def boot_unit(
    tmp_path: Path,
    cgroups: list[Path],
    exec_start: str,
    extra_binds: dict[Path, str],
    *,
    driver: str = DRIVER,
    victim: str = VICTIM,
) -> tuple[dict[str, str], str, Path]:
    """Boot a container whose PID 1 is systemd, run the shipped unit with ``exec_start`` swapped in,
    start it, reload it, stop it (see DRIVER, or ``driver``). Returns (values the driver printed, its
    log, /out dir).

    The service has its own /tmp (PrivateTmp=), so this checkout and its site-packages are bound to
    fixed places under /opt, wherever they live on the host; the unit gets PYTHONPATH for them.
    """
    assert NSPAWN is not None
    units = tmp_path / "units"
    units.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    text = UNIT.read_text().replace(
        "ExecStart=/usr/bin/lmkd-py --config /etc/lmkd-py/lmkd-py.toml",
        f"ExecStart={exec_start}\nEnvironment=PYTHONPATH=/opt/lmkd-py-src:/opt/lmkd-py-site",
    )
    assert exec_start in text
    (units / "lmkd-py.service").write_text(text)
    (units / "victim.service").write_text(victim)
    (units / "driver.service").write_text(driver)

    def enter_cgroups() -> None:
        for cg in cgroups:
            (cg / "cgroup.procs").write_text("0")

    argv = [
        NSPAWN,
        "--quiet",
        "--directory=/",
        "--volatile=yes",  # a tmpfs root with the host's /usr read-only: nothing on the host changes
        "--private-network",
        "--register=no",
        "--keep-unit",
        "--console=pipe",
        # nspawn's own defaults would hide what the unit allows: it drops CAP_IPC_LOCK, skips
        # sys-kernel-tracing.mount without CAP_SYS_RAWIO, and its seccomp list lacks process_mrelease.
        "--capability=CAP_IPC_LOCK,CAP_SYS_RAWIO",
        "--system-call-filter=process_mrelease",
        f"--bind={out}:/out",
        f"--bind-ro={units}:/etc/systemd/system",
        f"--bind-ro={REPO}:/opt/lmkd-py-src",
        f"--bind-ro={site}:/opt/lmkd-py-site",
        *[f"--bind-ro={host}:{inside}" for host, inside in extra_binds.items()],
        "--boot",
        "--",
        "systemd.unit=driver.service",
        "systemd.firstboot=off",
    ]
    proc = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=240,
        preexec_fn=enter_cgroups,  # so that the fixture can remove every cgroup the container made
    )
    driver_log = (out / "driver.log").read_text() if (out / "driver.log").exists() else ""
    journal = (out / "journal.txt").read_text() if (out / "journal.txt").exists() else ""
    context = f"nspawn rc={proc.returncode}\n{proc.stderr[-3000:]}\n{driver_log}\n{journal[-6000:]}"
    shown = dict(line.split("=", 1) for line in driver_log.splitlines() if "=" in line and not line.startswith("+"))
    return shown, context, out


def assert_lifecycle(shown: dict[str, str], context: str, status_after_reload: str | None) -> None:
    """READY accepted, watchdog pings seen, reload and stop clean: all over the real notify socket."""
    assert shown.get("start_rc") == "0", context
    assert shown.get("ActiveState") == "active" and shown.get("SubState") == "running", context
    if status_after_reload is not None:
        assert shown.get("StatusText") == status_after_reload, context
    assert int(shown.get("WatchdogTimestampMonotonic", "0")) > 0, context
    assert shown.get("reload_rc") == "0", context
    assert shown.get("NRestarts") == "0", context
    assert shown.get("after_Result") == "success", context


@needs_nspawn
def test_unit_sandbox_under_real_systemd(tmp_path: Path, nspawn_cgroups: list[Path]) -> None:
    """Each thing the daemon needs works inside the unit's sandbox, and what it must not do fails."""
    opt = tmp_path / "opt"
    opt.mkdir()
    (opt / "probe.py").write_text(PROBE)
    shown, context, out = boot_unit(
        tmp_path, nspawn_cgroups, "/usr/bin/python3 /opt/lmkd-py-test/probe.py", {opt: "/opt/lmkd-py-test"}
    )
    assert (out / "probe.json").exists(), context
    report = json.loads((out / "probe.json").read_text())
    print(json.dumps(report, indent=1))
    assert_lifecycle(shown, context, status_after_reload="reloaded 1")

    # What the daemon needs works inside the sandbox...
    assert report["victim_uid"] != 0
    for key in ("mlockall", "sched_fifo", "smaps_rollup", "proc_io", "proc_fd", "pidfd_send_signal"):
        assert report[key].startswith("ok:"), (key, report[key])
    assert report["pidfd_exit"] == "ok:True"
    # 0, or ESRCH when the victim dropped its mm first; never EPERM from the syscall filter.
    assert report["process_mrelease"] in ("ok:0", "ESRCH"), report["process_mrelease"]
    assert report["psi_trigger"].startswith("ok:")
    assert report["state_write"].startswith("ok:")
    if Path("/sys/kernel/tracing").is_dir():  # the kernel has tracefs (every kernel this project targets)
        assert report["tracefs_bind"] == "ok:made", report["tracefs_bind"]
        assert report["tracefs_sys"] == "EROFS"
    # ...and what it must not do does not.
    assert report["sysctl_write"] == "EROFS"
    assert report["etc_write"] == "EROFS"
    assert report["inet"] == "EAFNOSUPPORT"
    assert report["mount"] == "EPERM"
    # The documented price of PrivateNetwork=yes: no proc connector.
    assert report["proc_connector"] == "ECONNREFUSED"


@needs_nspawn
@pytest.mark.skipif(_daemon_missing(), reason="the daemon (lmkd_py.daemon / lmkd_py.cli) is not in this tree yet")
def test_daemon_under_real_systemd(tmp_path: Path, nspawn_cgroups: list[Path]) -> None:
    """The real daemon (dry run, the repository's config) started, reloaded and stopped by systemd."""
    shown, context, _ = boot_unit(
        tmp_path,
        nspawn_cgroups,
        "/usr/bin/python3 -m lmkd_py.cli --config /etc/lmkd-py/lmkd-py.toml --dry-run",
        {REPO / "config": "/etc/lmkd-py"},
    )
    assert_lifecycle(shown, context, status_after_reload=None)
    assert shown.get("StatusText", "").startswith("config "), context


@needs_nspawn
@pytest.mark.skipif(_daemon_missing(), reason="the daemon (lmkd_py.daemon / lmkd_py.cli) is not in this tree yet")
@pytest.mark.skipif(not Path("/sys/kernel/tracing").is_dir(), reason="the kernel has no tracefs")
def test_observe_under_real_systemd_records_a_kill_made_by_another_process(
    tmp_path: Path, nspawn_cgroups: list[Path]
) -> None:
    """mode = "observe" under the shipped unit: /sys/kernel/tracing is read-only there, so observe must
    find tracefs through $LMKD_PY_TRACEFS like kill mode; it records the SIGKILL /bin/kill sends, and
    `lmkd-py status` run as nobody reads what it sees."""
    etc = tmp_path / "etc"
    etc.mkdir()
    shipped = (REPO / "config" / "lmkd-py.toml").read_text()
    assert shipped.count('\nmode = "kill"\n') == 1
    # A metrics file where the sandbox cannot write (/etc is read-only there): logged at error, kills go on,
    # and `journalctl -p warning` has a line to find (assert_journal_fields).
    unset_metrics = '\n# textfile = "/var/lib/node_exporter/textfile_collector/lmkd_py.prom"\n'
    assert shipped.count(unset_metrics) == 1
    observe_cfg = shipped.replace('\nmode = "kill"\n', '\nmode = "observe"\n')
    (etc / "lmkd-py.toml").write_text(observe_cfg.replace(unset_metrics, '\ntextfile = "/etc/lmkd-py/lmkd_py.prom"\n'))
    shown, context, out = boot_unit(
        tmp_path, nspawn_cgroups, "/usr/bin/python3 -m lmkd_py.cli --config /etc/lmkd-py/lmkd-py.toml",
        {etc: "/etc/lmkd-py"}, driver=OBSERVE_DRIVER, victim=OBSERVE_VICTIM,
    )
    assert_lifecycle(shown, context, status_after_reload=None)
    assert shown.get("kill_rc") == "0", context
    assert shown.get("victim_MemoryMax") == str(128 << 20), context
    assert "observing SIGKILLs" in shown.get("StatusText", ""), context
    assert (out / "records.jsonl").exists(), context
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines() if line.strip()]
    ours = [r for r in records if (r["victim"].get("comm") or "").startswith("lmkd-field-vic")]
    assert ours, f"no record of the victim among {len(records)}\n{context}"
    rec = ours[0]
    assert rec["outcome"] == "observed" and rec["observed"] is True
    # nspawn gives the container its own pid namespace while tracepoints carry the host's pids: the
    # killer's /proc cannot be read from inside (on a board there is one namespace and it can).
    assert rec["killer"]["kind"] == "process" and rec["killer"]["pid"] is not None, rec["killer"]
    # The status, read by an unprivileged user from the unit's RuntimeDirectory.
    assert shown.get("status_rc") == "0", (out / "status.err").read_text() + context
    status = json.loads((out / "status.json").read_text())
    assert status["mode"] == "observe" and status["running"] is True
    assert any("/run/lmkd-py/tracefs" in src for src in status["sources"]), status
    # Observe sees the whole host: on a busy machine other kills may have pushed ours out of the last five.
    in_last = any((k.get("comm") or "").startswith("lmkd-field-vic") for k in status["last_kills"])
    assert in_last or status["stats"]["kills_seen"] > len(status["last_kills"]), status
    assert_journal_fields(out, rec, context)


def _journal_json(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def assert_journal_fields(out: Path, rec: dict[str, Any], context: str) -> None:
    """Issue 14 item 6, through the real journald and journalctl: the log lines are filed at their own
    priority (`-p warning` finds the error about the metrics file, and no info line), and the kill is an
    entry of the unit that `journalctl LMKD_OUTCOME=observed` finds, fields and all."""
    warnings = _journal_json(out / "journal-warning.json")
    assert warnings, f"journalctl -p warning found nothing\n{context}"
    assert all(int(w["PRIORITY"]) <= 4 for w in warnings), warnings
    logged = {json.loads(w["MESSAGE"])["event"]: w for w in warnings if str(w.get("MESSAGE", "")).startswith("{")}
    assert "metrics.write_failed" in logged, warnings
    failed = logged["metrics.write_failed"]
    assert failed["PRIORITY"] == "3" and failed["_TRANSPORT"] == "stdout"  # the stream, its <3> honoured
    kills = [k for k in _journal_json(out / "journal-kills.json")
             if str(k.get("LMKD_VICTIM_COMM", "")).startswith("lmkd-field-vic")]
    assert len(kills) == 1, f"{kills}\n{context}"
    k = kills[0]
    assert k["_SYSTEMD_UNIT"] == "lmkd-py.service" and k["SYSLOG_IDENTIFIER"] == "lmkd-py"
    assert k["LMKD_RECORD_ID"] == rec["record_id"] and k["LMKD_VICTIM_PID"] == str(rec["victim"]["pid"])
    assert k["LMKD_KILLER"] == "process" and k["PRIORITY"] == "5"
    assert f"killed lmkd-field-vic (pid {rec['victim']['pid']}" in k["MESSAGE"], k["MESSAGE"]
