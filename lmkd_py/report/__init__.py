"""The report family's public face: ``lmkd-py report``, ``lmkd-py compare`` and ``lmkd-py trace-export``.

Free of numpy, scipy and matplotlib at import (a daemon installed without the ``report`` extra still
imports lmkd_py); the commands load them when they run. Private modules: ``cli`` (the commands),
``sources`` (files, directories, globs, gzip/zstd; no numpy), ``data`` (records -> columns), ``stats``
(groups, bootstrap, tests), ``cluster`` and ``fleetstats`` (histograms, the cluster bootstrap over boards,
--paired), ``schema`` and ``export`` (the Parquet dataset), ``columnar`` (report and compare on it through
DuckDB), ``gate`` (--fail-if), ``render`` (text, markdown, JSON), ``plots`` (PNG), ``synth`` (synthetic
records for tests and benchmarks), ``trace`` (``lmkd-py trace-export``: each kill's timeline as
Chrome/Perfetto trace-event JSON; no numpy).
"""

from __future__ import annotations

from lmkd_py.report.cli import cmd_compare, cmd_export, cmd_report, missing_extra
from lmkd_py.report.trace import add_arguments as add_trace_export_arguments
from lmkd_py.report.trace import cmd_trace_export

__all__ = ["add_trace_export_arguments", "cmd_compare", "cmd_export", "cmd_report", "cmd_trace_export", "missing_extra"]
