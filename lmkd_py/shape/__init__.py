"""The shape family's public face: a real process's memory shape, captured from /proc and compared.

Private modules: ``model`` (the shape and its file format; the reader treats files as untrusted),
``smaps`` (pure smaps/mountinfo parsers and the VMA classes), ``capture`` (reading /proc, shape files,
this machine's facts), ``plan`` (scaling and the replica's plan; pure), ``compare`` (fidelity; pure),
``cli`` (``lmkd-py shape``). Replaying a shape is the stress family's (``lmkd-py stress --shape``).
Nothing here is imported by the daemon.
"""

from __future__ import annotations

from lmkd_py.shape.capture import CATALOG, CaptureError, capture, find_shape, read_shape, this_machine, write_shape
from lmkd_py.shape.cli import add_shape_arguments, cmd_shape
from lmkd_py.shape.compare import ClassFidelity, compare, format_table, within
from lmkd_py.shape.model import (
    CLASSES,
    MAPPED_CLASSES,
    Shape,
    ShapeError,
    ShapeProvenance,
    ShapeVma,
    dumps,
    loads,
    shape_from_dict,
    shape_to_dict,
)
from lmkd_py.shape.plan import Machine, Target, check_fits, replay_plan, target_for
from lmkd_py.shape.smaps import SmapsVma, classify, parse_mountinfo_devices, parse_smaps

__all__ = [
    "CATALOG",
    "CLASSES",
    "MAPPED_CLASSES",
    "CaptureError",
    "ClassFidelity",
    "Machine",
    "Shape",
    "ShapeError",
    "ShapeProvenance",
    "ShapeVma",
    "SmapsVma",
    "Target",
    "add_shape_arguments",
    "capture",
    "check_fits",
    "classify",
    "cmd_shape",
    "compare",
    "dumps",
    "find_shape",
    "format_table",
    "loads",
    "parse_mountinfo_devices",
    "parse_smaps",
    "read_shape",
    "replay_plan",
    "shape_from_dict",
    "shape_to_dict",
    "target_for",
    "this_machine",
    "within",
    "write_shape",
]
