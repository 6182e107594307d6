"""Text that came from other processes or from files, made safe to print on a terminal or in a log.

A process names itself (``prctl(PR_SET_NAME)``, argv), and record files are untrusted input: either can
carry ANSI escape sequences (which rewrite the screen, the title bar, or on some terminals worse), a
newline that forges a log line, or bidirectional overrides that make text read differently from what it
is. ``printable`` spells those characters out instead of emitting them.
"""

from __future__ import annotations

import re

# C0 and C1 controls and DEL; zero-width and bidirectional formatting characters; line/paragraph
# separators; lone surrogates (from ``surrogateescape`` decoding, unprintable in UTF-8); the BOM.
_OTHER = "\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff\ud800-\udfff"
_UNSAFE = re.compile(f"[\x00-\x1f{_OTHER}]")
_UNSAFE_KEEP_LINES = re.compile(f"[\x00-\x08\x0b-\x1f{_OTHER}]")  # all but \t and \n
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: re.Match[str]) -> str:
    c = m.group()
    named = _NAMED.get(c)
    if named is not None:
        return named
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, *, keep_newlines: bool = False, max_chars: int | None = None) -> str:
    """``text`` with control, formatting and unpaired surrogate characters written as escapes
    (``\\x1b``, ``\\n``, ``\\u202e``); other text, any script, is kept as is.

    ``keep_newlines``: keep ``\\n`` and ``\\t`` (a traceback stays readable). ``max_chars``: cut longer
    text and say by how much, so one label cannot flood a table.
    """
    pattern = _UNSAFE_KEEP_LINES if keep_newlines else _UNSAFE
    out = pattern.sub(_escape, text)
    if max_chars is not None and len(out) > max_chars:
        out = f"{out[:max_chars]}…(+{len(out) - max_chars} chars)"
    return out
