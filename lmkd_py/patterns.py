"""Linear-time regular expressions for text that processes choose themselves (comm, argv).

The protect/prefer patterns are matched against names and argument vectors that any user sets
(``prctl(PR_SET_NAME)``, ``exec -a``, argv). Python's ``re`` backtracks: ``(\\w+\\s?)+--keep$`` took 2.6 s
on 24 characters here and doubles with each one more, so one hostile argv stalls the daemon's table
refresh (issue 18). RE2 (``google-re2``, the RE2 authors' own bindings) compiles to automata and runs in
time linear in the text for every pattern it accepts; what it cannot run that way (backreferences,
lookaround, atomic groups, possessive quantifiers) it refuses to compile, and that refusal is the
config error. This module is the one place that imports ``re2`` (design.md: one room per dependency), and
only when a pattern is compiled: a config without patterns (the default) never maps the library (~2.9 MiB
resident, issue 13).

Pure: compiling and matching do no I/O. RE2 syntax: https://github.com/google/re2/wiki/Syntax. Where it
differs from Python's for the patterns people write here: ``\\d``/``\\w``/``\\b`` are ASCII-only, ``$``
matches only at the very end of the text (Python's also before a final newline), ``\\Z`` is spelled ``\\z``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal

ENGINE = "re2"
# Per-pattern memory for RE2's compiled program and its lazily built DFA. The DFA grows with the
# *text* it sees, which users choose: with RE2's default of 8 MiB, four patterns grew RSS by 12.6 MiB
# over a crafted 200 kB text; with 1 MiB, by 1.8 MiB (and ran faster). When the budget is spent, RE2
# falls back to its NFA, which is still linear in the text. 1 MiB compiles an alternation of 2,000
# names; a larger pattern is refused with "pattern too large" at check-config time.
MAX_MEM_BYTES = 1 << 20

# RE2's messages for Python constructs it refuses, turned into advice (re2/parse.cc wording).
_HINTS = (
    ("(?=", "lookahead is not supported"),
    ("(?!", "lookahead is not supported"),
    ("(?<=", "lookbehind is not supported"),
    ("(?<!", "lookbehind is not supported"),
    ("(?>", "atomic groups are not supported"),
    ("bad repetition operator: ++", "possessive quantifiers are not supported"),
    ("bad repetition operator: *+", "possessive quantifiers are not supported"),
    ("bad repetition operator: ?+", "possessive quantifiers are not supported"),
    ("\\Z", "write \\z for the end of the text"),
    ("pattern too large", f"over lmkd-py's budget of {MAX_MEM_BYTES >> 20} MiB per pattern"),
)


_WHY = " (lmkd-py matches with RE2, which runs in linear time)"


class PatternError(ValueError):
    """A pattern RE2 cannot run (in linear time, or at all); the message says why."""


@dataclass(frozen=True, slots=True)
class Pattern:
    """One compiled pattern. ``mode`` is how it applies: ``fullmatch`` (the whole text) or ``search``
    (anywhere in it)."""

    source: str
    mode: Literal["fullmatch", "search"]
    _regexp: Any = field(repr=False, compare=False)  # re2._Regexp: the bindings ship no type information

    @property
    def engine(self) -> str:
        return ENGINE

    def matches(self, text: str) -> bool:
        """Whether ``text`` matches, in time linear in ``len(text)``. Never raises for any str."""
        data = _utf8(text)
        m = self._regexp.fullmatch(data) if self.mode == "fullmatch" else self._regexp.search(data)
        return m is not None


def _utf8(text: str) -> bytes:
    # surrogatepass: a str holding lone surrogates (os.fsdecode's surrogateescape output, say) still
    # encodes, to bytes RE2 treats as invalid UTF-8 that no character class matches, instead of raising
    # UnicodeEncodeError inside the table refresh.
    return text.encode("utf-8", "surrogatepass")


@cache
def _re2() -> Any:
    import re2

    return re2


def _options() -> Any:
    opts = _re2().Options()
    opts.max_mem = MAX_MEM_BYTES
    # RE2 otherwise prints every parse error to stderr through absl logging; ours go into the config error.
    opts.log_errors = False
    return opts


def compile_pattern(source: str, mode: Literal["fullmatch", "search"]) -> Pattern:
    """Compile ``source`` with RE2. Raises PatternError saying why RE2 refuses it (a Python-only
    construct such as a backreference or lookaround, bad syntax, or a program over MAX_MEM_BYTES)."""
    re2 = _re2()
    try:
        regexp = re2.compile(source, _options())
    except UnicodeEncodeError:
        raise PatternError("not valid Unicode (lone surrogate)") from None
    except re2.error as exc:
        raise PatternError(explain(_message(exc), source)) from None
    return Pattern(source, mode, regexp)


def _message(exc: BaseException) -> str:
    arg = exc.args[0] if exc.args else ""
    return arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)


def explain(message: str, source: str = "") -> str:
    """RE2's error message, with advice where the pattern uses a Python construct RE2 refuses."""
    escape = message.partition("invalid escape sequence: \\")[2]
    if escape[:1].isdigit() or "(?P=" in source:
        return f"{message}: backreferences are not supported{_WHY}"
    for needle, hint in _HINTS:
        if needle in message:
            return f"{message}: {hint}{_WHY}"
    return message
