"""Shared fixtures (plain helpers live in helpers.py)."""

import pytest
from transformers import AutoTokenizer

from helpers import BOS, EOS, PAD, ROOT

# Every test this session collected, before `-m` or `-k` deselect any (test_keys checks the tests its rows name).
COLLECTED = pytest.StashKey[set]()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    config.stash[COLLECTED] = {item.nodeid for item in items}


@pytest.fixture(scope="module")
def tokenizer():
    tok = AutoTokenizer.from_pretrained(ROOT / "tokenizer")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, len(tok)) == (PAD, BOS, EOS, 6400)
    return tok
