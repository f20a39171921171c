"""Copy JSONL records into an SQLite table that training reads as `sqlite:///DB?table=NAME`:
`python scripts/jsonl_to_sqlite.py FILE [FILE ...] --db corpus.db [--table docs]`.

One row per record, in order (rowid 1 is the first record); one column per field, added as fields appear. Strings
and numbers are stored as they are, lists and objects (conversations, message lists) as JSON text, which the reader
turns back into lists and objects. Any source training reads works as input (Parquet shards, folders, patterns).
The table is created and filled in one transaction: an error leaves the database as it was.
"""

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a script, Python puts scripts/ first on the path; import from the repository root instead.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import json  # noqa: E402
import sqlite3  # noqa: E402

from utils.data import read_records  # noqa: E402
from utils.errors import InputError, exit_on_input_error  # noqa: E402


def quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def stored(value):
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else value


def write_table(files: list[str], database: Path, table: str) -> int:
    """Insert every record of `files` into a new `table` of `database`; returns the number of rows."""
    connection = sqlite3.connect(database, isolation_level=None)
    try:
        if connection.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (table,)).fetchone():
            raise InputError(f"{database} already has a table {table!r}")
        connection.execute("BEGIN")
        columns: list[str] = []
        rows = 0
        for location, record in read_records(files):
            if not isinstance(record, dict) or not record:
                raise InputError(f"{location}: a record must be a JSON object with at least one field")
            for name in record:
                if name in columns:
                    continue
                if name.lower() in ("rowid", "oid", "_rowid_"):
                    raise InputError(f"{location}: a field named {name!r} would hide the row order")
                if columns:
                    connection.execute(f"ALTER TABLE {quoted(table)} ADD COLUMN {quoted(name)}")
                else:
                    connection.execute(f"CREATE TABLE {quoted(table)} ({quoted(name)})")
                columns.append(name)
            names = ", ".join(map(quoted, record))
            connection.execute(f"INSERT INTO {quoted(table)} ({names}) VALUES ({', '.join('?' * len(record))})",
                               [stored(value) for value in record.values()])
            rows += 1
        if not rows:
            raise InputError(f"no records in {', '.join(map(str, files))}")
        connection.execute("COMMIT")
        return rows
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise
    finally:
        connection.close()


@exit_on_input_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="JSONL files (or any other data source)")
    parser.add_argument("--db", required=True, help="the SQLite database (created when missing)")
    parser.add_argument("--table", default="docs", help="the new table's name (default: docs)")
    args = parser.parse_args()
    database = Path(args.db)
    existed = database.exists()
    try:
        rows = write_table(args.files, database, args.table)
    except BaseException:
        if not existed:
            database.unlink(missing_ok=True)
        raise
    print(f"{rows} rows -> sqlite:///{database}?table={args.table}")


if __name__ == "__main__":
    main()
