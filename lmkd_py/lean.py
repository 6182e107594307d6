"""What the long-running processes (the daemon, observe mode) do not load although a dependency imports it
or a task seems to need it.

structlog imports asyncio at import time (for its async logging methods, which lmkd-py never calls), and
asyncio imports ssl, socket, selectors, subprocess and concurrent.futures: ~6 MiB resident here (issue 13),
and locked by mlockall, in a process that opens no network socket. ``defer_asyncio`` puts a placeholder in
``sys.modules`` that turns into the real asyncio the first time anything is looked up on it, so nothing
breaks if some code does use it; ``tests/system/test_footprint.py`` checks that the daemon never does.

Called by ``cli.main`` before the daemon or observe mode imports anything else; never at import time.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any


class _Deferred(types.ModuleType):
    """A module that imports the real one on first attribute lookup and stands aside for it."""

    def __getattr__(self, name: str) -> Any:
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        real = importlib.import_module(self.__name__)
        return getattr(real, name)


def defer_asyncio() -> None:
    """Replace a not-yet-imported asyncio with a placeholder; no-op when it is already imported."""
    if "asyncio" not in sys.modules:
        sys.modules["asyncio"] = _Deferred("asyncio")


def asyncio_loaded() -> bool:
    """True when the real asyncio has been imported (for the footprint test and benchmark)."""
    mod = sys.modules.get("asyncio")
    return mod is not None and not isinstance(mod, _Deferred)


def sha256_hex(data: bytes) -> str:
    """SHA-256 of ``data`` in hex, with CPython's own implementation: hashlib would map OpenSSL's
    libcrypto (~3.6 MiB resident here) into the daemon for a digest or two at start (issue 13)."""
    try:
        from _sha2 import sha256  # type: ignore[import-not-found]  # CPython 3.12+
    except ImportError:
        try:
            from _sha256 import sha256  # type: ignore[import-not-found]  # CPython 3.11
        except ImportError:
            from hashlib import sha256
    return str(sha256(data).hexdigest())
