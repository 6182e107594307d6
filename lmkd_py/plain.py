"""Dataclasses as JSON-ready builtins, as pydantic dumps the same classes in JSON mode.

The one conversion the records writer (records.record_json) and the config digest (Config.digest) share,
so that both write what pydantic's serializer of their classes would, without loading pydantic: fields in
declaration order, tuples as lists, enums as their values, paths as strings, NaN and infinities as null.
Tests hold both equal to pydantic's own output (tests/unit/test_records.py, tests/unit/test_config.py).
"""

from __future__ import annotations

import dataclasses
import math
from enum import Enum
from pathlib import PurePath
from typing import Any


def plain(value: Any) -> Any:
    """``value`` with every dataclass, tuple, enum and path in it turned into JSON builtins."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, PurePath):
        return str(value)
    return value
