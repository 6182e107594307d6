"""What ``report``, ``compare`` and ``export`` read: files, directories, globs; plain, gzip- or
zstd-compressed JSONL; Parquet files and datasets (no numpy).

A field data set is many files (one or more per board, rotated, compressed by logrotate), so an
argument names any of:

- a file: its kind is told by its first bytes (gzip ``1f 8b``, zstd ``28 b5 2f fd``, Parquet ``PAR1``),
  anything else is read as JSONL; a pipe (``<(zcat ...)``) is JSONL;
- a directory: walked recursively with ``os.scandir`` (one entry at a time, so 100,000 files cost a
  walk, not a list in memory), taking the files whose names look like records (``*.jsonl``, rotated
  ``*.jsonl.1``, ``*.jsonl.gz``, ``*.jsonl.2.zst``, ``*.parquet``); the others are counted and a few named;
- a glob (``'fleet/*/records.jsonl*'``), expanded by ``glob.iglob``.

Problems with the inputs themselves are notes in the same ``Problems`` as skipped lines (each names the
file): files that are not record files, unreadable ones, a compressed stream that is corrupt part way
(the records before the damage are kept). Only an argument that names nothing at all, a device, or a
glob that matches nothing is an error the user must fix.
"""

from __future__ import annotations

import glob
import gzip
import io
import os
import re
import stat
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from lmkd_py.records import SCHEMA_VERSION, KillRecord, ProblemSink, adapter, iter_lines, parse_line
from lmkd_py.text import printable

EXTRA_HINT = "install the report extra: pip install 'lmkd-py[report]'"
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
PARQUET_MAGIC = b"PAR1"
# What a record file is called in a directory: the records file, its rotations, compressed by logrotate.
RECORD_NAME = re.compile(r".*\.jsonl(\.\d+)?(\.gz|\.zst)?|.*\.parquet", re.DOTALL)
NAMED_SKIPPED = 5  # files in a directory that are not record files: a few are named, all are counted
GLOB_CHARS = re.compile(r"[*?\[]")
# zstd frames from logrotate are small; a frame that claims a window beyond this is refused rather than
# allocated (a hostile file could ask for 2 GiB).
ZSTD_MAX_WINDOW = 1 << 27


class InputError(Exception):
    """An argument that names no input: the message says which and why; the command exits 2."""


@dataclass(frozen=True)
class Source:
    """One input file: ``kind`` is "jsonl", "gzip", "zstd" or "parquet"."""

    path: Path
    kind: str


def sniff(path: Path) -> str:
    """The kind of a regular file from its first bytes. Raises OSError."""
    with path.open("rb") as fh:
        head = fh.read(4)
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head == ZSTD_MAGIC:
        return "zstd"
    if head == PARQUET_MAGIC:
        return "parquet"
    return "jsonl"


def expand(args: list[Path] | list[str], problems: ProblemSink) -> list[Source]:
    """The input files named by ``args``, in order, each once. Raises InputError for an argument that
    names nothing (missing, a glob without match), a device or socket."""
    out: list[Source] = []
    seen: set[Path] = set()
    for arg in args:
        text = str(arg)
        if GLOB_CHARS.search(text) and not Path(text).exists():
            matched = False
            for name in sorted(glob.iglob(text, recursive=True)):
                matched = True
                _add(Path(name), out, seen, problems, explicit=False)
            if not matched:
                raise InputError(f"{printable(text)}: no file matches")
        else:
            _add(Path(text), out, seen, problems, explicit=True)
    return out


def _add(path: Path, out: list[Source], seen: set[Path], problems: ProblemSink, explicit: bool) -> None:
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        if explicit:
            raise InputError(f"{printable(str(path))}: {exc.strerror or exc}") from exc
        problems.append(f"{path}: skipped: {exc.strerror or exc}")
        return
    if stat.S_ISDIR(mode):
        _walk(path, out, seen, problems)
    elif stat.S_ISFIFO(mode):
        _once(Source(path, "jsonl"), out, seen)
    elif stat.S_ISREG(mode):
        _file(path, out, seen, problems)
    elif explicit:
        raise InputError(f"{printable(str(path))}: not a record file (a device or socket)")
    else:
        problems.append(f"{path}: skipped: not a regular file")


def _file(path: Path, out: list[Source], seen: set[Path], problems: ProblemSink) -> None:
    try:
        kind = sniff(path)
    except OSError as exc:
        problems.append(f"{path}: skipped: {exc.strerror or exc}")
        return
    _once(Source(path, kind), out, seen)


def _once(src: Source, out: list[Source], seen: set[Path]) -> None:
    key = src.path.resolve()
    if key not in seen:
        seen.add(key)
        out.append(src)


def _walk(top: Path, out: list[Source], seen: set[Path], problems: ProblemSink) -> None:
    """Every record file under ``top`` (symlinked directories are not followed: no loops)."""
    others = 0
    named: list[str] = []
    stack = [top]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except OSError as exc:
            problems.append(f"{d}: skipped: {exc.strerror or exc}")
            continue
        with it:
            subdirs = []
            for entry in it:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        subdirs.append(Path(entry.path))
                        continue
                    regular = entry.is_file()
                except OSError:
                    regular = False
                if regular and RECORD_NAME.fullmatch(entry.name):
                    _file(Path(entry.path), out, seen, problems)
                else:
                    others += 1
                    if len(named) < NAMED_SKIPPED:
                        named.append(entry.name)
        stack.extend(sorted(subdirs, reverse=True))
    if others:
        shown = ", ".join(printable(n, max_chars=80) for n in sorted(named))
        more = f" and {others - len(named)} more" if others > len(named) else ""
        problems.append(f"{top}: skipped {others} file(s) that are not record files ({shown}{more})")


def open_jsonl(src: Source) -> BinaryIO:
    """A binary stream of the JSONL text of ``src`` (decompressed as it is read). Raises OSError."""
    if src.kind == "gzip":
        return gzip.open(src.path, "rb")  # type: ignore[return-value]  # a GzipFile reads as a BinaryIO
    if src.kind == "zstd":
        import zstandard

        fh = src.path.open("rb")
        dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
        # The reader has no readline of its own: a BufferedReader over it gives one (iter_lines needs it).
        return io.BufferedReader(dctx.stream_reader(fh, closefd=True))
    return src.path.open("rb")


def decompress_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a corrupt compressed stream raises while it is read (besides OSError)."""
    errors: list[type[BaseException]] = [EOFError, zlib.error, gzip.BadGzipFile]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


_VERSION_FIRST = b'{"schema_version":'


def iter_records(src: Source, problems: ProblemSink) -> Iterator[KillRecord]:
    """The records of one JSONL source (plain or compressed), streaming, by the rules of
    ``records.iter_records``: a line that is not a record is skipped and noted as ``file:line``.

    A compressed stream that turns out corrupt part way ends the file with one note naming it and the
    line reached; the records before the damage are kept. Raises OSError when the file cannot be opened.
    """
    from pydantic import ValidationError

    validate = adapter().validate_json
    try:
        fh = open_jsonl(src)
    except ImportError as exc:
        problems.append(f"{src.path}: skipped: zstd-compressed, and {exc.name} is not installed ({EXTRA_HINT})")
        return
    lineno = 0
    with fh:
        try:
            for lineno, raw, complete in iter_lines(fh):
                if raw is not None and not raw.strip():
                    continue
                rec: KillRecord | None = None
                if raw is not None:
                    try:
                        rec = validate(raw)
                    except ValidationError:
                        rec = None
                # A record without schema_version validates with the default; iter_records skips it, and
                # a newer one must be skipped: both go the slow way, which words it the same. The writer
                # puts schema_version first, so its lines never need the slow way for that.
                slow = rec is None or rec.schema_version > SCHEMA_VERSION
                if slow or raw is None or not raw.startswith(_VERSION_FIRST):
                    rec = parse_line(src.path, lineno, raw, not complete, problems)
                if rec is not None:
                    yield rec
        except decompress_errors() as exc:
            problems.append(
                f"{src.path}: {src.kind} data corrupt after line {lineno} ({printable(str(exc), max_chars=200)}); "
                f"the rest of the file is skipped"
            )
