"""``python -m lmkd_py.lab ...``: the lab command until ``lmkd-py lab`` is wired into the CLI."""

from __future__ import annotations

import sys

from lmkd_py.lab.cli import main

sys.exit(main())
