"""The report family's public face: ``lmkd-py report`` and ``lmkd-py compare``.

Free of numpy, scipy and matplotlib at import (a daemon installed without the ``report`` extra still
imports lmkd_py); the commands load them when they run. Private modules: ``cli`` (the commands),
``data`` (records -> columns), ``stats`` (groups, bootstrap, tests), ``render`` (text, markdown,
JSON), ``plots`` (PNG), ``synth`` (synthetic records for tests and benchmarks).
"""

from __future__ import annotations

from lmkd_py.report.cli import cmd_compare, cmd_report, missing_extra

__all__ = ["cmd_compare", "cmd_report", "missing_extra"]
