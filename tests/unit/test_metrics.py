"""The node_exporter textfile (lmkd_py/metrics.py), read back the way Prometheus reads it: with
prometheus_client's own parser (a test-only dependency; the daemon writes the text by hand)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from lmkd_py.config import Config, ConfigError, MetricsConfig, parse_config
from lmkd_py.metrics import BUCKETS_S, Metrics, escape_label
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
from tests.unit.test_daemon_loop import CRIT, ev, make

KREL = "6.18.0-test"


def rec(
    outcome: Outcome = Outcome.KILLED,
    *,
    reason: str | None = "psi_critical",
    exit_ns: int | None = 3_000_000,
    mem_ns: int | None = 4_000_000,
    wall_ns: int | None = 2_000_000,
    status: MreleaseStatus = MreleaseStatus.OK,
    kernel: KernelTimeline | None = None,
    krel: str | None = KREL,
    dry_run: bool = False,
    killer: KilledBy | None = None,
) -> KillRecord:
    sent = None if outcome in (Outcome.DRY_RUN, Outcome.GONE) else 100
    return KillRecord(
        record_id="r", wall_time="2026-03-01T12:00:00.000000+00:00", outcome=outcome, dry_run=dry_run,
        observed=outcome is Outcome.OBSERVED, victim=Victim(pid=42, comm='evil"\n\\name'),
        steps=Steps(start_ns=0, signal_sent_ns=sent, end_ns=10**9),
        mrelease=Mrelease(status=status, wall_ns=wall_ns), kill_to_exit_ns=exit_ns, kill_to_mem_recovered_ns=mem_ns,
        pressure=Pressure(kill_reason=reason, some_avg10=12.5, full_avg10=3.0) if reason else None,
        kernel=kernel, killer=killer, provenance=Provenance(kernel_release=krel),
    )


def families(path: Path) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """name -> {sorted labels -> value} for every sample, as Prometheus parses the file."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(path.read_text()):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def metrics(path: Path | None, **kw: object) -> Metrics:
    return Metrics(path, mode="kill", version="9.9", kernel_release=KREL, wall=lambda: 1_700_000_000.5,
                   **kw)  # type: ignore[arg-type]


def test_records_fed_are_what_prometheus_reads(tmp_path: Path) -> None:
    prom = tmp_path / "lmkd_py.prom"
    m = metrics(prom)
    tl = KernelTimeline(reaper_work_ns=1_500_000, exit_mmap_ns=20_000_000, reap_total_ns=21_500_000)
    m.record(rec(kernel=tl))
    m.record(rec(exit_ns=7_000_000_000, mem_ns=None, wall_ns=50_000))  # slow exit, memory never back
    m.record(rec(status=MreleaseStatus.ALREADY_RELEASED, wall_ns=9_000, kernel=tl), stored=False)
    m.record(rec(Outcome.DRY_RUN, dry_run=True, exit_ns=None, mem_ns=None, wall_ns=None))
    m.record(rec(Outcome.OBSERVED, reason=None, killer=KilledBy(kind="kernel_oom"), exit_ns=1_000_000,
                 mem_ns=None, wall_ns=None, status=MreleaseStatus.NOT_ATTEMPTED, krel="5.15.0-other"))
    f = families(prom)
    k = {"kernel_release": KREL}

    def at(name: str, **labels: str) -> float:
        return f[name][tuple(sorted(labels.items()))]

    assert at("lmkd_py_up") == 1 and at("lmkd_py_start_time_seconds") == 1_700_000_000.5
    assert at("lmkd_py_build_info", version="9.9", mode="kill") == 1
    assert at("lmkd_py_kills_total", outcome="killed", reason="psi_critical", **k) == 3
    assert at("lmkd_py_kills_total", outcome="dry_run", reason="psi_critical", **k) == 1
    assert at("lmkd_py_kills_total", outcome="observed", reason="kernel_oom", kernel_release="5.15.0-other") == 1
    assert at("lmkd_py_records_dropped_total") == 1
    # kill -> exit: 3 ms, 7 s, 3 ms on this kernel (the dry run has none); 1 ms on the other
    assert at("lmkd_py_kill_to_exit_seconds_count", **k) == 3
    assert at("lmkd_py_kill_to_exit_seconds_sum", **k) == pytest.approx(7.006)
    assert at("lmkd_py_kill_to_exit_seconds_bucket", le="0.0025", **k) == 0
    assert at("lmkd_py_kill_to_exit_seconds_bucket", le="0.005", **k) == 2
    assert at("lmkd_py_kill_to_exit_seconds_bucket", le="5.0", **k) == 2
    assert at("lmkd_py_kill_to_exit_seconds_bucket", le="10.0", **k) == 3
    assert at("lmkd_py_kill_to_exit_seconds_bucket", le="+Inf", **k) == 3
    assert at("lmkd_py_kill_to_exit_seconds_count", kernel_release="5.15.0-other") == 1
    assert at("lmkd_py_kill_to_memory_back_seconds_count", **k) == 2
    # process_mrelease wall: the ESRCH call reaped nothing and is left out, as report does
    assert at("lmkd_py_mrelease_wall_seconds_count", **k) == 2
    assert at("lmkd_py_mrelease_wall_seconds_sum", **k) == pytest.approx(0.00205)
    assert at("lmkd_py_kernel_reaper_work_seconds_count", **k) == 1
    assert at("lmkd_py_kernel_exit_mmap_seconds_count", **k) == 2
    assert at("lmkd_py_kernel_reap_total_seconds_sum", **k) == pytest.approx(0.043)
    assert at("lmkd_py_memory_pressure_avg10_ratio", line="some") == 0.125
    assert at("lmkd_py_memory_pressure_avg10_ratio", line="full") == 0.03
    assert at("lmkd_py_last_kill_timestamp_seconds") == pytest.approx(1772366400.0)
    # every bucket series is cumulative and ends at the count
    for name in ("lmkd_py_kill_to_exit_seconds", "lmkd_py_kernel_exit_mmap_seconds"):
        buckets = [at(f"{name}_bucket", le=le, **k) for le in [*(repr(b) for b in BUCKETS_S), "+Inf"]]
        assert buckets == sorted(buckets) and buckets[-1] == at(f"{name}_count", **k)
    text = prom.read_text()
    assert "evil" not in text, "a process name must never reach a label"
    assert stat.S_IMODE(prom.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["lmkd_py.prom"], "no temporary file is left"


def test_histograms_show_at_zero_before_any_kill_and_up_is_0_after_stop(tmp_path: Path) -> None:
    prom = tmp_path / "lmkd_py.prom"
    m = metrics(prom)
    assert m.write()
    f = families(prom)
    assert f["lmkd_py_kernel_reap_total_seconds_count"] == {(("kernel_release", KREL),): 0}
    assert "lmkd_py_kills_total" not in f and "lmkd_py_last_kill_timestamp_seconds" not in f
    inode = prom.stat().st_ino
    m.stop()
    assert families(prom)["lmkd_py_up"] == {(): 0}
    assert prom.stat().st_ino != inode, "replaced by rename, never rewritten in place"


def test_label_values_are_escaped(tmp_path: Path) -> None:
    nasty = 'a"b\\c\nd} 1\nlmkd_py_up 0'
    assert escape_label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    prom = tmp_path / "lmkd_py.prom"
    m = metrics(prom)
    m.record(rec(reason=nasty, krel=nasty))
    f = families(prom)
    assert f["lmkd_py_up"] == {(): 1}
    ((labels, n),) = f["lmkd_py_kills_total"].items()
    assert dict(labels) == {"outcome": "killed", "reason": nasty, "kernel_release": nasty} and n == 1


def test_pressure_events_and_the_slow_rewrite(tmp_path: Path) -> None:
    prom = tmp_path / "lmkd_py.prom"
    now = [0]
    psi: list[tuple[float | None, float | None] | None] = [(40.0, None)]
    m = metrics(prom, clock=lambda: now[0], period_ns=30_000_000_000, read_pressure=lambda: psi[0])
    assert m.due_in(0) == 0
    m.pressure_event("critical", 55.0, 20.0)
    m.pressure_event("critical", 55.0, 20.0)
    m.pressure_event("low", 1.0, None)
    m.tick(0)  # due: writes, with the PSI read now (some only: full keeps the event's value)
    f = families(prom)
    assert f["lmkd_py_pressure_events_total"] == {(("level", "critical"),): 2, (("level", "low"),): 1}
    assert f["lmkd_py_memory_pressure_avg10_ratio"] == {(("line", "full"),): 0.2, (("line", "some"),): 0.4}
    assert f["lmkd_py_last_pressure_event_timestamp_seconds"] == {(): 1_700_000_000.5}
    assert m.writes == 1 and m.due_in(0) == 30_000_000_000
    now[0] = 29_999_999_999
    m.tick(now[0])
    assert m.writes == 1
    now[0] = 30_000_000_000
    psi[0] = None  # unreadable: the last values stay
    m.tick(now[0])
    assert m.writes == 2 and families(prom)["lmkd_py_memory_pressure_avg10_ratio"][(("line", "some"),)] == 0.4


def test_off_writes_nothing(tmp_path: Path) -> None:
    m = metrics(None)
    m.record(rec())
    m.tick(0)
    m.stop()
    assert m.due_in(0) is None and m.writes == 0 and m.kills


# (A read-only directory is not a case here: the tests run as root, which writes into a 0555 directory.)
@pytest.mark.parametrize("case", ["missing", "insecure", "name_is_a_directory"])
def test_an_unwritable_path_is_logged_once_and_retried(tmp_path: Path, case: str) -> None:
    d = tmp_path / "textfile"
    if case == "insecure":
        d.mkdir()
        d.chmod(0o777)
    elif case == "name_is_a_directory":
        d.mkdir()
    prom = d / "lmkd_py.prom"
    if case == "name_is_a_directory":
        prom.mkdir()
    m = metrics(prom)
    with capture_logs() as logs:
        m.record(rec())
        m.record(rec())
        m.tick(10**15)
    failed = [e for e in logs if e["event"] == "metrics.write_failed"]
    assert len(failed) == 1, logs
    assert failed[0]["path"] == str(prom) and failed[0]["insecure"] is (case == "insecure")
    assert str(d) in failed[0]["error"] or "writable" in failed[0]["error"] or "directory" in failed[0]["error"]
    assert not prom.is_file() and m.writes == 0
    if d.exists():
        assert [p.name for p in d.iterdir()] == (["lmkd_py.prom"] if prom.exists() else []), "no temporary file left"
    # fixed: the next write succeeds, says so once, and carries everything counted meanwhile
    if prom.is_dir():
        prom.rmdir()
    d.mkdir(exist_ok=True)
    d.chmod(0o755)
    with capture_logs() as logs:
        m.record(rec())
    assert [e["event"] for e in logs] == ["metrics.write_recovered"]
    assert families(prom)["lmkd_py_kills_total"][
        (("kernel_release", KREL), ("outcome", "killed"), ("reason", "psi_critical"))] == 3


def test_a_symlink_at_the_name_is_replaced_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "victim-file"
    target.write_text("precious\n")
    prom = tmp_path / "lmkd_py.prom"
    prom.symlink_to(target)
    assert metrics(prom).write()
    assert target.read_text() == "precious\n" and not prom.is_symlink()


def test_the_daemon_feeds_its_records_and_a_broken_path_costs_no_kill(tmp_path: Path) -> None:
    prom = tmp_path / "missing-dir" / "lmkd_py.prom"
    cfg = Config(metrics=MetricsConfig(textfile=prom))
    d, (clock, _src, _table, killer, sink) = make(cfg=cfg)
    with capture_logs() as logs:
        d.handle([ev(CRIT, clock)])
        d.handle([ev(CRIT, clock)])
    assert len(killer.killed) == 1 and len(sink.records) == 1, "the kill happened"
    assert [e["event"] for e in logs].count("metrics.write_failed") == 1
    prom.parent.mkdir()
    clock.t += 10**12
    d.handle([ev(CRIT, clock)])
    f = families(prom)
    assert sum(f["lmkd_py_kills_total"].values()) == len(sink.records) == 2
    assert f["lmkd_py_pressure_events_total"] == {(("level", "critical"),): 3}
    assert f["lmkd_py_memory_pressure_avg10_ratio"][(("line", "some"),)] == 0.05


def test_config_key() -> None:
    assert Config().metrics.textfile is None
    cfg = parse_config({"metrics": {"textfile": "/var/lib/node_exporter/textfile_collector/lmkd_py.prom"}})
    assert cfg.metrics.textfile == Path("/var/lib/node_exporter/textfile_collector/lmkd_py.prom")
    with pytest.raises(ConfigError, match=r"metrics\.textfile: .*must end in \.prom"):
        parse_config({"metrics": {"textfile": "/tmp/lmkd_py.txt"}})
    with pytest.raises(ConfigError, match=r"metrics\.textfile"):
        parse_config({"metrics": {"textfile": 5}})
    with pytest.raises(ConfigError, match=r"metrics\.period_s: unknown key"):
        parse_config({"metrics": {"period_s": 5}})
