"""The stress family's public face: victims with a chosen memory shape, and memcg-limited pressure.

Private modules: ``spec`` (what a victim is, scenarios; pure), ``proc`` (the child processes),
``cgroup`` (the pressure cgroup), ``child`` (the program a child runs, never imported), ``replay`` (a
replica of a captured memory shape), ``cli`` (the ``lmkd-py stress`` command).
"""

from __future__ import annotations

from lmkd_py.stress.cgroup import PressureCgroup, parse_oom_control
from lmkd_py.stress.cli import SCENARIOS, StressOptions, cmd_stress, options_from_args
from lmkd_py.stress.proc import Region, StressChildError, StressVictim, Thrasher, spawn_victim, start_thrasher
from lmkd_py.stress.replay import ShapeVictim, spawn_shape_victim
from lmkd_py.stress.spec import KindPlan, VictimSpec, expected_rss_kib, plan_layout, scenario_specs

__all__ = [
    "SCENARIOS",
    "KindPlan",
    "PressureCgroup",
    "Region",
    "ShapeVictim",
    "StressChildError",
    "StressOptions",
    "StressVictim",
    "Thrasher",
    "VictimSpec",
    "cmd_stress",
    "expected_rss_kib",
    "options_from_args",
    "parse_oom_control",
    "plan_layout",
    "scenario_specs",
    "spawn_shape_victim",
    "spawn_victim",
    "start_thrasher",
]
