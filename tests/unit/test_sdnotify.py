"""sd_notify client against real AF_UNIX datagram sockets that the tests bind (path and abstract)."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from lmkd_py.sdnotify import SdNotifier, parse_notify_socket, parse_watchdog

RECV_TIMEOUT_S = 5.0


class Receiver:
    """The manager's side: a bound datagram socket that also receives the sender's credentials."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    def recv(self) -> tuple[dict[str, str], int]:
        """Return one message as a dict and the sender's pid from SCM_CREDENTIALS."""
        data, ancdata, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = -1
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, _uid, _gid = struct.unpack("iII", payload[:12])
        fields = dict(line.split("=", 1) for line in data.decode().split("\n"))
        return fields, pid

    def pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        finally:
            self.sock.settimeout(RECV_TIMEOUT_S)
        return True


def _bind(address: str | bytes, env_value: str) -> Receiver:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.bind(address)
    sock.settimeout(RECV_TIMEOUT_S)
    return Receiver(sock, env_value)


@pytest.fixture
def path_receiver(tmp_path: Path) -> Iterator[Receiver]:
    path = tmp_path / "notify.sock"
    rx = _bind(str(path), str(path))
    try:
        yield rx
    finally:
        rx.sock.close()


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    name = f"lmkd-py-test-{uuid.uuid4().hex}"
    rx = _bind(b"\0" + name.encode(), "@" + name)
    try:
        yield rx
    finally:
        rx.sock.close()


@pytest.fixture(params=["path", "abstract"])
def receiver(request: pytest.FixtureRequest) -> Receiver:
    rx: Receiver = request.getfixturevalue(f"{request.param}_receiver")
    return rx


# --- pure parsers ---------------------------------------------------------------------------------


def test_parse_notify_socket_forms() -> None:
    assert parse_notify_socket("/run/systemd/notify") == b"/run/systemd/notify"
    assert parse_notify_socket("@abc") == b"\0abc"
    assert parse_notify_socket("") is None
    assert parse_notify_socket("@") is None
    assert parse_notify_socket("relative/sock") is None
    assert parse_notify_socket("vsock:2:1234") is None
    assert parse_notify_socket("/" + "x" * 106) == b"/" + b"x" * 106  # 107 bytes + NUL fits
    assert parse_notify_socket("/" + "x" * 107) is None


@pytest.mark.parametrize(
    ("env", "expected_ns"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "10000000"}, 5_000_000_000),
        ({"WATCHDOG_USEC": "3"}, 1_500),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "ten"}, None),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "4242"}, 1_000_000_000),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "4243"}, None),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "x"}, None),
    ],
)
def test_parse_watchdog(env: dict[str, str], expected_ns: int | None) -> None:
    assert parse_watchdog(env, pid=4242) == expected_ns


# --- from_env -------------------------------------------------------------------------------------


def test_from_env_without_socket_is_a_silent_no_op() -> None:
    with capture_logs() as logs:
        n = SdNotifier.from_env({"WATCHDOG_USEC": "1000000"})
        n.ready("up")
        n.status("s")
        n.watchdog()
        n.reloading()
        n.stopping()
    assert not n.enabled
    assert n.watchdog_interval_ns is None
    assert n.sent == 0
    assert n.failures == 0
    assert logs == []


def test_from_env_reads_watchdog_for_this_pid(path_receiver: Receiver) -> None:
    env = {
        "NOTIFY_SOCKET": path_receiver.env_value,
        "WATCHDOG_USEC": "3000000",
        "WATCHDOG_PID": str(os.getpid()),
    }
    n = SdNotifier.from_env(env)
    assert n.enabled
    assert n.watchdog_interval_ns == 1_500_000_000


def test_from_env_ignores_watchdog_meant_for_another_pid(path_receiver: Receiver) -> None:
    env = {"NOTIFY_SOCKET": path_receiver.env_value, "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}
    assert SdNotifier.from_env(env).watchdog_interval_ns is None


def test_from_env_warns_on_unusable_values() -> None:
    with capture_logs() as logs:
        n = SdNotifier.from_env({"NOTIFY_SOCKET": "vsock:2:99"})
    assert not n.enabled
    assert [e["event"] for e in logs] == ["sdnotify.unsupported_address"]
    assert logs[0]["log_level"] == "warning"

    with capture_logs() as logs:
        n = SdNotifier.from_env({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "soon"})
    assert n.enabled
    assert n.watchdog_interval_ns is None
    assert [e["event"] for e in logs] == ["sdnotify.bad_watchdog_usec"]


def test_from_env_does_not_modify_the_environment(path_receiver: Receiver) -> None:
    env = {"NOTIFY_SOCKET": path_receiver.env_value, "WATCHDOG_USEC": "1000000"}
    before = dict(env)
    SdNotifier.from_env(env).ready()
    assert env == before


# --- messages over a real socket ------------------------------------------------------------------


def test_every_message_arrives_with_its_fields(receiver: Receiver) -> None:
    n = SdNotifier.from_env({"NOTIFY_SOCKET": receiver.env_value})
    try:
        n.ready("watching 3 cgroups")
        n.status("idle")
        n.watchdog()
        before_us = time.monotonic_ns() // 1000
        n.reloading()
        after_us = time.monotonic_ns() // 1000
        n.ready()
        n.stopping()

        msgs = [receiver.recv() for _ in range(6)]
    finally:
        n.close()
    assert all(pid == os.getpid() for _, pid in msgs)
    fields = [m for m, _ in msgs]
    assert fields[0] == {"READY": "1", "STATUS": "watching 3 cgroups"}
    assert fields[1] == {"STATUS": "idle"}
    assert fields[2] == {"WATCHDOG": "1"}
    assert fields[3].keys() == {"RELOADING", "MONOTONIC_USEC"}
    assert fields[3]["RELOADING"] == "1"
    assert before_us <= int(fields[3]["MONOTONIC_USEC"]) <= after_us
    assert fields[4] == {"READY": "1"}
    assert fields[5] == {"STOPPING": "1"}
    assert n.sent == 6
    assert n.failures == 0
    assert not receiver.pending()


def test_newlines_in_a_status_cannot_inject_assignments(path_receiver: Receiver) -> None:
    n = SdNotifier.from_env({"NOTIFY_SOCKET": path_receiver.env_value})
    n.status("killed evil\nREADY=1\r\nSTOPPING=1")
    n.close()
    fields, _ = path_receiver.recv()
    assert fields == {"STATUS": "killed evil READY=1  STOPPING=1"}


def test_socket_is_reused_between_sends(path_receiver: Receiver) -> None:
    n = SdNotifier.from_env({"NOTIFY_SOCKET": path_receiver.env_value})
    n.watchdog()
    first = n._sock
    n.watchdog()
    assert first is not None and n._sock is first
    n.close()
    assert n._sock is None
    assert [path_receiver.recv()[0] for _ in range(2)] == [{"WATCHDOG": "1"}] * 2


def test_a_subprocess_notifies_as_itself(path_receiver: Receiver) -> None:
    # What the manager sees with NotifyAccess=main: the datagram's credentials name the sending process.
    code = (
        "from lmkd_py.sdnotify import SdNotifier\n"
        "n = SdNotifier.from_env()\n"
        "n.ready('child up')\n"
        "n.watchdog()\n"
        "print(n.watchdog_interval_ns)\n"
    )
    env = dict(os.environ, NOTIFY_SOCKET=path_receiver.env_value, WATCHDOG_USEC="400000")
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30, check=True)
    assert proc.stdout.strip() == "200000000"
    (m1, pid1), (m2, pid2) = path_receiver.recv(), path_receiver.recv()
    assert m1 == {"READY": "1", "STATUS": "child up"}
    assert m2 == {"WATCHDOG": "1"}
    assert pid1 == pid2 != os.getpid()
    assert pid1 > 0


# --- failures are counted and logged once, never raised -------------------------------------------


def test_missing_socket_is_counted_and_warned_once(tmp_path: Path) -> None:
    gone = tmp_path / "nobody-listens.sock"
    n = SdNotifier.from_env({"NOTIFY_SOCKET": str(gone)})
    assert n.enabled
    with capture_logs() as logs:
        n.ready()
        n.watchdog()
        n.watchdog()
    assert n.failures == 3
    assert n.sent == 0
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1
    assert warnings[0]["event"] == "sdnotify.send_failed"
    assert warnings[0]["fields"] == "READY"
    assert "No such file" in warnings[0]["reason"]
    assert [e["log_level"] for e in logs] == ["warning", "debug", "debug"]


def test_listener_that_appears_later_is_reached(tmp_path: Path) -> None:
    path = tmp_path / "late.sock"
    n = SdNotifier.from_env({"NOTIFY_SOCKET": str(path)})
    with capture_logs():
        n.watchdog()
    assert n.failures == 1
    rx = _bind(str(path), str(path))
    try:
        n.ready()
        assert rx.recv()[0] == {"READY": "1"}
    finally:
        rx.sock.close()
        n.close()
    assert n.sent == 1


def test_full_receiver_queue_times_out_instead_of_blocking(tmp_path: Path) -> None:
    path = tmp_path / "full.sock"
    rx = _bind(str(path), str(path))
    # A receiver that never reads: sends succeed until its queue is full, then must fail within the
    # timeout rather than block the daemon loop.
    n = SdNotifier(str(path).encode(), send_timeout_ns=50_000_000)
    try:
        with capture_logs():
            start_ns = time.monotonic_ns()
            for _ in range(2000):
                n.watchdog()
                if n.failures:
                    break
            elapsed_ns = time.monotonic_ns() - start_ns
    finally:
        rx.sock.close()
        n.close()
    assert n.failures == 1, "the receiver's queue never filled"
    assert n.sent > 0
    # One blocked send waited ~50 ms; nowhere near a hang.
    assert elapsed_ns < 5_000_000_000


def test_receiver_closed_midway_does_not_raise(path_receiver: Receiver) -> None:
    n = SdNotifier.from_env({"NOTIFY_SOCKET": path_receiver.env_value})
    n.ready()
    path_receiver.sock.close()
    Path(path_receiver.env_value).unlink()
    with capture_logs():
        n.watchdog()
        n.stopping()
    assert n.sent == 1
    assert n.failures == 2
