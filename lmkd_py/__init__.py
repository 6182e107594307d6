"""lmkd-py: a userspace low-memory killer that measures reap latency per kill."""

from __future__ import annotations

__version__ = "0.1.0"
