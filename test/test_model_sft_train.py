"""model_sft_train.py: fine-tuning from a saved model on conversations, loss on assistant tokens only."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

import model  # noqa: F401  (registers the model with the Auto classes)
from helpers import tiny_config
from model import ByteModel
from utils.data import PadCollator, SFTDataset

ROOT = Path(__file__).resolve().parents[1]
SFT_VAL = ROOT / "datasets" / "demo" / "sft_val.jsonl"


def base_model(folder: Path) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "tokenizer")
    config = tiny_config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         max_position_embeddings=256)
    torch.manual_seed(0)
    ByteModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_sft_loss_counts_only_assistant_tokens():
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "tokenizer")
    dataset = SFTDataset([str(SFT_VAL)], tokenizer, max_seq_len=128)
    batch = PadCollator(tokenizer.pad_token_id)([dataset[index] for index in range(4)])
    torch.manual_seed(0)
    language_model = ByteModel(tiny_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)).eval()
    output = language_model(**batch)
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    expected = F.cross_entropy(output.logits[:, :-1][mask], targets[mask])
    torch.testing.assert_close(output.loss, expected, atol=1e-6, rtol=0)
    # The prompts are context only: fewer targets than real tokens.
    assert mask.sum() < (batch["attention_mask"][:, 1:] == 1).sum()


def test_fine_tunes_from_a_saved_model(tmp_path):
    source = base_model(tmp_path / "base")
    out_dir = tmp_path / "sft"
    command = [sys.executable, "model_sft_train.py", "--model.init_from", str(source),
               "--data.tokenizer", str(source), "--data.train_files", f"[{SFT_VAL}]",
               "--data.val_files", f"[{SFT_VAL}]", "--data.seq_len", "128", "--train.out_dir", str(out_dir),
               "--train.max_steps", "12", "--train.micro_batch_size", "4", "--train.precision", "fp32",
               "--optim.lr", "3e-3", "--optim.warmup_steps", "2", "--eval.every_steps", "6", "--eval.patience", "0",
               "--checkpoint.every_steps", "6", "--logging.every_steps", "1", "--logging.swanlab_mode", "disabled",
               "--logging.sample_tokens", "4"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    evals = [row["val_loss"] for row in rows if "val_loss" in row]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert evals[-1] < evals[0]
    tuned = AutoModelForCausalLM.from_pretrained(out_dir / "final")
    original = AutoModelForCausalLM.from_pretrained(source)
    assert not torch.equal(tuned.model.layers[0].mlp.up_proj.weight, original.model.layers[0].mlp.up_proj.weight)
    assert AutoTokenizer.from_pretrained(out_dir / "final").chat_template
    assert "sample:" in result.stderr
