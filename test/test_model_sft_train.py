"""model_sft_train.py: fine-tuning from a saved model on conversations, loss on assistant tokens only."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

import model  # noqa: F401  (registers the model with the Auto classes)
from helpers import tiny_config
from model import ByteModel
from utils.data import PadCollator, SFTDataset
from utils.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
SFT_VAL = ROOT / "datasets" / "demo" / "sft_val.jsonl"
PRETRAIN_VAL = ROOT / "datasets" / "demo" / "pretrain_val.jsonl"


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


@pytest.mark.slow
def test_fine_tunes_from_a_saved_model(tmp_path):
    source = base_model(tmp_path / "base")
    out_dir = tmp_path / "sft"
    # No --data.tokenizer: the starting folder's own tokenizer is used.
    command = [sys.executable, "model_sft_train.py", "--model.init_from", str(source), "--data.train_files", f"[{SFT_VAL}]",
               "--data.val_files", f"[{SFT_VAL}]", "--data.seq_len", "128", "--train.out_dir", str(out_dir),
               "--train.max_steps", "12", "--train.micro_batch_size", "4", "--train.precision", "fp32",
               "--optim.lr", "3e-3", "--optim.warmup_steps", "2", "--eval.every_steps", "6", "--eval.patience", "0",
               "--checkpoint.every_steps", "6", "--logging.every_steps", "1", "--logging.swanlab_mode", "disabled",
               "--logging.sample_tokens", "4", "--logging.plots", "false", "--eval.generation_samples", "3",
               "--eval.generation_tokens", "5"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    generation = json.loads((out_dir / "generation_eval.json").read_text())
    assert generation["num_samples"] == 3 and 0 <= generation["bleu"] <= 1 and 0 <= generation["rougeL"] <= 1
    assert rows[-1]["step"] == 12 and rows[-1]["rouge1"] == generation["rouge1"]
    assert "BLEU" in result.stderr and "METEOR" in result.stderr
    losses = [row["loss"] for row in rows if "loss" in row]
    evals = [row["val_loss"] for row in rows if "val_loss" in row]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert evals[-1] < evals[0]
    tuned = AutoModelForCausalLM.from_pretrained(out_dir / "final")
    original = AutoModelForCausalLM.from_pretrained(source)
    assert not torch.equal(tuned.model.layers[0].mlp.up_proj.weight, original.model.layers[0].mlp.up_proj.weight)
    assert AutoTokenizer.from_pretrained(out_dir / "final").chat_template
    assert "sample:" in result.stderr
    assert f"tokenizer: {source}" in result.stderr


def lora_config(source: Path, out_dir: Path, **train):
    from utils.config import SFTConfig, build_config

    return build_config(SFTConfig, {
        "model": {"init_from": str(source)},
        "data": {"train_files": [str(SFT_VAL)], "val_files": [str(SFT_VAL)], "tokenizer": str(source),
                 "seq_len": 128},
        "train": {"out_dir": str(out_dir), "max_steps": 6, "micro_batch_size": 4, "precision": "fp32", **train},
        "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 1},
        "checkpoint": {"every_steps": 3, "keep_last": 3},
        "eval": {"every_steps": 3, "max_batches": 2},
        "logging": {"every_steps": 1, "swanlab_mode": "disabled", "sample_tokens": 4, "plots": False},
        "lora": {"enabled": True, "rank": 4, "alpha": 8.0, "dropout": 0.0},
    })


@pytest.mark.slow
def test_lora_trains_only_adapters_and_the_merge_equals_the_adapted_model(tmp_path, monkeypatch):
    from peft import PeftModel

    import model_sft_train
    import utils.trainer

    source = base_model(tmp_path / "base")
    original = AutoModelForCausalLM.from_pretrained(source)
    summary = Trainer(lora_config(source, tmp_path / "a"), model_sft_train.SFT).fit()
    assert summary["reason"] == "finished" and summary["step"] == 6
    step = tmp_path / "a" / "checkpoints" / "step_6"
    assert (step / "adapter_model.safetensors").is_file() and not (step / "model.safetensors").exists()
    adapter = tmp_path / "a" / "final" / "adapter"
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(source), adapter).eval()
    # Only adapter weights were trained: every base weight equals the source model's.
    base_state = adapted.get_base_model().state_dict()
    for name, tensor in original.state_dict().items():
        key = name.replace("q_proj.weight", "q_proj.base_layer.weight")
        for projection in ("k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            key = key.replace(f"{projection}.weight", f"{projection}.base_layer.weight")
        assert torch.equal(base_state[key], tensor), name
    assert any(parameter.abs().sum() > 0 for name, parameter in adapted.named_parameters() if "lora_B" in name)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "final").eval()
    ids = torch.randint(0, original.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=0)
        assert not torch.allclose(merged(ids).logits, original(ids).logits, atol=1e-4)

    # Resuming a LoRA run from its adapter checkpoint continues exactly.
    calls = {"count": 0}
    original_any_rank = utils.trainer.any_rank

    def stop_after_three(flag, context):
        calls["count"] += 1
        return True if calls["count"] == 4 else original_any_rank(flag, context)

    monkeypatch.setattr(utils.trainer, "any_rank", stop_after_three)
    config = lora_config(source, tmp_path / "b")
    assert Trainer(config, model_sft_train.SFT).fit()["reason"] == "stopped by signal"
    monkeypatch.setattr(utils.trainer, "any_rank", original_any_rank)
    resumed = Trainer(config, model_sft_train.SFT, "auto").fit()
    assert resumed["losses"] == summary["losses"][3:]


# ------------------------------------------------------------------- starting from plain transformers folders

@pytest.fixture(scope="module")
def transformers_folders(tmp_path_factory) -> dict[str, Path]:
    """A plain LlamaForCausalLM folder and a Mixtral folder written by scripts/export_hf.py, each with the demo
    tokenizer beside its weights, as a user would bring them."""
    from transformers import LlamaForCausalLM

    from helpers import llama_config_from
    sys.path.insert(0, str(ROOT / "scripts"))
    from export_hf import main as export

    root = tmp_path_factory.mktemp("transformers-folders")
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "tokenizer")
    ids = dict(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
               bos_token_id=tokenizer.bos_token_id, max_position_embeddings=256)
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config_from(tiny_config(**ids))).save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    ByteModel(tiny_config(**ids, num_experts=4, moe_intermediate_size=32)).save_pretrained(root / "moe")
    tokenizer.save_pretrained(root / "moe")
    export(["--model", str(root / "moe"), "--out", str(root / "mixtral")])
    return {"llama": root / "llama", "mixtral": root / "mixtral"}


def plain_config(source: Path, out_dir: Path, stage: str):
    from utils.config import SFTConfig, TrainingConfig, build_config

    data = ({"train_files": [str(SFT_VAL)], "val_files": [str(SFT_VAL)], "seq_len": 128} if stage != "pretrain" else
            {"train_files": [str(PRETRAIN_VAL)], "val_files": [str(PRETRAIN_VAL)], "seq_len": 32,
             "cache_dir": str(out_dir / "cache")})
    return build_config(TrainingConfig if stage == "pretrain" else SFTConfig, {
        "model": {"init_from": str(source)}, "data": data,
        "train": {"out_dir": str(out_dir), "max_steps": 4, "micro_batch_size": 2, "precision": "fp32"},
        "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 1},
        "checkpoint": {"every_steps": 2}, "eval": {"every_steps": 2, "max_batches": 2},
        "logging": {"every_steps": 1, "swanlab_mode": "disabled", "sample_tokens": 4, "plots": False},
        "lora": {"enabled": stage == "lora", "rank": 4, "alpha": 8.0, "dropout": 0.0},
    })


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "lora", "pretrain"])
@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_training_starts_from_a_plain_transformers_folder(transformers_folders, tmp_path, kind, stage):
    import model_pretrain
    import model_sft_train

    source = transformers_folders[kind]
    task = model_pretrain.PRETRAINING if stage == "pretrain" else model_sft_train.SFT
    summary = Trainer(plain_config(source, tmp_path, stage), task).fit()
    assert summary["reason"] == "finished" and summary["step"] == 4
    assert all(math.isfinite(loss) for loss in summary["losses"])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(row["mfu"] > 0 for row in rows if "mfu" in row)
    assert f"tokenizer: {source}" in (tmp_path / "train.log").read_text()
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    # The model keeps its transformers class: a Llama fine-tune is still a Llama folder.
    assert type(final).__name__ == {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM"}[kind]
    original = AutoModelForCausalLM.from_pretrained(source)
    assert not torch.equal(final.model.layers[0].self_attn.q_proj.weight,
                           original.model.layers[0].self_attn.q_proj.weight)


@pytest.mark.slow
def test_an_explicit_tokenizer_wins_and_a_folder_without_one_is_an_input_error(transformers_folders, tmp_path):
    import model_sft_train
    from utils.errors import InputError

    bare = tmp_path / "bare"
    AutoModelForCausalLM.from_pretrained(transformers_folders["llama"]).save_pretrained(bare)
    config = plain_config(bare, tmp_path / "run", "sft")
    with pytest.raises(InputError, match=f"model.init_from {bare} holds no tokenizer: set data.tokenizer"):
        Trainer(config, model_sft_train.SFT).fit()
    config.data.tokenizer = str(tmp_path / "missing")
    with pytest.raises(InputError, match="data.tokenizer: folder not found"):
        Trainer(config, model_sft_train.SFT).fit()
    config.data.tokenizer, config.train.max_steps = str(ROOT / "tokenizer"), 1
    assert Trainer(config, model_sft_train.SFT).fit()["reason"] == "finished"
    assert f"tokenizer: {ROOT / 'tokenizer'}" in (tmp_path / "run" / "train.log").read_text()
