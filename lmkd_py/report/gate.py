"""``compare --fail-if 'reap_total:+5%'``: a gate for kernel CI (no numpy).

A gate names a metric and a signed threshold, relative (``%`` of A's median) or in the metric's own unit
(``ms``, ``MiB``...). It fails when the 95 % CI of the difference B - A lies entirely beyond the
threshold: above a positive one (``reap_total:+5%``: B is, with confidence, more than 5 % slower than A,
the regression check), below a negative one (``reap_total:-5%``: B is surely more than 5 % faster). A
difference without a CI (too few values) never fails a gate: there is no confidence to act on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lmkd_py.text import printable

_GATE = re.compile(r"\s*([A-Za-z0-9_.]+)\s*:\s*([+-])\s*(\d+(?:\.\d+)?)\s*(%|[A-Za-z/]+)\s*")


class GateError(ValueError):
    """A --fail-if that cannot be used; the message says why."""


@dataclass(frozen=True)
class Gate:
    metric: str
    threshold: float  # signed
    unit: str  # "%" or the metric's unit

    @property
    def text(self) -> str:
        return f"{self.metric}:{self.threshold:+g}{self.unit}"


def parse(spec: str) -> Gate:
    """``METRIC:+N%`` or ``METRIC:-N<unit>``. Raises GateError."""
    m = _GATE.fullmatch(spec)
    if not m:
        raise GateError(f"--fail-if {printable(spec)!r}: write METRIC:+N% or METRIC:+N<unit>, e.g. 'reap_total:+5%'")
    sign = -1.0 if m.group(2) == "-" else 1.0
    return Gate(m.group(1), sign * float(m.group(3)), m.group(4))


@dataclass(frozen=True)
class Verdict:
    gate: Gate
    failed: bool
    line: str


def judge(gate: Gate, name: str, unit: str, value: float | None, ci: tuple[float | None, float | None]) -> Verdict:
    """Whether ``gate`` fails on a difference ``value`` (in ``gate.unit``) with 95 % CI ``ci``."""
    lo, hi = ci
    shown = "unknown" if value is None else f"{value:+.3g}{gate.unit}"
    if lo is None or hi is None:
        return Verdict(gate, False, f"{name} {shown} (no CI: too few values) does not fail {gate.text}")
    span = f"[95% CI {lo:+.3g}{gate.unit}, {hi:+.3g}{gate.unit}]"
    beyond = lo > gate.threshold if gate.threshold >= 0 else hi < gate.threshold
    word = "lies entirely beyond" if beyond else "does not lie entirely beyond"
    return Verdict(gate, beyond, f"{name} {shown} {span} {word} {gate.text}")


def summary(verdicts: list[Verdict]) -> str:
    """The verdict line: FAIL or PASS, then each gate's reason."""
    failed = [v for v in verdicts if v.failed]
    head = f"FAIL ({len(failed)} of {len(verdicts)} gates)" if failed else f"PASS ({len(verdicts)} gates)"
    return head + ": " + "; ".join(v.line for v in verdicts)
