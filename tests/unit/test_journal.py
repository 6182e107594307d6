"""journal.py: the native protocol against a socket the test binds, the kill entry of a record, hostile
values, failures that must never raise, the memfd path, and the ``<N>`` prefixes of log.py."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from lmkd_py import journal
from lmkd_py import log as logsetup
from lmkd_py.journal import JournalSender, bound, describe, encode, field_name_ok, kill_fields, parse_journal_stream
from lmkd_py.records import (
    KernelTimeline,
    KilledBy,
    KillRecord,
    Mrelease,
    MreleaseStatus,
    Outcome,
    Pressure,
    Provenance,
    Steps,
    Victim,
)
from tests.journald import JournalReceiver, decode
from tests.unit.test_daemon_loop import CRIT, ev, make


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[JournalReceiver]:
    r = JournalReceiver(tmp_path / "journal.sock")
    try:
        yield r
    finally:
        r.close()


NewSender = Callable[[str], JournalSender]


@pytest.fixture
def new_sender() -> Iterator[Callable[[str], JournalSender]]:
    """Makes senders to an address and closes them after the test (no socket left to the collector)."""
    made: list[JournalSender] = []

    def make_sender(address: str) -> JournalSender:
        made.append(JournalSender(address))
        return made[-1]

    yield make_sender
    for sender in made:
        sender.close()


def record(**kw: object) -> KillRecord:
    base = KillRecord(
        record_id="r-1234", kill_id="k-9", wall_time="2026-01-01T00:00:00Z", outcome=Outcome.KILLED,
        victim=Victim(pid=1234, comm="firefox", cmdline="/usr/lib/firefox/firefox -P x", uid=1000,
                      oom_score_adj=200, cgroup="/user.slice/app.scope", rss_kib=812 * 1024),
        steps=Steps(start_ns=1, end_ns=2),
        mrelease=Mrelease(status=MreleaseStatus.OK, wall_ns=3_500_000),
        kill_to_exit_ns=41_234_567, kill_to_mem_recovered_ns=120_000_000, mem_recovered_kib=800_000,
        pressure=Pressure(level="critical", kill_reason="low_mem_and_thrashing", reason="largest in band 200",
                          rank=0, decision_latency_ns=1_500_000),
        kernel=KernelTimeline(reaper_work_ns=3_000_000, exit_mmap_ns=9_000_000, reap_total_ns=12_000_000),
        provenance=Provenance(kernel_release="6.18.0-test"),
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


# --- the wire format --------------------------------------------------------------------------------


def test_encode_text_and_binary_forms_byte_for_byte() -> None:
    data = encode([("MESSAGE", "hello"), ("LMKD_VICTIM_COMM", "a\nb"), ("EMPTY", "")])
    assert data == (b"MESSAGE=hello\n" + b"LMKD_VICTIM_COMM\n" + (3).to_bytes(8, "little") + b"a\nb\n"
                    + b"EMPTY=\n")
    assert decode(data) == [("MESSAGE", b"hello"), ("LMKD_VICTIM_COMM", b"a\nb"), ("EMPTY", b"")]


@pytest.mark.parametrize("name", ["", "_PID", "lower", "MIXED_case", "1ST", "A-B", "A=B", "A\nB", "X" * 65, "É"])
def test_field_names_journald_would_refuse_are_refused(name: str) -> None:
    assert not field_name_ok(name)
    with pytest.raises(ValueError, match="invalid journal field name"):
        encode([(name, "x")])


def test_field_names_journald_accepts() -> None:
    assert all(field_name_ok(n) for n in ("MESSAGE", "LMKD_VICTIM_PID", "A1", "X" * 64, "A_"))


def test_bound_never_splits_a_utf8_sequence() -> None:
    assert bound(b"short", 10) == b"short"
    for text in ("é" * 40, "€" * 40, "😀" * 40, "a" + "😀" * 40):
        data = text.encode()
        for limit in range(3, 40):
            cut = bound(data, limit)
            assert len(cut) <= limit
            assert cut.endswith("…".encode())
            cut.decode("utf-8")  # valid UTF-8: no partial sequence before the ellipsis
            assert text.startswith(cut.decode()[:-1])
    assert bound(b"abcdef", 2) == b""


def test_journal_stream_parsing() -> None:
    assert parse_journal_stream("8:123456") == (8, 123456)
    for bad in ("", "8", "8:", ":1", "a:1", "8:1:2", "-1:2", "8: 1"):
        assert parse_journal_stream(bad) is None, bad


def test_stderr_is_journal_compares_device_and_inode(tmp_path: Path) -> None:
    f = tmp_path / "stream"
    with f.open("w") as out:
        st = os.fstat(out.fileno())
        fd = out.fileno()
        assert journal.stderr_is_journal(fd, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not journal.stderr_is_journal(fd, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not journal.stderr_is_journal(fd, {"JOURNAL_STREAM": f"{st.st_dev + 1}:{st.st_ino}"})
        assert not journal.stderr_is_journal(fd, {})
    assert not journal.stderr_is_journal(fd, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})  # closed fd


# --- the kill entry ---------------------------------------------------------------------------------


def test_kill_entry_over_a_real_socket(receiver: JournalReceiver, new_sender: NewSender) -> None:
    sender = new_sender(str(receiver.path))
    assert sender.kill(record())
    e = receiver.recv()
    assert not e.via_memfd
    assert e["MESSAGE"] == ("killed firefox (pid 1234, 812 MiB) for low_mem_and_thrashing: exit after 41 ms, "
                            "memory back after 120 ms, kernel reap 12 ms")
    assert e["PRIORITY"] == "4"
    assert e["SYSLOG_IDENTIFIER"] == "lmkd-py"
    assert e["MESSAGE_ID"] == journal.KILL_MESSAGE_ID and len(journal.KILL_MESSAGE_ID) == 32
    assert e["LMKD_OUTCOME"] == "killed"
    assert e["LMKD_REASON"] == "low_mem_and_thrashing"
    assert e["LMKD_RECORD_ID"] == "r-1234" and e["LMKD_KILL_ID"] == "k-9"
    assert e["LMKD_VICTIM_PID"] == "1234" and e["LMKD_VICTIM_COMM"] == "firefox"
    assert e["LMKD_VICTIM_UID"] == "1000" and e["LMKD_VICTIM_CGROUP"] == "/user.slice/app.scope"
    assert e["LMKD_VICTIM_RSS_KIB"] == str(812 * 1024) and e["LMKD_VICTIM_OOM_SCORE_ADJ"] == "200"
    assert e["LMKD_KILL_TO_EXIT_MS"] == "41.235"
    assert e["LMKD_KILL_TO_MEM_BACK_MS"] == "120.000"
    assert e["LMKD_REAPER_WORK_MS"] == "3.000" and e["LMKD_EXIT_MMAP_MS"] == "9.000"
    assert e["LMKD_REAP_TOTAL_MS"] == "12.000"
    assert e["LMKD_MRELEASE"] == "ok" and e["LMKD_MRELEASE_WALL_MS"] == "3.500"
    assert e["LMKD_DECISION_LATENCY_MS"] == "1.500" and e["LMKD_PRESSURE_LEVEL"] == "critical"
    assert e["LMKD_KERNEL"] == "6.18.0-test"
    assert "LMKD_ERROR" not in e and "LMKD_KILLER" not in e  # absent values are left out
    assert sender.sent == 1 and sender.failures == 0
    assert not receiver.pending()  # one record, one entry


def test_hostile_comm_and_cmdline_cannot_add_fields_and_are_bounded(
    receiver: JournalReceiver, new_sender: NewSender
) -> None:
    comm = "x\nLMKD_OUTCOME=killed\nPRIORITY=0\nMESSAGE=forged"
    cmdline = "evil\nLMKD_VICTIM_PID=1\n" + "A" * 1_000_000
    sender = new_sender(str(receiver.path))
    assert sender.kill(record(outcome=Outcome.DRY_RUN, dry_run=True,
                              victim=Victim(pid=77, comm=comm, cmdline=cmdline, rss_kib=100)))
    e = receiver.recv()
    names = [n for n, _ in e.fields]
    assert len(names) == len(set(names)), names  # nothing was added by the values
    assert e["LMKD_OUTCOME"] == "dry_run" and e["PRIORITY"] == "5" and e["LMKD_VICTIM_PID"] == "77"
    # Kept raw (binary form), but bounded.
    assert e.all("LMKD_VICTIM_COMM")[0] == bound(comm.encode(), journal.MAX_COMM_BYTES)
    raw_cmdline = e.all("LMKD_VICTIM_CMDLINE")[0]
    assert raw_cmdline.startswith(b"evil\nLMKD_VICTIM_PID=1\n") and len(raw_cmdline) <= journal.MAX_TEXT_BYTES
    # The person-readable line is one line, the name escaped.
    assert "\n" not in e["MESSAGE"] and e["MESSAGE"].startswith("would kill x\\nLMKD_OUTCOME=")


def test_messages_for_every_outcome() -> None:
    assert describe(record(outcome=Outcome.EXIT_TIMEOUT, exit_timeout_ns=2_000_000_000)) == (
        "killed firefox (pid 1234, 812 MiB) for low_mem_and_thrashing, but it did not exit within 2000 ms")
    assert describe(record(outcome=Outcome.GONE)).startswith("firefox (pid 1234, 812 MiB) was gone")
    assert describe(record(outcome=Outcome.REFUSED_IDENTITY)) == "did not kill pid 1234: it is no longer firefox"
    assert describe(record(outcome=Outcome.SIGNAL_FAILED, error="EPERM: operation not permitted")) == (
        "failed to kill firefox (pid 1234, 812 MiB) for low_mem_and_thrashing: EPERM: operation not permitted")
    observed = record(outcome=Outcome.OBSERVED, observed=True, pressure=None, kill_to_mem_recovered_ns=None,
                      victim=Victim(pid=5, comm="vic", rss_kib=600),
                      killer=KilledBy(kind="process", pid=42, comm="lmkd"))
    assert describe(observed) == "lmkd (pid 42) killed vic (pid 5, 600 KiB): exit after 41 ms, kernel reap 12 ms"
    oom = dataclasses.replace(observed, killer=KilledBy(kind="kernel_oom"))
    assert describe(oom).startswith("the kernel's OOM killer killed vic")
    fields = dict(kill_fields(observed))
    assert fields["LMKD_KILLER"] == b"process" and fields["LMKD_KILLER_PID"] == b"42"
    assert fields["PRIORITY"] == "5" and "LMKD_REASON" not in fields
    prio = {o: dict(kill_fields(record(outcome=o)))["PRIORITY"] for o in Outcome}
    assert prio[Outcome.KILLED] == "4" and prio[Outcome.EXIT_TIMEOUT] == prio[Outcome.SIGNAL_FAILED] == "3"


def test_the_daemon_sends_one_entry_per_record_stored(receiver: JournalReceiver, new_sender: NewSender) -> None:
    """Through Daemon._store, as the loop runs it: the record the sink got and the entry agree."""
    d, (clock, _src, _table, _killer, sink) = make()
    d.journal = new_sender(str(receiver.path))
    d.handle([ev(CRIT, clock)])
    (rec,) = sink.records
    e = receiver.recv()
    assert e["LMKD_RECORD_ID"] == rec.record_id and e["LMKD_VICTIM_PID"] == str(rec.victim.pid)
    assert e["LMKD_OUTCOME"] == "killed" and e["LMKD_REASON"] == "psi_critical"
    d.close()


# --- failures stay on the side --------------------------------------------------------------------


def test_no_socket_is_logged_once_and_never_raised(tmp_path: Path, new_sender: NewSender) -> None:
    sender = new_sender(str(tmp_path / "missing.sock"))
    with capture_logs() as logs:
        assert not sender.kill(record())
        assert not sender.kill(record())
    assert sender.failures == 2 and sender.sent == 0
    levels = [(e["event"], e["log_level"]) for e in logs]
    assert levels == [("journal.send_failed", "warning"), ("journal.send_failed", "debug")]
    assert logs[0]["errno"] == 2


def test_a_full_queue_drops_entries_instead_of_blocking(receiver: JournalReceiver, new_sender: NewSender) -> None:
    """The socket is non-blocking: with nobody reading, sends fail with EAGAIN and return at once."""
    sender = new_sender(str(receiver.path))
    with capture_logs() as logs:
        results = [sender.kill(record()) for _ in range(2000)]
    assert any(results) and not all(results)
    assert logs[0]["event"] == "journal.send_failed" and logs[0]["errno"] == 11  # EAGAIN
    assert sum(1 for e in logs if e["log_level"] == "warning") == 1
    while receiver.pending():
        receiver.recv()
    assert sender.kill(record())  # the journal drained: entries go through again


def test_a_record_that_cannot_be_described_is_logged_not_raised(
    receiver: JournalReceiver, new_sender: NewSender
) -> None:
    sender = new_sender(str(receiver.path))
    with capture_logs() as logs:
        assert not sender.kill(object())  # type: ignore[arg-type]
    assert logs[0]["event"] == "journal.send_failed" and "cannot describe" in logs[0]["reason"]


def test_disabled_sender_sends_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(journal.SOCKET_ENV, raising=False)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert not JournalSender.from_env().enabled
    assert not JournalSender.from_env({journal.SOCKET_ENV: ""}).enabled
    assert JournalSender.from_env({journal.SOCKET_ENV: str(tmp_path / "s")}).address == str(tmp_path / "s")
    with (tmp_path / "stream").open("w") as out:
        st = os.fstat(out.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert JournalSender.from_env(env, fd=out.fileno()).address == journal.JOURNAL_SOCKET
    assert not JournalSender(None).kill(record())


def test_an_entry_too_big_for_a_datagram_goes_through_a_sealed_memfd(
    receiver: JournalReceiver, new_sender: NewSender
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
        sndbuf = probe.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)  # a datagram's limit (wmem_default)
    big = [(f"LMKD_TEST_{i}", "v" * 4000) for i in range(sndbuf // 4000 + 10)]
    sender = new_sender(str(receiver.path))
    assert sender.send(big)
    e = receiver.recv()
    assert e.via_memfd
    assert e.fields[: len(big)] == [(n, v.encode()) for n, v in big] and e["SYSLOG_IDENTIFIER"] == "lmkd-py"
    assert sender.send([("MESSAGE", "small again")])
    assert not receiver.recv().via_memfd


# --- log.py: the <N> prefixes -----------------------------------------------------------------------


def test_priority_prefix_per_level() -> None:
    out = io.StringIO()
    logsetup.configure("json", "debug", stream=out, journal=True)
    try:
        log = structlog.get_logger()
        log.debug("a")
        log.info("b")
        log.warning("c")
        log.error("d")
        log.critical("e")
        try:
            raise RuntimeError("x")
        except RuntimeError:
            log.exception("f")
    finally:
        structlog.reset_defaults()
    lines = out.getvalue().splitlines()
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>", "<2>", "<3>"]
    assert [json.loads(line[3:])["event"] for line in lines] == ["a", "b", "c", "d", "e", "f"]


def test_no_prefix_off_the_journal() -> None:
    out = io.StringIO()
    logsetup.configure("json", "info", stream=out)  # a StringIO has no fd: never the journal
    try:
        structlog.get_logger().warning("w")
    finally:
        structlog.reset_defaults()
    assert json.loads(out.getvalue())["event"] == "w"


def test_the_message_escapes_what_could_forge_or_hide_text() -> None:
    assert journal.readable("firefox", 64) == "firefox"
    assert journal.readable("a\nb\r\tc\x1b[2J\x7f", 64) == "a\\nb\\r\\tc\\x1b[2J\\x7f"
    assert journal.readable("evil\u202egnp.exe\u200b", 64) == "evil\\u202egnp.exe\\u200b"  # bidi, zero-width
    assert journal.readable("x\udc80y\u2028", 64) == "x\\udc80y\\u2028"  # lone surrogate, line separator
    assert journal.readable("ünïcödé 名前", 64) == "ünïcödé 名前"  # any script is kept
    assert journal.readable("a" * 100, 10) == "a" * 10 + "…"
