"""Text that came from other processes or from files, made safe to print on a terminal or in a log.

A process names itself (``prctl(PR_SET_NAME)``, argv), and record files are untrusted input: either can
carry ANSI escape sequences (which rewrite the screen, the title bar, or on some terminals worse), a
newline that forges a log line, or bidirectional overrides that make text read differently from what it
is. ``printable`` spells those characters out instead of emitting them.
"""

from __future__ import annotations

from functools import cache

# C0 and C1 controls and DEL; zero-width and bidirectional formatting characters; line/paragraph
# separators; lone surrogates (from ``surrogateescape`` decoding, unprintable in UTF-8); the BOM.
_UNSAFE_RANGES = ((0x00, 0x1F), (0x7F, 0x9F), (0x200B, 0x200F), (0x2028, 0x202E), (0x2066, 0x2069),
                  (0xFEFF, 0xFEFF), (0xD800, 0xDFFF))
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(code: int) -> str:
    named = _NAMED.get(chr(code))
    if named is not None:
        return named
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


# str.translate tables (one pass, linear; no regex engine meets text a process chose). Built on first use:
# ~0.4 MiB that a daemon logging JSON (which escapes by itself) never needs.
@cache
def _tables() -> tuple[dict[int, str], dict[int, str]]:
    table = {c: _escape(c) for lo, hi in _UNSAFE_RANGES for c in range(lo, hi + 1)}
    return table, {c: e for c, e in table.items() if chr(c) not in "\n\t"}


def printable(text: str, *, keep_newlines: bool = False, max_chars: int | None = None) -> str:
    """``text`` with control, formatting and unpaired surrogate characters written as escapes
    (``\\x1b``, ``\\n``, ``\\u202e``); other text, any script, is kept as is.

    ``keep_newlines``: keep ``\\n`` and ``\\t`` (a traceback stays readable). ``max_chars``: cut longer
    text and say by how much, so one label cannot flood a table.
    """
    table, keep_lines = _tables()
    out = text.translate(keep_lines if keep_newlines else table)
    if max_chars is not None and len(out) > max_chars:
        out = f"{out[:max_chars]}…(+{len(out) - max_chars} chars)"
    return out
