from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from lmkd_py.config import Level
from lmkd_py.procfs import Psi, PsiLine
from lmkd_py.psi import PollingSource, adapt_window, has_cap_sys_resource


class FakeClock:
    def __init__(self, t: int = 1_000_000_000_000) -> None:
        self.t = t

    def __call__(self) -> int:
        return self.t

    def advance(self, ns: int) -> None:
        self.t += ns


@pytest.mark.parametrize(
    ("threshold", "window", "expected"),
    [
        (150_000, 1_000_000, (300_000, 2_000_000)),
        (500_000, 2_000_000, (500_000, 2_000_000)),
        (300_000, 3_000_000, (400_000, 4_000_000)),  # 3 s rounds to 4 s (round half to even: 1.5 -> 2)
        (100_000, 500_000, (400_000, 2_000_000)),
        (1_000_000, 9_500_000, (1_052_632, 10_000_000)),
    ],
)
def test_adapt_window_keeps_ratio(threshold: int, window: int, expected: tuple[int, int]) -> None:
    t, w = adapt_window(threshold, window)
    assert (t, w) == expected
    assert w % 2_000_000 == 0 and w <= 10_000_000 and t <= w
    assert abs(t / w - threshold / window) < 1e-6


def test_cap_detection_reads_capeff(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapEff:\t000001fffeffffff\n")
    assert not has_cap_sys_resource(status)  # bit 24 clear, as on this project's machines
    status.write_text("CapEff:\t000001ffffffffff\n")
    assert has_cap_sys_resource(status)


def psi(some_total: int, full_total: int = 0, some_avg10: float = 0.0) -> Psi:
    return Psi(some=PsiLine(some_avg10, 0, 0, some_total), full=PsiLine(0, 0, 0, full_total))


def test_polling_fires_on_total_growth_once_per_window(tmp_path: Path) -> None:
    clock = FakeClock()
    lv = Level(name="medium", stall="some", threshold_us=200_000, window_us=2_000_000, min_oom_score_adj=0)
    src = PollingSource(tmp_path / "unused", [lv], 500_000_000, clock=clock)
    total = 1000
    fired = []
    for _ in range(20):  # 10 s at a 500 ms period, stalling 60 ms of every 500 ms: 240 ms per 2 s window
        fired.append(bool(src.evaluate(psi(total), clock())))
        clock.advance(500_000_000)
        total += 60_000
    times = [i for i, f in enumerate(fired) if f]
    assert times, "a 12% stall against a 10% threshold must fire"
    assert all(b - a >= 4 for a, b in itertools.pairwise(times)), "at most once per 2 s window"


def test_polling_quiet_below_threshold(tmp_path: Path) -> None:
    clock = FakeClock()
    lv = Level(name="medium", stall="some", threshold_us=200_000, window_us=2_000_000, min_oom_score_adj=0)
    src = PollingSource(tmp_path / "unused", [lv], 500_000_000, clock=clock)
    total = 0
    for _ in range(20):
        assert src.evaluate(psi(total), clock()) == []
        clock.advance(500_000_000)
        total += 20_000  # 80 ms per 2 s: 4 %, below 10 %


def test_polling_full_line_and_avg10(tmp_path: Path) -> None:
    clock = FakeClock()
    crit = Level(name="critical", stall="full", threshold_us=100_000, window_us=2_000_000, min_oom_score_adj=0)
    avg = Level(name="avg", stall="some", threshold_us=2_000_000, window_us=2_000_000, min_oom_score_adj=900,
                poll_avg10_pct=30.0)
    src = PollingSource(tmp_path / "unused", [crit, avg], 1_000_000_000, clock=clock)
    assert src.evaluate(psi(0, 0), clock()) == []
    clock.advance(1_000_000_000)
    got = src.evaluate(psi(0, 150_000, some_avg10=35.0), clock())
    assert sorted(e.level.name for e in got) == ["avg", "critical"]
    assert all(e.mechanism == "poll" for e in got)


class QuietSource:
    description = "quiet"

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.waited: list[int | None] = []
        self.closed = False

    def wait(self, timeout_ns: int | None) -> list[object]:
        self.waited.append(timeout_ns)
        if timeout_ns:
            self.clock.advance(timeout_ns)
        return []

    def read(self) -> None:
        return None

    def close(self) -> None:
        self.closed = True


