"""Shared fixtures and helpers: repository paths, the demo tokenizer, data-file helpers for test_data_*.py."""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "datasets" / "demo"
PAD, BOS, EOS = 0, 1, 2


@pytest.fixture(scope="module")
def tokenizer():
    tok = AutoTokenizer.from_pretrained(ROOT / "tokenizer")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, len(tok)) == (PAD, BOS, EOS, 6400)
    return tok


def write_lines(path: Path, lines: list) -> Path:
    """Write records (dumped as JSON) or raw strings, one per line."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n"
                            for line in lines), encoding="utf-8")
    return path


def expected_stream(tokenizer, texts: list[str], eos: int = EOS) -> list[int]:
    """The packed token stream written by hand: each document's ids without specials, then EOS."""
    stream = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False).input_ids + [eos]
    return stream


def unpack(dataset) -> list[int]:
    """Rebuild the token stream from the windows: the first input token, then every window's targets."""
    stream = [int(dataset[0]["input_ids"][0])]
    for index in range(len(dataset)):
        stream += dataset[index]["shift_labels"].tolist()
    return stream


TWO_TURNS = [{"role": "user", "content": "What is 2 + 3?"},
             {"role": "assistant", "content": "2 + 3 = 5.\nAnything else?"}]
MULTI_TURNS = [{"role": "system", "content": "You are a helpful assistant."},
               {"role": "user", "content": "你好，请介绍一下你自己。"},
               {"role": "assistant", "content": "我是一个小模型，可以回答简单的问题。"},
               {"role": "user", "content": "Write a Python function that adds two numbers."},
               {"role": "assistant", "content": "def add(a, b):\n    return a + b"}]
