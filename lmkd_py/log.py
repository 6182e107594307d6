"""structlog configuration: JSON lines (journald- and collector-friendly) or console rendering on a TTY.

The only module that configures logging; every other module just calls ``structlog.get_logger()``.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

import structlog
from structlog.typing import EventDict

from lmkd_py.text import printable

LogFormat = Literal["auto", "json", "console"]


def configure(fmt: LogFormat = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Set up structlog for the process. ``auto`` renders for humans on a TTY, JSON elsewhere.

    Raises ValueError for an unknown level name.
    """
    out = stream if stream is not None else sys.stderr
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    use_console = fmt == "console" or (fmt == "auto" and out.isatty())
    # JSON escapes control characters itself; the console renderer prints strings raw, so they are
    # escaped first (values often come from processes: comm, cmdline, cgroup paths).
    tail: list[structlog.typing.Processor] = (
        [escape_control_chars, structlog.dev.ConsoleRenderer(colors=out.isatty())]
        if use_console
        else [structlog.processors.JSONRenderer()]
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            *tail,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )


def escape_control_chars(_logger: object, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: every string value (the event too) with control characters escaped
    (``text.printable``), so a process named ``\x1b[2J`` or ``x\nfake line`` cannot clear the screen or
    forge a log line. A formatted traceback keeps its newlines. Values that are not strings are shown
    through repr() by the console renderer, which escapes them already."""
    for key, value in event_dict.items():
        if isinstance(value, str):
            event_dict[key] = printable(value, keep_newlines=key == "exception")
    return event_dict
