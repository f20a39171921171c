"""scripts/benchmark.py's inference rows: on tiny models, what each row claims must follow from what ran."""

import argparse
import sys
from pathlib import Path

import pytest
import torch

from helpers import randomize_, tiny_config
from model import ByteModel
from utils.quantize import weight_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import benchmark  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def tiny(seed: int, **overrides) -> ByteModel:
    torch.manual_seed(seed)
    # the demo tokenizer's vocabulary, so that the rows run on the demo validation text
    return randomize_(ByteModel(tiny_config(vocab_size=6400, max_position_embeddings=128, **overrides))).eval()


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    from transformers import AutoTokenizer
    args = argparse.Namespace(val_files=[str(ROOT / "datasets/demo/pretrain_val.jsonl")], quality_windows=2,
                              prompt_len=8, quantize=["int8", "int4"], compile=False, generate_batches=[1, 2],
                              inference_new_tokens=6, generate_rounds=1)
    target, draft = tiny(0), tiny(1, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=1)
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "tokenizer")
    with torch.random.fork_rng():
        return target, draft, benchmark.inference_rows("tiny", target, tokenizer, draft, args)


def test_inference_rows_cover_every_variant_and_batch(rows):
    """Batch 1 has the reference, fp32, int8, int4 and both speculative rows; batch 2 no speculative ones
    (assisted generation takes one sequence)."""
    _, _, rows = rows
    by_batch = {batch: [row["variant"] for row in rows if row["batch"] == batch] for batch in (1, 2)}
    assert by_batch[1] == ["Llama fp32", "ByteModel fp32", "ByteModel int8", "ByteModel int4",
                           "ByteModel fp32 + draft", "ByteModel fp32 + int8 self-draft"]
    assert by_batch[2] == by_batch[1][:4]


def test_inference_rows_are_consistent(rows):
    """Llama at the same weights gives the fp32 tokens and perplexity; speculative rows keep the fp32 tokens, accept
    a share in [0, 1] of the draft's tokens and read the target's and the draft's weights; plain rows read the
    model's weights once per token (per row of the batch)."""
    target, draft, rows = rows
    fp32 = next(row for row in rows if row["variant"] == "ByteModel fp32" and row["batch"] == 1)
    for row in rows:
        assert row["ratio"] > 0 and row["tokens_per_s"] > 0
        if row["variant"] == "Llama fp32":
            assert row["tokens_equal_fp32"] and row["ppl"] == pytest.approx(fp32["ppl"], rel=1e-4)
            assert row["ratio"] == 1
        if "draft" in row["variant"]:
            assert row["tokens_equal_fp32"]
            assert 0 <= row["acceptance"] <= 1
            assert row["ppl"] == fp32["ppl"]
        else:
            assert row["acceptance"] is None
            assert row["read_mib_per_token"] * 2**20 == pytest.approx(row["weight_mib"] * 2**20 / row["batch"])
    int8 = next(row for row in rows if row["variant"] == "ByteModel int8")
    assert int8["weight_mib"] < fp32["weight_mib"] / 3
    assert fp32["weight_mib"] * 2**20 == weight_bytes(target)
    speculative = next(row for row in rows if row["variant"] == "ByteModel fp32 + draft")
    # at least one target pass, and every draft token proposed read the draft's weights
    assert speculative["read_mib_per_token"] * 2**20 * 6 >= weight_bytes(target)
    assert weight_bytes(draft) < weight_bytes(target)


def test_stream_read_bandwidth_is_plausible():
    """The measured streaming read is a bandwidth of a real machine: between 0.1 and 1000 GB/s."""
    assert 1e8 < benchmark.stream_read_bandwidth(megabytes=64, repeats=2) < 1e12


@pytest.mark.slow
def test_grpo_rows_time_both_trainers_on_the_same_work(tmp_path, monkeypatch):
    """The GRPO rows: our step and TRL's GRPOTrainer's, each a positive rate, the ratio ours / theirs."""
    monkeypatch.chdir(ROOT)
    args = argparse.Namespace(grpo_steps=1, grpo_prompts=2, grpo_generations=2, grpo_tokens=4,
                              tokenizer=str(ROOT / "tokenizer"))
    result = {"rows": []}
    with torch.random.fork_rng():
        benchmark.grpo_rows(args, result)
    ours, theirs = result["rows"]
    assert (ours["variant"], theirs["variant"]) == ("StellarByte", "TRL GRPOTrainer")
    assert ours["steps_per_s"] > 0 and theirs["steps_per_s"] > 0 and theirs["ratio"] == 1.0
    assert ours["ratio"] == pytest.approx(ours["steps_per_s"] / theirs["steps_per_s"])
    assert ours["tokens_per_s"] == pytest.approx(ours["steps_per_s"] * 2 * 2 * 4)
    assert "| grpo step |" in benchmark.markdown({**result, "date": "d", "machine": "m", "peak_matmul_flops": {},
                                                  "settings": {}})
