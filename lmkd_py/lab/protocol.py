"""The console protocol between the lab's host and its guest, in one place for both sides.

Every line the guest program emits is ``@LMKDLAB@ <kind> <json>`` (one ``write`` per line, JSON in
ASCII); the host's parser ignores every other console line. ``inguest`` and ``peers`` emit through an
``Emit``; ``run`` parses with ``parse_marker``; ``guest`` writes the marker into the init script.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, Final

MARKER: Final = "@LMKDLAB@"
Emit = Callable[[str, dict[str, Any]], None]


def emit_line(kind: str, obj: dict[str, Any], fd: int = 1) -> None:
    """Write one marker line to ``fd`` in as few writes as the kernel allows (one, for a tty)."""
    data = f"{MARKER} {kind} {json.dumps(obj, separators=(',', ':'), ensure_ascii=True)}\n".encode()
    while data:
        n = os.write(fd, data)
        data = data[n:]


def parse_marker(line: str) -> tuple[str, dict[str, Any]] | None:
    """``(kind, object)`` of a guest marker line, None for any other console line. The marker may
    follow other text on the line (a console that was mid-line). Raises ValueError for a marker line
    whose JSON is damaged."""
    at = line.find(MARKER)
    if at < 0:
        return None
    kind, _, payload = line[at + len(MARKER) :].strip().partition(" ")
    if not kind:
        raise ValueError("marker without a kind")
    obj = json.loads(payload) if payload else {}
    if not isinstance(obj, dict):
        raise ValueError(f"{kind}: payload is not a JSON object")
    return kind, obj
