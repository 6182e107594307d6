"""The Parquet schema of exported records, derived from the record classes themselves (no numpy).

``export`` writes every field of ``records.KillRecord`` under its own name, nested as in the JSON
(``provenance.kernel_release``, ``kernel.reap_total_ns``), so a Spark or Trino user reads the same
names as the JSON Schema; the types follow the dataclass annotations: integers BIGINT, floats DOUBLE,
strings and enums VARCHAR, booleans BOOLEAN, nested classes STRUCT, ``dict[str, X]`` MAP, lists LIST.
A field added to a record class appears in the Parquet schema with no change here.

Two top-level columns are added for the hive partitions: ``kernel_release`` and ``machine_model``
(the provenance values, cut and hashed when too long or unsafe for a directory name, see
``partition_value``); the full values stay in ``provenance``.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import re
import types
import typing
from typing import Any

from lmkd_py.records import SCHEMA_VERSION, KillRecord

PARTITIONS = ("kernel_release", "machine_model")
# Written into every file's key/value metadata: a reader tells its own datasets from foreign Parquet.
FORMAT_KEY = "lmkd_py.format"
FORMAT_VALUE = f"kill-records/{SCHEMA_VERSION}"
PARTITION_CHARS = 96
# Characters a partition value keeps as is (DuckDB, Spark and Trino percent-encode the rest of the
# printable ones in directory names, but "/", "=", "%" and control characters are better never there).
_SAFE = re.compile(r"[A-Za-z0-9 ._+~@,:()#-]+")


def duckdb_type(tp: Any) -> str:
    """The DuckDB (and Parquet) type of a record field annotation."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return duckdb_type(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        kinds = {duckdb_type(a) for a in args}
        if kinds == {"BIGINT", "DOUBLE"}:
            return "DOUBLE"  # e.g. the pressure signals: float | int | None
        if len(kinds) != 1:
            raise TypeError(f"no single column type for {tp!r}")
        return kinds.pop()
    if origin is dict:
        key, value = typing.get_args(tp)
        return f"MAP({duckdb_type(key)}, {duckdb_type(value)})"
    if origin is list:
        (item,) = typing.get_args(tp)
        return f"{duckdb_type(item)}[]"
    if isinstance(tp, type):
        if dataclasses.is_dataclass(tp):
            return struct_type(tp)
        if issubclass(tp, enum.Enum) or tp is str:
            return "VARCHAR"
        if tp is bool:
            return "BOOLEAN"
        if tp is int:
            return "BIGINT"
        if tp is float:
            return "DOUBLE"
    raise TypeError(f"no column type for {tp!r}")


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def fields_of(cls: type) -> dict[str, str]:
    """Field name -> DuckDB type of a record dataclass, in declaration order."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: duckdb_type(hints[f.name]) for f in dataclasses.fields(cls)}


def struct_type(cls: type) -> str:
    return "STRUCT(" + ", ".join(f"{_quote(k)} {v}" for k, v in fields_of(cls).items()) + ")"


def record_columns() -> dict[str, str]:
    """The columns of a KillRecord line: what ``read_json(columns=...)`` is told."""
    return fields_of(KillRecord)


def partition_value(value: str | None) -> str | None:
    """A provenance value as a hive partition value: as is when short and plain; else its first
    characters (unsafe ones as ``_``) and a hash, so a hostile or long value neither escapes nor
    overflows a directory name, and two values never share a partition."""
    if value is None:
        return None
    if len(value) <= PARTITION_CHARS and _SAFE.fullmatch(value):
        return value
    head = re.sub(r"[^A-Za-z0-9 ._+~@,:()#-]", "_", value[:48])
    return f"{head}~{hashlib.sha256(value.encode(errors='replace')).hexdigest()[:16]}"
