"""structlog configuration: JSON lines (journald- and collector-friendly) or console rendering on a TTY.

The only module that configures logging; every other module just calls ``structlog.get_logger()``.
When the stream is systemd's journal stream (``$JOURNAL_STREAM``, see ``journal.stderr_is_journal``),
each line starts with its syslog priority (``<4>`` for a warning), which journald takes as the entry's
priority and strips: ``journalctl -p warning`` then finds the warnings.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

from lmkd_py.journal import stderr_is_journal, syslog_priority
from lmkd_py.text import printable

LogFormat = Literal["auto", "json", "console"]


def configure(
    fmt: LogFormat = "auto", level: str = "info", stream: TextIO | None = None, journal: bool | None = None
) -> None:
    """Set up structlog for the process. ``auto`` renders for humans on a TTY, JSON elsewhere.

    ``journal``: prefix each line with its syslog priority; None (the default) does so when the stream
    is the journal stream systemd connected. Raises ValueError for an unknown level name.
    """
    out = stream if stream is not None else sys.stderr
    if journal is None:
        journal = _is_journal(out)
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    use_console = fmt == "console" or (fmt == "auto" and out.isatty())
    # JSON escapes control characters itself; the console renderer prints strings raw, so they are
    # escaped first (values often come from processes: comm, cmdline, cgroup paths).
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer(colors=out.isatty()) if use_console else structlog.processors.JSONRenderer()
    )
    if journal:
        renderer = PriorityPrefix(renderer)
    tail: list[structlog.typing.Processor] = [escape_control_chars, renderer] if use_console else [renderer]
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


class PriorityPrefix:
    """structlog renderer wrapper: the rendered line with sd-daemon(3)'s ``<N>`` in front, N the syslog
    priority of the entry's level (``journal.PRIORITIES``). Only the first line of a multi-line entry
    (a console traceback) carries it; JSON lines are single lines."""

    def __init__(self, render: structlog.typing.Processor) -> None:
        self._render = render

    def __call__(self, logger: WrappedLogger, method: str, event_dict: EventDict) -> str:
        level = event_dict.get("level")
        prefix = f"<{syslog_priority(level if isinstance(level, str) else method)}>"
        line = self._render(logger, method, event_dict)
        return prefix + (line.decode("utf-8", "replace") if isinstance(line, bytes) else str(line))


def _is_journal(out: TextIO) -> bool:
    try:
        fd = out.fileno()
    except (OSError, ValueError):  # io.StringIO, a closed stream: not the journal
        return False
    return stderr_is_journal(fd)
