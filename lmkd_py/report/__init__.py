"""The report family's public face: ``lmkd-py report``, ``lmkd-py compare`` and ``lmkd-py trace-export``.

Free of numpy, scipy and matplotlib at import (a daemon installed without the ``report`` extra still
imports lmkd_py); the commands load them when they run. Private modules: ``cli`` (the commands),
``data`` (records -> columns), ``stats`` (groups, bootstrap, tests), ``render`` (text, markdown,
JSON), ``plots`` (PNG), ``synth`` (synthetic records for tests and benchmarks), ``trace`` (``lmkd-py
trace-export``: each kill's timeline as Chrome/Perfetto trace-event JSON; no numpy).
"""

from __future__ import annotations

from lmkd_py.report.cli import cmd_compare, cmd_report, missing_extra
from lmkd_py.report.trace import add_arguments as add_trace_export_arguments
from lmkd_py.report.trace import cmd_trace_export

__all__ = ["add_trace_export_arguments", "cmd_compare", "cmd_report", "cmd_trace_export", "missing_extra"]
