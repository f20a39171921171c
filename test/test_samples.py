"""utils/samples.py: greedy text from a live model, plain continuation or a chat reply."""

import torch

from helpers import BOS, EOS, PAD, tiny_config
from model import ByteModel
from utils.samples import greedy_samples

PROMPTS = ["Once upon a time", "从前有座山"]
TOKENS = 8


def tiny_model(tokenizer) -> ByteModel:
    torch.manual_seed(0)
    return ByteModel(tiny_config(vocab_size=len(tokenizer), num_hidden_layers=1, pad_token_id=PAD, bos_token_id=BOS,
                                 eos_token_id=EOS))


def argmax_continuation(model: ByteModel, ids: list[int], steps: int, eos: int, penalty: float = 1.0) -> list[int]:
    """Greedy decoding written out: a full forward per token, no cache, stop after the end token; CTRL's penalty
    divides a positive score (multiplies a negative one) of every token already in the text, prompt included."""
    new = []
    for _ in range(steps):
        scores = model(torch.tensor([ids + new]), use_cache=False).logits[0, -1]
        seen = torch.tensor(sorted(set(ids + new)))
        scores[seen] = torch.where(scores[seen] > 0, scores[seen] / penalty, scores[seen] * penalty)
        token = int(scores.argmax())
        new.append(token)
        if token == eos:
            break
    return new


def test_samples_are_the_argmax_continuation_and_the_mode_is_kept(tokenizer):
    model = tiny_model(tokenizer).train()
    samples = greedy_samples(model, tokenizer, PROMPTS, TOKENS)
    assert model.training  # the run it samples from goes on training
    model.eval()
    for prompt, sample in zip(PROMPTS, samples):
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        expected = argmax_continuation(model, ids, TOKENS, tokenizer.eos_token_id)
        assert sample == tokenizer.decode(expected, skip_special_tokens=True)
    assert greedy_samples(model, tokenizer, PROMPTS, TOKENS) == samples and not model.training


def test_the_repetition_penalty_is_ctrls(tokenizer):
    model = tiny_model(tokenizer).eval()
    # A random model's greedy text repeats itself within a few tokens, so the penalty changes it.
    plain = greedy_samples(model, tokenizer, PROMPTS, 16)
    penalized = greedy_samples(model, tokenizer, PROMPTS, 16, repetition_penalty=1.5)
    assert penalized != plain
    for prompt, sample in zip(PROMPTS, penalized):
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        expected = argmax_continuation(model, ids, 16, tokenizer.eos_token_id, penalty=1.5)
        assert sample == tokenizer.decode(expected, skip_special_tokens=True)


def test_chat_samples_are_replies_to_a_user_turn(tokenizer):
    model = tiny_model(tokenizer).eval()
    (reply,) = greedy_samples(model, tokenizer, PROMPTS[:1], TOKENS, chat=True)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True)
    expected = argmax_continuation(model, rendered["input_ids"], TOKENS, tokenizer.eos_token_id)
    assert reply == tokenizer.decode(expected, skip_special_tokens=True)
    assert reply != greedy_samples(model, tokenizer, PROMPTS[:1], TOKENS)[0]


def test_chat_without_a_template_is_plain(tokenizer):
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = None
    model = tiny_model(tokenizer).eval()
    assert greedy_samples(model, tokenizer, PROMPTS, 4, chat=True) == greedy_samples(model, tokenizer, PROMPTS, 4)
