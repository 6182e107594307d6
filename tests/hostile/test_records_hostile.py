"""Record files as an attacker writes them (issue 18, item 7), read by ``lmkd-py report``/``compare`` as a
user runs them: no traceback, memory bounded, every bad line counted and named as file:line, the good
records still analysed, and values from the records escaped wherever they are shown.

Also the two other places text from processes reaches a terminal: the ``kill`` summary and console logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("numpy", reason="the report extra (numpy) is not installed")
pytest.importorskip("scipy", reason="the report extra (scipy) is not installed")

from lmkd_py import cli
from lmkd_py import log as logsetup
from lmkd_py.records import (
    KernelTimeline,
    KillRecord,
    Problems,
    Provenance,
    iter_lines,
    parse_line,
    record_json,
    validate_record,
)
from lmkd_py.tools import summary
from tests.unit.test_report import rec

HOSTILE_LABEL = "6.1\n# owned\x1b[2J\x1b]0;title\x07<script>alert(1)</script>|x|\u202e"


def good() -> str:
    return record_json(rec())


def good_obj() -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(good())
    return obj


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def lmkd(*args: str) -> subprocess.CompletedProcess[str]:
    """``lmkd-py ARGS`` through the real argument parsing and dispatch (``cli.main``), in this process
    with stdout/stderr captured: an exception would fail the test as a traceback would fail the user,
    without paying a numpy/scipy import per call. Compare gets few bootstrap resamples (speed)."""
    argv = list(args)
    if argv[0] == "compare":
        argv += ["--resamples", "100"]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return subprocess.CompletedProcess(argv, rc, out.getvalue(), err.getvalue())


def lmkd_process(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``lmkd-py ARGS`` as a separate process, exactly as a user runs it."""
    return subprocess.run([sys.executable, "-m", "lmkd_py.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def strict_json(text: str) -> Any:
    def refuse(token: str) -> Any:
        raise AssertionError(f"{token} in --format json output")

    return json.loads(text, parse_constant=refuse)


def assert_clean(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def records_in(doc: dict[str, Any]) -> int:
    return sum(g["records"] for g in doc["groups"])


# --- values that broke the reader ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (json.dumps(good_obj() | {"kill_to_exit_ns": 10**400}).encode(),
         "field 'kill_to_exit_ns': Input should be less than"),
        (json.dumps(good_obj() | {"kernel": {"mmap_lock_wait_ns": {"reaper": -(10**400)}}}).encode(),
         "field 'kernel.mmap_lock_wait_ns.reaper'"),
        (b"[" * 5000 + b"]" * 5000, "not JSON (recursion limit exceeded"),
        (b'{"a":' * 5000 + b"1" + b"}" * 5000, "not JSON (recursion limit exceeded"),
        (b'{"schema_version": 1' + b"0" * 400 + b"}", "record schema_version (huge) is newer"),
        (b'{"schema_version": true}', "no integer schema_version"),
        (b"\xff\xfe not utf-8", "not JSON"),
    ],
    ids=["int-10^400", "dict-int-10^400", "array-5000-deep", "object-5000-deep", "version-400-digits",
         "version-bool", "not-utf8"],
)
def test_hostile_value_costs_only_its_line(tmp_path: Path, bad: bytes, why: str) -> None:
    path = tmp_path / "r.jsonl"
    path.write_bytes(b"\n".join([good().encode(), bad, good().encode()]) + b"\n")
    proc = lmkd_process("report", "--format", "json", str(path))
    assert_clean(proc)
    assert proc.returncode == 0
    doc = strict_json(proc.stdout)
    assert records_in(doc) == 2 and doc["problems_total"] == 1
    assert doc["problems"][0].startswith(f"{path}:2: skipped: ") and why in doc["problems"][0], doc["problems"]
    assert f"{path}:2: skipped:" in proc.stderr
    proc = lmkd("compare", "--a", str(path), "--b", str(path), "--format", "json")
    assert_clean(proc)
    assert proc.returncode == 0 and strict_json(proc.stdout)["problems_total"] == 2


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's overflow warnings are expected here
def test_infinity_and_nan_never_reach_json_output(tmp_path: Path) -> None:
    """1e400 parses to infinity and NaN is a token json.loads accepts: both are 'unknown', and the JSON
    printed is strict JSON (null), in report and in compare."""
    obj = good_obj()
    mark = "12345.678"
    lines = [
        good(),
        json.dumps(obj | {"kernel": {"reap_throughput_mib_s": float(mark)}}).replace(mark, "1e400"),
        json.dumps(obj | {"pressure": {"full_avg10": float(mark)}}).replace(mark, "NaN"),
        json.dumps(obj | {"pressure": {"some_avg10": float(mark)}}).replace(mark, "-1e999"),
    ]
    assert "NaN" in lines[2] and "1e400" in lines[1]
    path = write(tmp_path / "r.jsonl", lines)
    proc = lmkd("report", "--format", "json", str(path))
    assert_clean(proc)
    assert proc.returncode == 0
    doc = strict_json(proc.stdout)
    assert records_in(doc) == 4
    through = next(m for m in doc["groups"][0]["metrics"] if m["name"] == "reap_throughput")
    assert through["n"] == 0 and through["median"] is None  # infinity counted as unknown, not as a value
    # Finite values whose mean and difference overflow: the statistics themselves become infinite.
    big = record_json(rec(kernel=KernelTimeline(reap_throughput_mib_s=1.7e308)))
    huge = write(tmp_path / "huge.jsonl", [big] * 3)
    with pytest.warns(RuntimeWarning):  # numpy says so; the output must still be JSON
        proc = lmkd("report", "--format", "json", str(huge))
    through = next(m for m in strict_json(proc.stdout)["groups"][0]["metrics"] if m["name"] == "reap_throughput")
    assert through["n"] == 3 and through["median"] == 1.7e308 and through["mean"] is None
    for a, b in ((path, huge), (huge, path)):
        proc = lmkd("compare", "--a", str(a), "--b", str(b), "--format", "json")
        assert_clean(proc)
        assert proc.returncode == 0
        strict_json(proc.stdout)


def test_mathtext_in_a_label_with_plots(tmp_path: Path) -> None:
    lines = [json.dumps(good_obj() | {"provenance": {"kernel_release": "$\\frac{$", "machine_model": "$x^$"}})] * 3
    path = write(tmp_path / "r.jsonl", lines)
    other = write(tmp_path / "o.jsonl", [good()] * 3)
    plots = tmp_path / "plots"
    proc = lmkd("report", "--plots", str(plots), str(path), str(other))
    assert_clean(proc)
    assert proc.returncode == 0, proc.stderr
    assert (plots / "kill_to_exit_ecdf.png").stat().st_size > 0
    proc = lmkd("compare", "--by", "kernel", "--plots", str(tmp_path / "plots2"), str(path), str(other))
    assert_clean(proc)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "plots2" / "kill_to_exit_box.png").exists()


def test_plots_of_many_groups_are_capped(tmp_path: Path) -> None:
    lines = [json.dumps(good_obj() | {"provenance": {"kernel_release": f"k{i}"}}) for i in range(40)]
    path = write(tmp_path / "r.jsonl", lines)
    proc = lmkd("report", "--plots", str(tmp_path / "p"), "--format", "json", str(path))
    assert_clean(proc)
    assert proc.returncode == 0 and len(strict_json(proc.stdout)["groups"]) == 40


def rss_of_report(*files: Path) -> tuple[int, dict[str, Any], str]:
    """Run ``report --format json`` in a fresh interpreter; (its peak RSS in KiB, the JSON, stderr)."""
    code = (
        "import io, json, sys, argparse\n"
        "from pathlib import Path\n"
        "from lmkd_py.report import cmd_report\n"
        "out, err = io.StringIO(), io.StringIO()\n"
        "rc = cmd_report(argparse.Namespace(files=[Path(p) for p in sys.argv[1:]], format='json', plots=None),"
        " out=out, err=err)\n"
        # VmHWM, not ru_maxrss: after a vfork + exec, ru_maxrss starts from the parent's peak (the
        # kernel carries the old mm's high-water mark into the signal struct at exec), i.e. pytest's.
        "hwm = int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])\n"
        "print(json.dumps({'rc': rc, 'rss': hwm,"
        " 'out': out.getvalue(), 'err': err.getvalue()}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, *map(str, files)], capture_output=True, text=True, timeout=300)
    assert_clean(proc)
    res = json.loads(proc.stdout)
    assert res["rc"] == 0, res["err"]
    return int(res["rss"]), strict_json(res["out"]), res["err"]


def test_lock_map_keys_do_not_multiply_memory(tmp_path: Path) -> None:
    """8k records of 16 MB, each lock map under fresh keys: 2.1 GB peak before (a full column per key),
    now bounded: the tracer's sides plus a few, the rest only in the totals, noted once per map."""
    base = json.loads(record_json(rec(kernel=KernelTimeline(mmap_lock_wait_ns={"reaper": 1000, "victim": 2000}))))
    path = tmp_path / "keys.jsonl"
    with path.open("w") as f:
        for i in range(8000):
            base["kernel"]["mmap_lock_wait_ns"] = {"reaper": 1000, f"k{i}": 5}
            base["kernel"]["lock_contention_ns"] = {f"c{i}": 7}
            base["notes"] = ["x" * 200]
            f.write(json.dumps(base) + "\n")
    assert path.stat().st_size > 15_000_000
    rss_kib, doc, err = rss_of_report(path)
    assert rss_kib < 400 * 1024, f"peak RSS {rss_kib} KiB"
    names = [m["name"] for m in doc["groups"][0]["metrics"]]
    sides = [n for n in names if n.startswith(("mmap_lock_wait.", "lock_contention."))]
    assert "mmap_lock_wait.reaper" in sides and len(sides) <= 2 * (4 + 8)
    total = next(m for m in doc["groups"][0]["metrics"] if m["name"] == "mmap_lock_wait")
    assert total["n"] == 8000 and total["median"] == pytest.approx(1005 / 1e6)  # every key in the total
    assert any(p.startswith("mmap_lock_wait_ns: 7992 value(s)") for p in doc["problems"]), doc["problems"]
    assert "mmap_lock_wait_ns: 7992 value(s)" in err


def test_overlong_line_is_skipped_unread(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    with path.open("w") as f:
        f.write(good() + "\n" + '{"schema_version": 1, "x": "' + "a" * (3 << 20) + '"}\n' + good() + "\n")
    proc = lmkd("report", "--format", "json", str(path))
    assert_clean(proc)
    doc = strict_json(proc.stdout)
    assert proc.returncode == 0 and records_in(doc) == 2
    assert doc["problems"] == [f"{path}:2: skipped: line longer than 1 MiB (not read)"]


def test_a_line_of_256_mib_of_zeros_through_a_pipe_stays_small(tmp_path: Path) -> None:
    """A pipe (``<(zcat ...)``) is a fine input, so a stream without newlines must not be held whole."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    src = write(tmp_path / "good.jsonl", [good()])
    feeder = subprocess.Popen(
        ["sh", "-c", f'exec > "{fifo}"; cat "{src}"; head -c 268435456 /dev/zero; echo; cat "{src}"']
    )
    try:
        rss_kib, doc, _ = rss_of_report(fifo)
    finally:
        feeder.kill()
        feeder.wait()
    assert rss_kib < 300 * 1024, f"peak RSS {rss_kib} KiB"
    assert records_in(doc) == 2 and doc["problems"] == [f"{fifo}:2: skipped: line longer than 1 MiB (not read)"]


def test_a_device_is_refused_up_front() -> None:
    proc = lmkd_process("report", "/dev/zero", timeout=30)
    assert_clean(proc)
    assert proc.returncode == 2 and "lmkd-py report: /dev/zero: not a record file (a device or socket)" in proc.stderr


def test_problems_are_counted_not_hoarded(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text(good() + "\n" + "x\n" * 100_000 + good() + "\n")
    proc = lmkd("report", "--format", "json", str(path))
    assert_clean(proc)
    doc = strict_json(proc.stdout)
    assert records_in(doc) == 2 and doc["problems_total"] == 100_000 and len(doc["problems"]) == 1000
    assert "skipped 100000 unreadable line(s)" in proc.stderr and "... and 99980 more" in proc.stderr


def test_newer_schema_in_one_file_does_not_cost_the_fleet(tmp_path: Path) -> None:
    a = write(tmp_path / "board-a.jsonl", [good(), json.dumps(good_obj() | {"schema_version": 2}), good()])
    b = write(tmp_path / "board-b.jsonl", [record_json(rec(kernel_release="6.1.0"))] * 3)
    proc = lmkd("report", "--format", "json", str(a), str(b))
    assert_clean(proc)
    doc = strict_json(proc.stdout)
    assert proc.returncode == 0 and records_in(doc) == 5
    assert doc["problems"] == [
        f"{a}:2: skipped: record schema_version 2 is newer than this lmkd-py understands (1); "
        "upgrade lmkd-py to read it"
    ]
    proc = lmkd("compare", "--by", "kernel", "--format", "json", str(a), str(b))
    assert_clean(proc)
    assert proc.returncode == 0 and strict_json(proc.stdout)["problems_total"] == 1


# --- labels on the way out ------------------------------------------------------------------------------


def hostile_labels_file(tmp_path: Path) -> Path:
    obj = good_obj()
    lines = [
        json.dumps(obj | {
            "provenance": {"kernel_release": HOSTILE_LABEL, "machine_model": "![x](http://evil.example/b.png)"},
            "mrelease": obj["mrelease"] | {"status": "error", "errno_name": "E\x1b]0;pwned\x07"},
        })
    ] * 3 + [good()] * 3
    return write(tmp_path / "labels.jsonl", lines)


@pytest.mark.parametrize("fmt", ["table", "markdown"])
def test_labels_are_escaped_in_text_and_markdown(tmp_path: Path, fmt: str) -> None:
    path = hostile_labels_file(tmp_path)
    for argv in (["report", str(path)], ["compare", "--by", "kernel", str(path)]):
        proc = lmkd(*argv, "--format", fmt)
        assert_clean(proc)
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout
        assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
        assert not any(line.startswith("# owned") for line in out.splitlines())
        if fmt == "markdown":
            assert "<script>" not in out and "](http" not in out and "|x|" not in out
            assert "6.1\\\\n\\# owned\\\\x1b\\[2J" in out and "\\<script\\>" in out
        else:
            assert "6.1\\n# owned\\x1b[2J\\x1b]0;title\\x07<script>" in out
    proc = lmkd("report", str(path), "--format", "markdown")
    assert "machine \\!\\[x\\]\\(http" in proc.stdout
    proc = lmkd("report", str(path), "--format", "table")
    assert "E\\x1b]0;pwned\\x07 3" in proc.stdout  # the errno histogram too


def test_long_label_is_cut_and_says_so(tmp_path: Path) -> None:
    path = write(tmp_path / "r.jsonl", [json.dumps(good_obj() | {"provenance": {"kernel_release": "k" * 5000}})])
    proc = lmkd("report", str(path))
    assert_clean(proc)
    assert "k" * 120 + "…(+4880 chars)" in proc.stdout and "k" * 121 not in proc.stdout


def test_compare_by_lists_few_escaped_values(tmp_path: Path) -> None:
    lines = [json.dumps(good_obj() | {"provenance": {"kernel_release": f"\x1b[31m{i}" + "v" * 500}}) for i in range(50)]
    proc = lmkd("compare", "--by", "kernel", str(write(tmp_path / "r.jsonl", lines)))
    assert_clean(proc)
    assert proc.returncode == 2 and "\x1b" not in proc.stderr
    assert "found 50:" in proc.stderr and "and 40 more" in proc.stderr and len(proc.stderr) < 2000


# --- the line parser, fuzzed ----------------------------------------------------------------------------


def _json_values() -> st.SearchStrategy[Any]:
    ints = st.integers(min_value=-(10**30), max_value=10**30)
    scalars = st.none() | st.booleans() | ints | st.floats() | st.text()
    return st.recursive(
        scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
        max_leaves=20,
    )


def _record_like() -> st.SearchStrategy[bytes]:
    """Valid records with one field replaced by anything JSON can hold, and then possibly cut short."""
    keys = sorted(good_obj())

    def build(key: str, value: Any, cut: int | None) -> bytes:
        raw = json.dumps(good_obj() | {key: value}).encode()
        return raw if cut is None else raw[:cut]

    return st.builds(build, st.sampled_from(keys), _json_values(), st.none() | st.integers(0, 400))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.binary(max_size=300) | _record_like(), truncated=st.booleans())
def test_parse_line_never_raises_and_always_accounts(raw: bytes, truncated: bool) -> None:
    problems = Problems()
    got = parse_line(Path("f.jsonl"), 7, raw, truncated, problems)
    if got is None:
        assert len(problems) == 1 and problems[0].startswith("f.jsonl:7: skipped: ")
        assert "\x1b" not in problems[0] and "\n" not in problems[0]
    else:
        assert isinstance(got, KillRecord) and len(problems) == 0


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=20),
       final_newline=st.booleans(), cap=st.integers(1, 30), chunk=st.integers(1, 50))
def test_iter_lines_splits_like_split_and_cuts_only_long_lines(
    lines: list[bytes], final_newline: bool, cap: int, chunk: int
) -> None:
    data = b"\n".join(lines) + (b"\n" if final_newline and lines else b"")
    got = list(iter_lines(io.BufferedReader(io.BytesIO(data), buffer_size=max(chunk, 8)), max_line_bytes=cap))
    expected = data.split(b"\n")
    if data.endswith(b"\n") or not data:
        expected = expected[:-1]
    assert [n for n, _, _ in got] == list(range(1, len(expected) + 1))
    for i, ((_, raw, complete), want) in enumerate(zip(got, expected, strict=True)):
        if len(want) > cap:
            assert raw is None
        else:
            assert raw is not None and raw.removesuffix(b"\n") == want
        assert complete == (i < len(expected) - 1 or data.endswith(b"\n"))


_UNSAFE_OUTPUT = set(map(chr, [*range(0, 9), *range(11, 32), *range(0x7F, 0xA0)])) | {"\u202e", "\u2028"}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(labels=st.lists(st.text(min_size=0, max_size=30), min_size=1, max_size=4))
def test_any_labels_render_safely(labels: list[str]) -> None:
    """Whatever a record file says its kernel, machine and errno are, text output carries no control
    character, Markdown output no active markup from it, and JSON output is strict JSON."""
    import tempfile

    obj = good_obj()
    with tempfile.TemporaryDirectory(prefix="lmkd-py-fuzz-") as tmp:
        lines = [
            json.dumps(obj | {"provenance": {"kernel_release": lab, "machine_model": labels[-1]},
                              "mrelease": obj["mrelease"] | {"errno_name": lab}})
            for lab in labels
        ]
        path = write(Path(tmp) / "r.jsonl", lines)
        for fmt in ("table", "markdown", "json"):
            proc = lmkd("report", "--format", fmt, str(path))
            assert proc.returncode == 0, proc.stderr
            if fmt == "json":
                doc = strict_json(proc.stdout)
                assert records_in(doc) == len(labels)
                continue
            body = proc.stdout.replace("\n", "")
            assert not _UNSAFE_OUTPUT & set(body), repr(body)
            if fmt == "markdown":
                for lab in labels:
                    if any(c in lab for c in "<>[]`|"):
                        assert f"kernel {lab} /" not in proc.stdout


# --- process names on the terminal ----------------------------------------------------------------------


def test_kill_summary_escapes_the_process_name() -> None:
    r = rec(error="bad\x1b[2J", notes=["n\x1b]0;t\x07"])
    r = dataclasses.replace(r, victim=dataclasses.replace(r.victim, comm="\x1b[31mevil\nfake line"))
    text = summary(r)
    assert "\x1b" not in text and "\x07" not in text
    assert text.splitlines()[0] == "pid 100 (\\x1b[31mevil\\nfake line): killed - bad\\x1b[2J"
    assert "note: n\\x1b]0;t\\x07" in text


@pytest.fixture
def console_log() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    logsetup.configure("console", "info", stream)
    try:
        yield stream
    finally:
        structlog.reset_defaults()


def test_console_log_escapes_values_from_processes(console_log: io.StringIO) -> None:
    structlog.get_logger().info("kill.sent", comm="\x1b[2Jevil\n2026-01-01 [info] forged", cgroup="/a\u202eb",
                                argv=["x\x1bq"], pid=5)
    out = console_log.getvalue()
    assert out.count("\n") == 1, out
    assert "\x1b" not in out and "\u202e" not in out
    # the renderer may quote a value with spaces (repr): the escapes show either way
    assert "x1b[2Jevil" in out and "n2026-01-01 [info] forged" in out and "cgroup=/a\\u202eb" in out


def test_console_log_traceback_keeps_lines_but_not_escapes(console_log: io.StringIO) -> None:
    try:
        raise ValueError("comm \x1b[2Jevil")
    except ValueError:
        structlog.get_logger().exception("loop.error")
    out = console_log.getvalue()
    assert "\x1b" not in out and "Traceback (most recent call last):\n" in out
    assert "ValueError: comm \\x1b[2Jevil" in out


def test_json_log_stays_exact(tmp_path: Path) -> None:
    stream = io.StringIO()
    logsetup.configure("json", "info", stream)
    try:
        structlog.get_logger().info("kill.sent", comm="\x1b[2Jevil\nx")
    finally:
        structlog.reset_defaults()
    assert json.loads(stream.getvalue())["comm"] == "\x1b[2Jevil\nx"  # escaped by JSON, value exact


def test_provenance_fields_unchanged_in_records() -> None:
    """Escaping is for display only: the record keeps the exact bytes a process chose (evidence)."""
    r = rec(provenance=Provenance(kernel_release=HOSTILE_LABEL))
    assert validate_record(json.loads(record_json(r))).provenance.kernel_release == HOSTILE_LABEL
