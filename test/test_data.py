"""utils/data.py: reading JSONL data files."""

import pytest

from utils.config import InputError
from utils.data import document_texts, read_jsonl


def test_read_jsonl_skips_blank_lines_and_numbers_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n', encoding="utf-8")
    assert list(read_jsonl(path)) == [(1, {"text": "a"}), (3, {"text": "b"})]


def test_read_jsonl_names_file_and_line_of_malformed_json(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(InputError, match=r"data\.jsonl:2: malformed JSON"):
        list(read_jsonl(path))
    with pytest.raises(InputError, match="data file not found"):
        list(read_jsonl(tmp_path / "missing.jsonl"))


def test_document_texts():
    assert document_texts({"text": "hello"}) == ["hello"]
    conversation = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "hi"}]
    assert document_texts({"conversations": conversation}) == ["你好", "hi"]
    assert document_texts({"messages": conversation}) == ["你好", "hi"]
    assert document_texts({"title": "x"}) == [] and document_texts([1, 2]) == []
