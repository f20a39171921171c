"""Where data records come from: JSONL files, plain-text files, Parquet shards (read with pyarrow a row group at a
time) and SQLite tables or queries (the standard library's sqlite3, opened read-only).

`data.train_files` / `data.val_files` entries name a file, a folder (its .parquet and .jsonl files, recursively), a
glob pattern (`corpus/*.parquet`) or a database, `sqlite:///corpus.db?table=docs` or `...?query=SELECT ...`
(relative path after three slashes, absolute after four, as in SQLAlchemy). Every source yields its records in a
stable order, each with its row number (counting every record, good or bad) and a location for messages, so a row
number names the same record in every run: token caches, streaming shards and resume positions rely on it.
"""

import glob
import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

from utils.errors import InputError

READ_BATCH = 1024  # rows per Parquet batch and per SQLite fetch: memory stays flat however large the source
FOLDER_SUFFIXES = (".parquet", ".jsonl")


def check_data_file(path: str | Path) -> None:
    if not Path(path).is_file():
        raise InputError(f"data file not found: {path}")


def file_identity(path: str | Path) -> dict:
    """What changes when a file's content may have changed: its resolved path, size and modification time."""
    stat = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


class Malformed:
    """The record of a JSONL line that is not JSON: the reader counts or reports it, with this detail."""

    def __init__(self, detail: str):
        self.detail = detail


class Source:
    """One file or table. `records(skip, columns)` yields (row, location, record) from row `skip` on; `columns`
    limits a record to those fields (a source with a schema refuses a missing one, naming the source)."""

    kind = "file"

    def __init__(self, path: str):
        check_data_file(path)
        self.path = path

    def __str__(self) -> str:
        return str(self.path)

    def identity(self) -> dict:
        return {"kind": self.kind, **file_identity(self.path)}

    def records(self, skip: int = 0, columns: list[str] | None = None) -> Iterator[tuple[int, str, Any]]:
        raise NotImplementedError

    def count(self) -> int:
        """The number of records (rows), good or bad; here a text file's non-blank lines."""
        return _count_lines(self.path)


class JsonlSource(Source):
    """One JSON object per line; blank lines are not records. Locations are `file:line`."""

    kind = "jsonl"

    def records(self, skip=0, columns=None):
        for row, line_number, line in _lines(self.path, skip):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                record = Malformed(f"malformed JSON ({error.msg})")
            yield row, f"{self.path}:{line_number}", record


class TextSource(Source):
    """Plain text, one document per non-blank line: a record `{column: line}` for whichever column is asked for."""

    kind = "text"

    def records(self, skip=0, columns=None):
        name = columns[0] if columns else "text"
        for row, line_number, line in _lines(self.path, skip):
            yield row, f"{self.path}:{line_number}", {name: line.rstrip("\n")}


class ParquetSource(Source):
    """A Parquet file, read a row group at a time in batches; rows are numbered from 0 as pandas and pyarrow number
    them, locations are `file: row group G, row R`. pandas' stored index columns are not fields."""

    kind = "parquet"

    def _file(self):
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(self.path)
        except Exception as error:  # pyarrow raises several types for one meaning: the file is not readable
            raise InputError(f"{self.path}: not a readable Parquet file ({_first_line(error)})") from None

    def _columns(self, parquet, wanted: list[str] | None) -> list[str]:
        names = [name for name in parquet.schema_arrow.names if not name.startswith("__index_level_")]
        return names if wanted is None else _require(self, names, wanted)

    def records(self, skip=0, columns=None):
        parquet = self._file()
        names = self._columns(parquet, columns)
        first_row = 0
        for group in range(parquet.num_row_groups):
            rows_in_group = parquet.metadata.row_group(group).num_rows
            if first_row + rows_in_group <= skip:  # skipped without reading
                first_row += rows_in_group
                continue
            try:
                batches = parquet.iter_batches(batch_size=READ_BATCH, row_groups=[group], columns=names)
                row = first_row
                for batch in batches:
                    for record in batch.to_pylist():
                        if row >= skip:
                            yield row, f"{self.path}: row group {group}, row {row}", record
                        row += 1
            except (OSError, ValueError) as error:  # ArrowInvalid and ArrowIOError derive from these
                raise InputError(f"{self.path}: row group {group} is not readable ({_first_line(error)})") from None
            first_row += rows_in_group

    def count(self) -> int:
        return self._file().metadata.num_rows


class SQLiteSource(Source):
    """`sqlite:///path.db?table=NAME` (rows in rowid order; locations name the rowid) or `sqlite:///path.db?query=SQL`
    (URL-encoded; the query's ORDER BY is the order). Opened read-only: a query that would write fails. SQLite has no
    list type: a text value holding a JSON array or object is read as that value, as in a JSONL record, except in
    `text` and the columns asked for, which hold documents."""

    kind = "sqlite"

    def __init__(self, spec: str):
        self.spec = spec
        parts = urlsplit(spec)
        if parts.netloc:
            raise InputError(f"{spec}: write sqlite:///relative/path.db or sqlite:////absolute/path.db")
        self.database = parts.path[1:]
        check_data_file(self.database)
        options = dict(parse_qsl(parts.query, keep_blank_values=True))
        unknown = sorted(set(options) - {"table", "query"})
        if unknown or len(options) != 1:
            raise InputError(f"{spec}: give exactly one of ?table=NAME or ?query=SELECT..."
                             + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
        self.table, self.query = options.get("table"), options.get("query")
        if not (self.table or self.query or "").strip():
            raise InputError(f"{spec}: empty {'table name' if self.table is not None else 'query'}")

    def __str__(self) -> str:
        return self.spec

    def identity(self) -> dict:
        # Writes may sit in the write-ahead log until a checkpoint moves them into the database file.
        wal = Path(self.database + "-wal")
        return {"kind": self.kind, "table": self.table, "query": self.query, **file_identity(self.database),
                "wal": file_identity(wal) if wal.is_file() else None}

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(f"file:{quote(str(Path(self.database).resolve()))}?mode=ro", uri=True)
        connection.execute("PRAGMA query_only = ON")
        # Read-only still lets ATTACH and VACUUM INTO create files; both ask the authorizer as an attach.
        connection.set_authorizer(lambda action, *_: sqlite3.SQLITE_DENY if action == sqlite3.SQLITE_ATTACH
                                  else sqlite3.SQLITE_OK)
        return connection

    def _execute(self, connection: sqlite3.Connection, sql: str, parameters=()) -> sqlite3.Cursor:
        try:
            return connection.execute(sql, parameters)
        except (sqlite3.Error, sqlite3.Warning) as error:
            what = f"cannot read table {self.table!r}" if self.table is not None else "the query failed"
            read_only = any(word in str(error) for word in ("readonly", "authoriz"))
            hint = " (the database is opened read-only: a query may only read)" if read_only else ""
            raise InputError(f"{self}: {what}: {error}{hint}") from None

    def _select(self) -> str:
        if self.table is not None:
            return f'SELECT rowid, * FROM "{self.table.replace(chr(34), chr(34) * 2)}" ORDER BY rowid'
        return self.query

    def records(self, skip=0, columns=None):
        connection = self._connect()
        try:
            sql, parameters = self._select(), ()
            if self.table is not None and skip:
                sql, parameters = sql + " LIMIT -1 OFFSET ?", (skip,)
            cursor = self._execute(connection, sql, parameters)
            if cursor.description is None:
                raise InputError(f"{self}: the statement returns no columns (a query must be a SELECT)")
            names = [description[0] for description in cursor.description]
            if self.table is not None:
                names = names[1:]
            selected = names if columns is None else _require(self, names, columns)
            positions = [names.index(name) + (self.table is not None) for name in selected]
            row = skip if self.table is not None else 0
            as_text = {"text", *(columns or ())}
            while True:
                try:
                    rows = cursor.fetchmany(READ_BATCH)
                except sqlite3.Error as error:
                    raise InputError(f"{self}: reading row {row} failed: {error}") from None
                if not rows:
                    break
                for values in rows:
                    if row >= skip:
                        location = (f"{self} rowid {values[0]}" if self.table is not None else f"{self} row {row}")
                        yield row, location, {name: values[position] if name in as_text else _json_value(
                            values[position]) for name, position in zip(selected, positions)}
                    row += 1
        finally:
            connection.close()

    def count(self) -> int:
        connection = self._connect()
        try:
            if self.table is None:  # a query's own text may end in ";" or a comment: it cannot be nested
                return sum(1 for _ in self._execute(connection, self.query))
            return self._execute(connection, f"SELECT COUNT(*) FROM ({self._select()})").fetchone()[0]
        finally:
            connection.close()


def _lines(path: str, skip: int) -> Iterator[tuple[int, int, str]]:
    """(row, line number, line) for the non-blank lines of a text file from row `skip` on (a row is a non-blank
    line)."""
    row = 0
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            if row >= skip:
                yield row, line_number, line
            row += 1


def _count_lines(path: str) -> int:
    with open(path, encoding="utf-8", errors="replace") as handle:
        return sum(1 for line in handle if line.strip())


def _json_value(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _require(source: Source, names: list[str], wanted: list[str]) -> list[str]:
    missing = [name for name in wanted if name not in names]
    if missing:
        raise InputError(f"{source}: no column {missing[0]!r} (its columns: {', '.join(names) or 'none'})")
    return list(wanted)


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def open_source(path: str) -> Source:
    if path.startswith("sqlite:"):
        return SQLiteSource(path)
    suffix = Path(path).suffix
    return {".jsonl": JsonlSource, ".parquet": ParquetSource}.get(suffix, TextSource)(path)


def data_sources(entries: list[str | Source]) -> list[Source]:
    """The sources that `data.*_files` entries name, in order; a folder or pattern expands to its files sorted by
    path. An entry that names nothing is an error."""
    if not entries:
        raise InputError("no data files given")
    sources = []
    for entry in entries:
        if isinstance(entry, Source):
            sources.append(entry)
            continue
        entry = str(entry)
        if entry.startswith("sqlite:"):
            sources.append(SQLiteSource(entry))
        elif glob.has_magic(entry):
            matches = sorted(path for path in glob.glob(entry, recursive=True) if Path(path).is_file())
            if not matches:
                raise InputError(f"no data files match {entry}")
            sources.extend(map(open_source, matches))
        elif Path(entry).is_dir():
            matches = sorted(str(path) for path in Path(entry).rglob("*")
                             if path.suffix in FOLDER_SUFFIXES and path.is_file())
            if not matches:
                raise InputError(f"{entry}: no {' or '.join(FOLDER_SUFFIXES)} files in this folder")
            sources.extend(map(open_source, matches))
        else:
            sources.append(open_source(entry))
    return sources
