"""SQL over a dataset's committed shards with DuckDB: views `clips` and `videos`, a read-only guard, output.

`connect(out)` opens an in-memory DuckDB connection whose views `clips` and `videos` read exactly the
Parquet files named by OUT's commit records (never a glob of the directory, so half-written or stray files
are invisible), projected onto the full column list of `storage/schema.py` (columns absent from older shards
read as NULL of the right type; with nothing committed the views exist and are empty).

Unless `allow_external=True` the connection is locked down in two layers:

1. DuckDB's own configuration: `allowed_paths` = the committed shard files, external access off,
   extension autoload/autoinstall off, then `lock_configuration`. This refuses reading any other file
   (`read_csv('/etc/passwd')`, `glob('/etc/*')`, ATTACH of a file, INSTALL/LOAD, EXPORT DATABASE) and any
   change of settings. It does NOT stop writes to the allowed files themselves (measured with DuckDB 2.0:
   `COPY ... TO '<committed shard>' (USE_TMP_FILE false)` overwrites it), nor in-memory DDL/DML.
2. A statement-type guard (`check_read_only`): only SELECT (incl. DESCRIBE/SHOW/SUMMARIZE/PIVOT, which
   DuckDB parses as SELECT), EXPLAIN of a SELECT, and a few read-only PRAGMAs are run; everything else is
   refused with `QueryRefused` before any statement of the text is executed.

So user SQL must go through `execute()` / `run_query()`; the bare connection from `connect()` only has layer 1.

Output (`write_result`): `table` (aligned text), `csv`, `json` (JSON lines), `parquet` (needs a path).
In table/csv/json, binary columns (media, thumbnail) are written as the placeholder `<N bytes>` -- use
parquet to export the bytes themselves. Lists and structs are JSON in csv; lists are truncated in `table`.
"""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import io
import json
import logging
import math
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from clipmill.storage.schema import CLIPS_SCHEMA, VIDEOS_SCHEMA
from clipmill.storage.shards import committed_files

log = logging.getLogger(__name__)

VIEWS: dict[str, pa.Schema] = {"clips": CLIPS_SCHEMA, "videos": VIDEOS_SCHEMA}
FORMATS = ("table", "csv", "json", "parquet")

# PRAGMAs that only read catalog/version information.
_READ_PRAGMAS = frozenset({
    "table_info", "show", "show_tables", "show_tables_expanded", "database_list", "database_size",
    "version", "platform", "functions", "collations",
})
_LEADING_TRIVIA = re.compile(r"^(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*", re.S)
_PRAGMA = re.compile(r"^PRAGMA\s+([A-Za-z_][A-Za-z_0-9]*)\s*(\(.*\))?\s*;?\s*$", re.S | re.I)
_EXPLAIN = re.compile(r"^EXPLAIN\s+(?:ANALY[SZ]E\s+)?(?:\([^()]*\)\s*)?", re.I)
_GUARD_OFF = "pass --allow-external (allow_external=True) to turn this guard off"


class QueryError(RuntimeError):
    """A query could not be run: a DuckDB error (syntax, unknown column, ...) with a hint, or a bad output."""


class QueryRefused(QueryError):
    """A statement was refused by the read-only guard (it is not a read statement)."""


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _duckdb_types(con: duckdb.DuckDBPyConnection, schema: pa.Schema) -> dict[str, str]:
    """DuckDB SQL type of each column of an Arrow schema, as DuckDB itself maps it."""
    rel = con.from_arrow(schema.empty_table())
    return {name: str(typ) for name, typ in zip(rel.columns, rel.types, strict=True)}


def _view_sql(name: str, schema: pa.Schema, files: list[Path], types: dict[str, str]) -> str:
    """CREATE VIEW over exactly `files`, projected onto `schema` (absent columns as typed NULL)."""
    present: set[str] = set()
    for f in files:
        present.update(pq.read_schema(f).names)
    cols = []
    for field in schema:
        col, typ = _ident(field.name), types[field.name]
        cols.append(f"CAST({col} AS {typ}) AS {col}" if field.name in present else f"CAST(NULL AS {typ}) AS {col}")
    select = ",\n  ".join(cols)
    if files:
        paths = ", ".join(_literal(str(f)) for f in files)
        source = f"read_parquet([{paths}], union_by_name = true)"
        return f"CREATE VIEW {_ident(name)} AS SELECT\n  {select}\nFROM {source}"
    return f"CREATE VIEW {_ident(name)} AS SELECT\n  {select}\nWHERE false"


def connect(out: str | os.PathLike, *, allow_external: bool = False) -> duckdb.DuckDBPyConnection:
    """Open an in-memory DuckDB connection with views `clips` and `videos` over OUT's committed shards.

    The views read only the files named in OUT's commit records, as of this call (shards committed later
    need a new connection). Unless `allow_external`, DuckDB is configured to read only those files and the
    configuration is locked (see the module docstring); this does NOT make the connection read-only --
    run user SQL through `execute()` or `run_query()`, which add the statement-type guard.
    Raises QueryError when OUT is not a directory.
    """
    root = Path(out).resolve()
    if not root.is_dir():
        raise QueryError(f"{out} is not a directory; give the output directory of a clipmill run")
    con = duckdb.connect(":memory:")
    try:
        con.execute("SET TimeZone = 'UTC'")  # timestamps come back in UTC whatever the machine's zone
        allowed: list[Path] = []
        for name, schema in VIEWS.items():
            files = [Path(p).resolve() for p in committed_files(root, name)]
            missing = [str(p) for p in files if not p.is_file()]
            if missing:
                raise QueryError(
                    f"{name}: committed file(s) missing from the dataset: {', '.join(missing[:3])}; "
                    f"the dataset is damaged or being recovered -- open it with a clipmill writer to recover"
                )
            con.execute(_view_sql(name, schema, files, _duckdb_types(con, schema)))
            allowed.extend(files)
        log.debug("opened %s: %d committed files", root, len(allowed))
        if not allow_external:
            paths = ", ".join(_literal(str(p)) for p in allowed)
            con.execute(f"SET allowed_paths = [{paths}]")
            con.execute("SET allowed_directories = []")
            con.execute("SET autoinstall_known_extensions = false")
            con.execute("SET autoload_known_extensions = false")
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
    except (duckdb.Error, OSError) as exc:
        con.close()
        raise QueryError(f"cannot open {out} for SQL: {exc}") from exc
    except QueryError:
        con.close()
        raise
    return con


def _strip_trivia(text: str) -> str:
    return _LEADING_TRIVIA.sub("", text, count=1)


def _refuse(kind: str, query: str, why: str = "") -> QueryRefused:
    snippet = " ".join(_strip_trivia(query).split())[:80]
    return QueryRefused(
        f"refused {kind} statement: {snippet!r}. Only read statements (SELECT, DESCRIBE, SHOW, SUMMARIZE, "
        f"EXPLAIN SELECT, read-only PRAGMAs) run on a dataset{why}; {_GUARD_OFF}."
    )


def _check_statement(con: duckdb.DuckDBPyConnection, stmt: Any) -> None:
    kind = stmt.type
    if kind == duckdb.StatementType.SELECT:
        return
    query = stmt.query
    if kind == duckdb.StatementType.PRAGMA:
        m = _PRAGMA.match(_strip_trivia(query))
        if m and m.group(1).lower() in _READ_PRAGMAS:
            return
        raise _refuse("PRAGMA", query, f" (read-only PRAGMAs: {', '.join(sorted(_READ_PRAGMAS))})")
    if kind == duckdb.StatementType.EXPLAIN:
        body = _strip_trivia(query)
        m = _EXPLAIN.match(body)
        inner = []
        if m:
            try:
                inner = con.extract_statements(body[m.end():])
            except duckdb.Error:
                inner = []
        if len(inner) == 1 and inner[0].type == duckdb.StatementType.SELECT:
            return
        raise _refuse("EXPLAIN", query, " (EXPLAIN [ANALYZE] only of a SELECT)")
    if kind == duckdb.StatementType.MULTI:
        raise _refuse("MULTI", query, " (a PIVOT without an IN list runs several statements: write "
                                      "PIVOT ... ON col IN (v1, v2, ...))")
    if kind == duckdb.StatementType.CALL:
        raise _refuse("CALL", query, " (write SELECT * FROM fn(...) instead of CALL fn(...))")
    raise _refuse(kind.name, query)


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> list[Any]:
    """Parse `sql` and return its statements if every one is a read statement; else raise QueryRefused.

    Allowed: SELECT (DuckDB also parses DESCRIBE, SHOW, SUMMARIZE, FROM-first and PIVOT with an IN list as
    SELECT), EXPLAIN [ANALYZE] of a SELECT, PRAGMA table_info/show_tables/version and similar. Refused:
    everything else (COPY, EXPORT, ATTACH, INSTALL/LOAD, SET/RESET, CREATE/INSERT/UPDATE/DELETE/DROP/ALTER,
    CALL, writing PRAGMAs, multi-statement PIVOT, ...). Nothing is executed here; one refused statement
    refuses the whole text. A parse error raises QueryError.
    """
    statements = _extract(con, sql)
    for stmt in statements:
        _check_statement(con, stmt)
    return statements


def _extract(con: duckdb.DuckDBPyConnection, sql: str) -> list:
    """The parsed statements of `sql`; QueryError on a parse error or an empty text."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(f"{exc}\nHint: {_hint(con)}") from exc
    if not statements:
        raise QueryError("no SQL statement given")
    return statements


def _hint(con: duckdb.DuckDBPyConnection) -> str:
    parts = []
    for name in VIEWS:
        try:
            cols = [r[0] for r in con.execute(f"DESCRIBE {_ident(name)}").fetchall()]
        except duckdb.Error:
            continue
        parts.append(f"{name}({', '.join(cols)})")
    return "views are " + "; ".join(parts) if parts else "the views clips and videos are not defined"


def execute(con: duckdb.DuckDBPyConnection, sql: str, *, allow_external: bool = False) -> pa.Table:
    """Run `sql` (one or more statements) on `con` and return the last statement's result as Arrow.

    Unless `allow_external`, every statement must pass `check_read_only` first (nothing runs otherwise).
    Statements without a result give an empty table. DuckDB errors become QueryError with DuckDB's message
    and the views' columns as a hint. Does not close `con`.
    """
    if allow_external:
        statements = _extract(con, sql)
    else:
        statements = check_read_only(con, sql)
    result = pa.table({})
    for stmt in statements:
        try:
            rel = con.sql(stmt)
            result = rel.to_arrow_table() if rel is not None else pa.table({})
        except duckdb.PermissionException as exc:
            raise QueryError(
                f"{exc}\nHint: only the dataset's committed shards can be read; {_GUARD_OFF}"
            ) from exc
        except duckdb.Error as exc:
            raise QueryError(f"{exc}\nHint: {_hint(con)}") from exc
    return result


def run_query(out: str | os.PathLike, sql: str, *, allow_external: bool = False) -> pa.Table:
    """Open OUT with `connect`, run `sql` through `execute`, close, and return the result as an Arrow table."""
    con = connect(out, allow_external=allow_external)
    try:
        return execute(con, sql, allow_external=allow_external)
    finally:
        con.close()


# ---------------------------------------------------------------- output

_MAX_LIST = 8
_MAX_TEXT = 60


def _plain(value: Any) -> Any:
    """A JSON-able Python value: bytes -> '<N bytes>', floats NaN/inf -> None, times -> ISO strings."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def _cell_csv(value: Any) -> str:
    v = _plain(value)
    if v is None:
        return ""
    if isinstance(v, (dict, list)):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _short(text: str, limit: int = _MAX_TEXT) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _cell_table(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, (list, tuple)):
        shown = [_cell_table(v) for v in value[:_MAX_LIST]]
        more = f", … +{len(value) - _MAX_LIST}" if len(value) > _MAX_LIST else ""
        return _short("[" + ", ".join(shown) + more + "]", 2 * _MAX_TEXT)
    if isinstance(value, dict):
        return _short("{" + ", ".join(f"{k}: {_cell_table(v)}" for k, v in value.items()) + "}")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    return _short(str(value))


def _numeric(typ: pa.DataType) -> bool:
    return pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_decimal(typ)


def format_table(table: pa.Table, *, max_rows: int | None = None) -> str:
    """The result as an aligned plain-text table (numbers right-aligned, NULL shown, bytes as `<N bytes>`,
    long text and lists truncated). `max_rows` limits the rows shown (a footer says how many were hidden)."""
    names = table.column_names
    if not names:
        return "(no columns)\n"
    shown = table if max_rows is None else table.slice(0, max_rows)
    columns = [[_cell_table(v) for v in shown.column(i).to_pylist()] for i in range(len(names))]
    widths = [max([len(n)] + [len(c) for c in col]) for n, col in zip(names, columns, strict=True)]
    right = [_numeric(f.type) for f in table.schema]

    def line(cells: Iterable[str]) -> str:
        out = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)]
        return " | ".join(out).rstrip()

    lines = [line(names), "-+-".join("-" * w for w in widths)]
    lines += [line(row) for row in zip(*columns, strict=True)]
    footer = f"({table.num_rows} row{'s' if table.num_rows != 1 else ''}"
    if shown.num_rows < table.num_rows:
        footer += f", {shown.num_rows} shown"
    lines.append(footer + ")")
    return "\n".join(lines) + "\n"


def _write_csv(table: pa.Table, f: IO[str]) -> None:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(table.column_names)
    for batch in table.to_batches():
        cols = [c.to_pylist() for c in batch.columns]
        for row in zip(*cols, strict=True):
            w.writerow([_cell_csv(v) for v in row])


def _write_json(table: pa.Table, f: IO[str]) -> None:
    names = table.column_names
    for batch in table.to_batches():
        for row in batch.to_pylist():
            f.write(json.dumps({n: _plain(row[n]) for n in names}, ensure_ascii=False, allow_nan=False))
            f.write("\n")


def write_result(table: pa.Table, fmt: str, output: str | os.PathLike | None = None) -> None:
    """Write a query result in `fmt` ('table', 'csv', 'json' = JSON lines, 'parquet') to `output` or stdout.

    Binary values are written as `<N bytes>` in table/csv/json (a warning is logged when a result has binary
    columns); parquet keeps them and every type, and needs an `output` path. csv writes lists/structs as
    JSON text and NULL as an empty field. Raises QueryError on an unknown format or a missing parquet path.
    """
    if fmt not in FORMATS:
        raise QueryError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "parquet":
        if output is None:
            raise QueryError("parquet output needs a file: give an output path (--output result.parquet)")
        pq.write_table(table, output)
        log.info("wrote %d rows to %s", table.num_rows, output)
        return
    binary = [f.name for f in table.schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]
    if binary and fmt != "table":
        log.warning("column(s) %s written as '<N bytes>' placeholders; use parquet output to export bytes",
                    ", ".join(binary))
    writers = {"table": lambda t, f: f.write(format_table(t)), "csv": _write_csv, "json": _write_json}
    if output is None:
        writers[fmt](table, sys.stdout)
        sys.stdout.flush()
        return
    with open(output, "w", encoding="utf-8", newline="") as f:
        writers[fmt](table, f)
    log.info("wrote %d rows to %s", table.num_rows, output)


def result_text(table: pa.Table, fmt: str) -> str:
    """The result rendered as text in 'table', 'csv' or 'json' format (what `write_result` writes)."""
    if fmt not in ("table", "csv", "json"):
        raise QueryError(f"format {fmt!r} has no text form; choose table, csv or json")
    buf = io.StringIO()
    {"table": lambda t, f: f.write(format_table(t)), "csv": _write_csv, "json": _write_json}[fmt](table, buf)
    return buf.getvalue()


__all__ = [
    "FORMATS", "QueryError", "QueryRefused", "check_read_only", "connect", "execute", "format_table",
    "result_text", "run_query", "write_result",
]
