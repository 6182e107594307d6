"""The attacker picks the text the protect/prefer patterns are matched against (comm, argv); a careless
operator picks the patterns. Neither may stall the killer (issue 18, item 2)."""

from __future__ import annotations

import ast
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, reject, settings
from hypothesis import strategies as st

from lmkd_py.config import ConfigError, PolicyConfig, parse_config
from lmkd_py.patterns import PatternError, compile_pattern
from lmkd_py.policy import Candidate, Rules, exclusion

ROOT = Path(__file__).resolve().parents[2]
CATASTROPHIC = r"(\w+\s?)+--keep$"  # the pattern of the issue: exponential in a backtracking engine


def check_config(tmp_path: Path, toml: str) -> subprocess.CompletedProcess[str]:
    f = tmp_path / "hostile.toml"
    f.write_text(toml)
    return subprocess.run([sys.executable, "-m", "lmkd_py.cli", "check-config", str(f)],
                          capture_output=True, text=True, timeout=60)


def toml_str(s: str) -> str:
    return "'" + s + "'"  # TOML literal string: backslashes stay as they are


def test_catastrophic_pattern_is_compiled_by_a_linear_engine(tmp_path: Path) -> None:
    # RE2 runs this pattern in linear time, so check-config accepts it...
    out = check_config(tmp_path, f"[policy]\nprotect_cmdline = [{toml_str(CATASTROPHIC)}]\n")
    assert out.returncode == 0, out.stderr
    # ...and the daemon's rules match it with RE2, never with a backtracking engine.
    rules = Rules.from_config(PolicyConfig(protect_cmdline=(CATASTROPHIC,), prefer_comm=("(a+)+b",)))
    assert [p.engine for p in rules.protect_cmdline + rules.prefer_comm] == ["re2", "re2"]
    assert "re" not in {type(p).__module__ for p in rules.protect_cmdline}
    hostile = "a" * 10_000 + "!"  # worst case for backtracking: a long word that finally fails
    c = Candidate(pid=100, start_time_ticks=1, comm="a" * 15, oom_score_adj=0, rss_kib=10_000, cmdline=hostile)
    assert exclusion(c, rules) is None
    assert exclusion(Candidate(pid=101, start_time_ticks=1, comm="x", oom_score_adj=0, rss_kib=10_000,
                               cmdline="a b --keep"), rules) == "protected cmdline"


def test_real_process_with_hostile_argv_does_not_stall_the_table_refresh(tmp_path: Path) -> None:
    """A real child with a 10 kB argv built to make a backtracking engine explode, and a real table
    refresh over /proc with the catastrophic pattern. In a subprocess with a timeout, so that an
    engine that backtracks fails this test instead of hanging the run."""
    hostile = "a" * 10_000 + "!"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", hostile])
    try:
        cfg = tmp_path / "c.toml"
        cfg.write_text(f"[policy]\nprotect_cmdline = [{toml_str(CATASTROPHIC)}]\nmin_rss_kib = 0\n")
        code = textwrap.dedent(f"""
            import time
            from pathlib import Path
            from lmkd_py.candidates import CandidateTable
            from lmkd_py.config import load_config
            from lmkd_py.policy import Rules
            from lmkd_py.procfs import ProcFs
            rules = Rules.from_config(load_config(Path({str(cfg)!r})).policy)
            table = CandidateTable(ProcFs(), rules, clock=time.monotonic_ns)
            table.refresh()
            pids = {{c.candidate.pid: c.candidate for c in table.rank(-999)}}
            c = pids.get({child.pid})
            print(c is not None, len(c.cmdline) if c else 0)
        """)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        present, length = out.stdout.splitlines()[-1].split()  # after structlog's default output
        assert present == "True"  # ranked, not protected: its argv does not end in --keep
        assert int(length) > 100
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        (r"(a)\1", "backreferences"),
        (r"(?P<n>a)(?P=n)", "backreferences"),
        (r"sshd(?=:)", "lookahead"),
        (r"sshd(?!x)", "lookahead"),
        (r"(?<=/)sshd", "lookbehind"),
        (r"(?<!x)sshd", "lookbehind"),
        (r"(?>a+)b", "atomic groups"),
        (r"a++b", "possessive"),
        (r"sshd\Z", r"\z"),
        (r"(sshd", "missing )"),
        (r"\pL{200}", "too large"),
    ],
)
def test_what_re2_cannot_run_is_refused_naming_key_and_pattern(tmp_path: Path, pattern: str, why: str) -> None:
    out = check_config(tmp_path, f"[policy]\nprotect_cmdline = ['ok', {toml_str(pattern)}]\n")
    assert out.returncode == 2, out.stdout
    assert "policy.protect_cmdline" in out.stderr
    assert repr(pattern) in out.stderr and "pattern 1" in out.stderr
    assert why in out.stderr
    assert "Traceback" not in out.stderr and "re2.cc" not in out.stderr  # RE2's own logging is off
    for key in ("protect_comm", "prefer_comm", "prefer_cmdline"):
        with pytest.raises(ConfigError, match=f"policy.{key}: .*pattern 0") as err:
            parse_config({"policy": {key: [pattern]}})
        assert why in str(err.value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=40))
def test_any_pattern_text_gives_a_pattern_or_a_clear_error(pattern: str) -> None:
    try:
        compiled = compile_pattern(pattern, "search")
    except PatternError as exc:
        assert str(exc)
        with pytest.raises(ConfigError, match=r"policy\.protect_cmdline"):
            parse_config({"policy": {"protect_cmdline": [pattern]}})
        return
    assert compiled.engine == "re2"
    assert parse_config({"policy": {"protect_cmdline": [pattern]}}).policy.protect_cmdline == (pattern,)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([CATASTROPHIC, r"(a|aa)*c", r".*", r"^$", r"[^\x00]+", r"\w+\b"]), st.text(max_size=300))
def test_matching_any_text_never_raises(pattern: str, text: str) -> None:
    # st.text includes lone surrogates, which UTF-8 cannot encode: still an answer, not an exception.
    for mode in ("search", "fullmatch"):
        assert compile_pattern(pattern, mode).matches(text) in (True, False)  # type: ignore[arg-type]


# A grammar of what operators write (names, alternations, classes, repetition): there RE2 must mean what
# Python's re meant, so moving to RE2 changed no existing config's meaning.
_atom = st.sampled_from(["a", "b", "ab", ".", "[ab]", "[^a]", r"\d", r"\w", r"\s", "-", " "])


@st.composite
def simple_regex(draw: st.DrawFn, depth: int = 2) -> str:
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        if depth > 0 and draw(st.booleans()):
            inner = draw(simple_regex(depth - 1))
            alt = draw(simple_regex(depth - 1)) if draw(st.booleans()) else None
            piece = f"({inner}|{alt})" if alt else f"({inner})"
        else:
            piece = draw(_atom)
        parts.append(piece + draw(st.sampled_from(["", "*", "+", "?", "{1,2}"])))
    return "".join(parts)


# Found by this test's own grammar: Python's re ran on it past CI's 90 minutes.
HOPELESS_FOR_RE = (r"((.*\s*)*(a?ab*\d*)*\d*|( +-?)?)*\w{1,2}", "abx1-aa-  ")


class _OracleTimeout(Exception):
    pass


def _python_re(fn: Callable[[str, str], re.Match[str] | None], pattern: str, text: str) -> bool:
    """Python's re is the oracle here, and it backtracks: some patterns of this grammar (nested
    quantifiers over groups that can match empty, as in HOPELESS_FOR_RE) take hours on 10 characters.
    That is the very hazard RE2 removes, so a case the oracle cannot answer within a second is
    discarded, not waited for (a CI run once hung here for 90 minutes)."""

    def expire(signum: int, frame: object) -> None:
        raise _OracleTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    try:
        return fn(pattern, text) is not None
    except _OracleTimeout:
        reject()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@example(*HOPELESS_FOR_RE)
@given(simple_regex(), st.text(alphabet="ab1 -x", max_size=12))
def test_re2_agrees_with_python_re_on_ordinary_patterns(pattern: str, text: str) -> None:
    assert compile_pattern(pattern, "fullmatch").matches(text) == _python_re(re.fullmatch, pattern, text)
    assert compile_pattern(pattern, "search").matches(text) == _python_re(re.search, pattern, text)


def test_no_module_on_the_daemon_path_imports_re() -> None:
    """Python's backtracking re must not meet user-controlled text: no kill-mode module (the flat ones)
    and no observe-mode module imports it. tracing/ uses re on kernel-written format files and on its
    own instance names only; report/ and lab/ run offline on the operator's own inputs."""
    files = sorted(ROOT.glob("lmkd_py/*.py")) + sorted(ROOT.glob("lmkd_py/observe/*.py"))
    assert len(files) > 15
    offenders = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import) and any(a.name == "re" for a in node.names):
                offenders.append(path.name)
            if isinstance(node, ast.ImportFrom) and node.module == "re":
                offenders.append(path.name)
    assert offenders == []
