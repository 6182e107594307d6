"""The tracing family's public face: the kernel's own timeline of each kill, from tracefs and the proc
connector. Kill mode opens a tracer (``open_tracer``); observe mode builds its instances from the same
parts (``RawInstance``, ``ProcConnector``, ``TraceEvent``, ``exit_mmap_span``), entered only here.

Private modules: ``tracer`` (open a tracer; find or mount tracefs — the one locator, honouring
``$LMKD_PY_TRACEFS``), ``instance`` (the kill windows), ``raw`` (make, read and remove an instance),
``ringbuf`` (decode binary ring-buffer pages), ``timeline`` (events -> ``KernelTimeline``),
``connector`` (the proc connector over a plain netlink socket).
"""

from __future__ import annotations

from lmkd_py.tracing.connector import ProcConnector, ProcExit
from lmkd_py.tracing.instance import TracefsTracer, parse_kernel_version
from lmkd_py.tracing.raw import INSTANCE_PREFIX, RawInstance, RawPage, TracingUnavailable, remove_stale_instances
from lmkd_py.tracing.ringbuf import TraceEvent
from lmkd_py.tracing.timeline import exit_mmap_span, reap_total_ns
from lmkd_py.tracing.tracer import DEFAULT_ROOTS, TRACEFS_ENV, NullTracer, find_tracefs, open_tracer

__all__ = [
    "DEFAULT_ROOTS",
    "INSTANCE_PREFIX",
    "TRACEFS_ENV",
    "NullTracer",
    "ProcConnector",
    "ProcExit",
    "RawInstance",
    "RawPage",
    "TraceEvent",
    "TracefsTracer",
    "TracingUnavailable",
    "exit_mmap_span",
    "find_tracefs",
    "open_tracer",
    "parse_kernel_version",
    "reap_total_ns",
    "remove_stale_instances",
]
