"""Reading the project's data files."""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from utils.config import InputError


def read_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed object) for every non-blank line; a malformed line raises InputError naming
    the file and line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file not found: {path}")
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield line_number, json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(f"{path}:{line_number}: malformed JSON ({error.msg})") from None


def document_texts(record: Any) -> list[str]:
    """The texts of one data record: `{"text": ...}` for pretraining, or the turn contents of
    `{"conversations"|"messages": [{"role", "content"}, ...]}`."""
    if isinstance(record, dict):
        if isinstance(record.get("text"), str):
            return [record["text"]]
        turns = record.get("conversations", record.get("messages"))
        if isinstance(turns, list):
            return [turn["content"] for turn in turns if isinstance(turn, dict) and isinstance(turn.get("content"), str)]
    return []
