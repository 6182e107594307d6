"""The observe family's public face: record the reap latency of kills lmkd-py did not make; never kills.

Private modules: ``loop`` (the loop and the command), ``trace`` (its two tracefs instances and the proc
connector), ``track`` (events -> kills), ``record`` (kills -> records), ``procs`` (/proc reads).
Observe mode uses ``lmkd_py.tracing`` through its face and nothing of kill mode (daemon, killer,
candidates, service): a check in tests/unit/test_layering.py holds that.
"""

from __future__ import annotations

from lmkd_py.observe.loop import cmd_observe, run_observe, serve

__all__ = ["cmd_observe", "run_observe", "serve"]
