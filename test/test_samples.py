"""utils/samples.py: sampled text from a saved model folder, plain continuation or a chat reply."""

import pytest
import torch

from helpers import BOS, EOS, PAD, tiny_config
from model import ByteModel
from utils.samples import generate_sample

PROMPT = "Once upon a time"
TOKENS = 12


def save_model(folder, tokenizer):
    torch.manual_seed(0)
    model = ByteModel(tiny_config(vocab_size=len(tokenizer), num_hidden_layers=1, pad_token_id=PAD,
                                  bos_token_id=BOS, eos_token_id=EOS))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer):
    return save_model(tmp_path_factory.mktemp("model"), tokenizer)


@pytest.fixture(scope="module")
def plain(folder):
    """The plain sample with seed 3, shared by the tests that only read it."""
    return generate_sample(folder, PROMPT, TOKENS, seed=3)


def test_same_seed_same_text(folder, plain):
    torch.manual_seed(99)  # the global RNG state before the call must not matter
    assert generate_sample(folder, PROMPT, TOKENS, seed=3) == plain


def test_other_seed_other_text(folder, plain):
    assert generate_sample(folder, PROMPT, TOKENS, seed=4) != plain


def test_plain_sample_continues_the_prompt(plain):
    assert plain.startswith(PROMPT) and len(plain) > len(PROMPT)


def test_chat_sample_is_the_reply_only(folder, tokenizer):
    # The chat prompt written out by the template, then continued as plain text with the same seed: the tokens are
    # the same, so the chat reply is what follows the decoded prompt.
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                             tokenize=False)
    assert rendered.endswith("<|assistant|>")
    prefix = tokenizer.decode(tokenizer(rendered, add_special_tokens=False).input_ids, skip_special_tokens=True)
    continuation = generate_sample(folder, rendered, TOKENS, seed=5)
    reply = generate_sample(folder, PROMPT, TOKENS, seed=5, chat=True)
    assert continuation.startswith(prefix)
    assert reply == continuation[len(prefix):]
    assert reply and PROMPT not in reply


def test_chat_without_a_template_is_plain(tmp_path, tokenizer):
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = None
    folder = save_model(tmp_path, tokenizer)
    assert (generate_sample(folder, PROMPT, 4, seed=1, chat=True)
            == generate_sample(folder, PROMPT, 4, seed=1, chat=False))
