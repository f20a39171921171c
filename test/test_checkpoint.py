"""utils/checkpoint.py through the engine: damaged and incompatible checkpoints are refused and the previous one
used, explicit and missing resume paths, a fresh start never overwrites checkpoints, pruning keeps what it wrote;
every saved model folder carries its code and loads where this project is not installed."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch.distributed.fsdp import FSDPModule
from transformers import GenerationConfig

from helpers import ROOT, randomize_, tiny_config
from model import ByteModel
from training import fit, make_config, read_metrics, step_folders, stop_before_call, tree_digest
from utils.checkpoint import CheckpointManager, resume_mismatch, save_model_folder
from utils.config import LoraSection, TrainingConfig, config_to_dict
from utils.distributed import DistributedContext
from utils.errors import InputError
from utils.lora import add_lora

pytestmark = pytest.mark.slow  # every test here runs a whole training


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("token-cache")


@pytest.fixture(scope="module")
def stopped_at_8(tmp_path_factory, cache_dir):
    """A 12-step run stopped after step 8: checkpoints step_4 and step_8 (each test copies it)."""
    out_dir = tmp_path_factory.mktemp("stopped") / "out"
    with pytest.MonkeyPatch.context() as monkeypatch:
        stop_before_call(monkeypatch, 9)
        summary = fit(make_config(out_dir, cache_dir))
    assert summary["reason"] == "stopped by signal" and summary["step"] == 8
    assert step_folders(out_dir) == ["step_4", "step_8"]
    return out_dir


@pytest.fixture
def stopped_copy(stopped_at_8, tmp_path) -> Path:
    out_dir = tmp_path / "out"
    shutil.copytree(stopped_at_8, out_dir)
    return out_dir


def test_damaged_checkpoint_is_refused_and_the_previous_one_used(stopped_copy, cache_dir):
    damaged = stopped_copy / "checkpoints" / "step_8" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:5])
    summary = fit(make_config(stopped_copy, cache_dir), "auto")
    assert summary["reason"] == "finished" and summary["step"] == 12
    assert len(summary["losses"]) == 8  # steps 5..12: resumed from step_4
    log = (stopped_copy / "train.log").read_text()
    warnings = [line for line in log.splitlines() if "WARNING" in line and "refused" in line]
    assert len(warnings) == 1 and "step_8" in warnings[0], warnings
    assert "step_4 (step 4)" in log
    train_rows, eval_rows = read_metrics(stopped_copy)
    assert [row["step"] for row in train_rows] == list(range(1, 13))
    assert [row["step"] for row in eval_rows] == [4, 8, 12]
    assert (stopped_copy / "final" / "model.safetensors").is_file()
    # step_8 was written again by the resumed run and loads now.
    assert load_file(stopped_copy / "checkpoints" / "step_8" / "model.safetensors")


def test_incompatible_checkpoint_is_refused(stopped_copy, cache_dir):
    config_file = stopped_copy / "checkpoints" / "step_8" / "config.yaml"
    saved = yaml.safe_load(config_file.read_text())
    saved["model"]["hidden_size"] = 64
    config_file.write_text(yaml.safe_dump(saved, sort_keys=False))
    summary = fit(make_config(stopped_copy, cache_dir), "auto")
    assert summary["reason"] == "finished" and summary["step"] == 12
    assert len(summary["losses"]) == 8
    log = (stopped_copy / "train.log").read_text()
    warnings = [line for line in log.splitlines() if "WARNING" in line and "refused" in line]
    assert len(warnings) == 1
    assert "step_8" in warnings[0] and "incompatible" in warnings[0] and "model.hidden_size" in warnings[0]


def test_only_incompatible_checkpoints_raise_and_touch_nothing(stopped_copy, cache_dir):
    before = tree_digest(stopped_copy / "checkpoints")
    metrics_before = (stopped_copy / "metrics.jsonl").read_bytes()
    config_before = (stopped_copy / "config.yaml").read_bytes()
    config = make_config(stopped_copy, cache_dir, model={"hidden_size": 64})
    with pytest.raises(InputError, match="no usable checkpoint"):
        fit(config, "auto")
    assert tree_digest(stopped_copy / "checkpoints") == before
    assert (stopped_copy / "metrics.jsonl").read_bytes() == metrics_before
    assert (stopped_copy / "config.yaml").read_bytes() == config_before
    log = (stopped_copy / "train.log").read_text()
    refused = [line for line in log.splitlines() if "refused" in line]
    assert len(refused) == 2 and all("model.hidden_size was 32, this run has 64" in line for line in refused)


def test_resume_from_explicit_missing_path_raises(stopped_copy, cache_dir):
    with pytest.raises(InputError, match="checkpoint not found"):
        fit(make_config(stopped_copy, cache_dir), str(stopped_copy / "checkpoints" / "step_99"))


def test_fresh_start_into_existing_checkpoints_raises(stopped_copy, cache_dir):
    before = tree_digest(stopped_copy / "checkpoints")
    metrics_before = (stopped_copy / "metrics.jsonl").read_bytes()
    with pytest.raises(InputError, match="already holds checkpoints"):
        fit(make_config(stopped_copy, cache_dir))
    assert tree_digest(stopped_copy / "checkpoints") == before
    assert (stopped_copy / "metrics.jsonl").read_bytes() == metrics_before


def test_resume_from_an_explicit_older_checkpoint(stopped_copy, cache_dir):
    summary = fit(make_config(stopped_copy, cache_dir), str(stopped_copy / "checkpoints" / "step_4"))
    assert summary["reason"] == "finished" and summary["step"] == 12 and len(summary["losses"]) == 8
    assert "refused" not in (stopped_copy / "train.log").read_text()
    assert [row["step"] for row in read_metrics(stopped_copy)[0]] == list(range(1, 13))




def test_pruning_never_deletes_the_checkpoint_just_written(stopped_copy, cache_dir, monkeypatch):
    # Branch off step_4 (say, to retry with other settings) while step_8 of the first attempt still exists.
    stop_before_call(monkeypatch, 3)
    config = make_config(stopped_copy, cache_dir, checkpoint={"keep_last": 1})
    summary = fit(config, str(stopped_copy / "checkpoints" / "step_4"))
    assert summary["reason"] == "stopped by signal" and summary["step"] == 6
    latest = (stopped_copy / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_6"
    assert (stopped_copy / "checkpoints" / latest).is_dir(), step_folders(stopped_copy)
    # keep_last applies to this line of checkpoints; the abandoned branch's later folder is not deleted
    assert step_folders(stopped_copy) == ["step_6", "step_8"]


def test_a_key_added_since_the_checkpoint_counts_as_its_default():
    defaults = config_to_dict(TrainingConfig())
    current = config_to_dict(TrainingConfig())
    saved = config_to_dict(TrainingConfig())
    del saved["model"]["attention_bias"]  # a checkpoint written before the model section had this key
    assert resume_mismatch(saved, current, defaults) is None
    current["model"]["attention_bias"] = True
    assert resume_mismatch(saved, current, defaults) == "model.attention_bias was False, this run has True"


# ---------------------------------------------------------------- folders that carry their code

# Runs in a fresh interpreter that cannot import this project: the repository is off sys.path and the editable
# install's finder is gone, so only the code saved in each folder (auto_map) can build the model.
CLEAN_LOADER = r"""
import importlib.util, json, sys
root = sys.argv[1]
sys.meta_path[:] = [finder for finder in sys.meta_path if "__editable__" not in getattr(finder, "__module__", "")]
sys.path[:] = [entry for entry in sys.path if entry not in ("", ".", root)]
assert importlib.util.find_spec("model") is None and importlib.util.find_spec("utils") is None

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

request = json.loads(sys.stdin.read())
results = {}
for folder in request["folders"]:
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = loaded(torch.tensor([request["input_ids"]])).logits[0]
    base = AutoModel.from_pretrained(folder, trust_remote_code=True)  # what serving engines load
    results[folder] = {"logits": logits.tolist(), "config_class": type(config).__name__,
                       "model_class": type(loaded).__name__, "module": type(loaded).__module__,
                       "base_class": type(base).__name__}
harness = HFLM(pretrained=request["harness_folder"], trust_remote_code=True, device="cpu", dtype="float32",
               batch_size=1)
pair = Instance(request_type="loglikelihood", doc={}, arguments=tuple(request["pair"]), idx=0)
results["harness"] = harness.loglikelihood([pair], disable_tqdm=True)[0][0]
assert importlib.util.find_spec("model") is None and "model" not in sys.modules
print(json.dumps(results))
"""
CODE_FILES = ["attention.py", "compat.py", "config.py", "decoder_layer.py", "mlp.py", "modeling.py", "moe.py",
              "norm.py", "rope.py"]
HARNESS_PAIR = ("def add(a, b):", "\n    return a + b")


def test_saved_folders_load_with_their_own_code_where_the_project_is_not_installed(tmp_path, tokenizer):
    """A checkpoint step folder, final/ of a mixture of experts with dynamic RoPE, and the merged final/ of a LoRA
    run load with trust_remote_code=True in a process that cannot import this project, with the same logits; the
    harness's HFLM loads final/ by path and scores a continuation as this project's model does."""
    def build(**overrides) -> ByteModel:
        torch.manual_seed(0)
        return randomize_(ByteModel(tiny_config(vocab_size=len(tokenizer), **overrides))).eval()

    input_ids = torch.randint(0, len(tokenizer), (24,), generator=torch.Generator().manual_seed(1))
    generation = GenerationConfig(do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    expected, folders = {}, {}

    dense = build(tie_word_embeddings=True)
    manager = CheckpointManager(tmp_path / "dense", keep_last=1, context=DistributedContext())
    folders["step"] = manager.save(1, dense, torch.optim.AdamW(dense.parameters()), {"step": 1}, {})
    folders["final"] = manager.save_final(dense, tokenizer, generation, tmp_path / "dense" / "final")
    expected["step"] = expected["final"] = dense

    moe = build(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    manager = CheckpointManager(tmp_path / "moe", keep_last=1, context=DistributedContext())
    folders["moe"] = manager.save_final(moe, tokenizer, generation, tmp_path / "moe" / "final")
    expected["moe"] = moe

    lora = add_lora(build(), LoraSection(rank=4, dropout=0.0, target_modules=["q_proj", "down_proj"])).eval()
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if ".lora_B." in name:  # zero at the start; a trained adapter is not
                param.normal_(0.0, 0.1)
    manager = CheckpointManager(tmp_path / "lora", keep_last=1, context=DistributedContext())
    with torch.no_grad():
        lora_logits = lora(input_ids[None]).logits[0]
    folders["lora"] = manager.save_final(lora, tokenizer, generation, tmp_path / "lora" / "final")

    for name, folder in folders.items():
        saved = json.loads((folder / "config.json").read_text())
        assert saved["auto_map"] == {"AutoConfig": "config.ByteModelConfig", "AutoModel": "modeling.ByteBaseModel",
                                     "AutoModelForCausalLM": "modeling.ByteModel"}, name
        assert all((folder / file).is_file() for file in CODE_FILES), name
    assert (folders["lora"] / "adapter").is_dir()

    request = {"folders": [str(folder) for folder in folders.values()], "input_ids": input_ids.tolist(),
               "harness_folder": str(folders["final"]), "pair": HARNESS_PAIR}
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_MODULES_CACHE=str(tmp_path / "modules"))
    done = subprocess.run([sys.executable, "-I", "-c", CLEAN_LOADER, str(ROOT)], input=json.dumps(request),
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])

    with torch.no_grad():
        for name, folder in folders.items():
            result = results[str(folder)]
            assert (result["config_class"], result["model_class"], result["base_class"]) == (
                "ByteModelConfig", "ByteModel", "ByteBaseModel"), name
            assert result["module"].startswith("transformers_modules."), name
            reference = lora_logits if name == "lora" else expected[name](input_ids[None]).logits[0]
            # The same code on the same weights; another thread count (and merging the adapter) rounds differently.
            torch.testing.assert_close(torch.tensor(result["logits"]), reference, atol=1e-5, rtol=0.0)

        context, continuation = HARNESS_PAIR
        context_ids = tokenizer(context)["input_ids"]
        whole = tokenizer(context + continuation)["input_ids"]
        log_probs = torch.log_softmax(dense(torch.tensor([whole])).logits[0].double(), dim=-1)
        score = sum(log_probs[position - 1, whole[position]] for position in range(len(context_ids), len(whole)))
    assert abs(results["harness"] - float(score)) < 1e-4


def test_a_sharded_model_is_saved_as_its_own_class(tmp_path):
    """fully_shard gives the model a subclass defined inside torch (as made here, without a process group); the
    folder must name and carry the model's own code, and the model keeps its sharded class afterwards."""
    model = ByteModel(tiny_config())
    sharded_class = type(f"FSDP{ByteModel.__name__}", (FSDPModule, ByteModel), {})
    model.__class__ = sharded_class
    save_model_folder(model, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling.ByteModel"
    assert saved["architectures"] == ["ByteModel"]
    assert sorted(path.name for path in tmp_path.glob("*.py")) == CODE_FILES
    assert type(model) is sharded_class


def test_a_resumed_run_may_change_the_attention_implementation_only():
    defaults = config_to_dict(TrainingConfig())
    saved, current = config_to_dict(TrainingConfig()), config_to_dict(TrainingConfig())
    current["model"]["attn_implementation"] = "eager"  # another kernel, the same computation
    assert resume_mismatch(saved, current, defaults) is None
    current["model"]["hidden_size"] = 256
    assert resume_mismatch(saved, current, defaults) == "model.hidden_size was 512, this run has 256"


def test_a_starting_model_loads_with_the_attention_implementation_asked_for(tmp_path):
    from helpers import save_tiny_start
    from utils.checkpoint import load_starting_model

    folder = save_tiny_start(tmp_path / "start")
    assert load_starting_model(str(folder)).config._attn_implementation == "sdpa"
    assert load_starting_model(str(folder), "eager").config._attn_implementation == "eager"
