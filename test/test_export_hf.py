"""scripts/export_hf.py: a ByteModel exported as a plain transformers Llama (dense) or Mixtral (MoE) folder gives the
same logits and greedy tokens in a process that never imports this project; features the target lacks are refused
with one line, exit code 2 and nothing written.

One export runs as a real process (it proves the command line); the other exports and the refusals go through the same
entry in this process. The Llama side of the parity check is a process of its own that loads every export: it starts
first and imports while the exports are made, then reads its request from stdin."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, GenerationConfig

from helpers import randomize_, run_script_main, tiny_config
from model import ByteModel
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from export_hf import build_target, check_expressible, main, target_config_from  # noqa: E402
from utils.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 180
MAX_ABS_DIFF = 1e-5
# tiny_config has max_position_embeddings=64. The input goes past it (default RoPE simply continues); with dynamic
# RoPE the logits are compared up to it, because beyond it transformers scales every position for the whole
# length and this model causally for each position's own. Generation ends exactly at it.
INPUT_LENGTH, PROMPT_LENGTH, NEW_TOKENS, MAX_POSITIONS = 80, 48, 16, 64
TOKENIZER_TEXT = "Hello, 世界! def f(x): return x"
GENERATION = dict(max_new_tokens=7, temperature=0.7, top_p=0.9, do_sample=True, eos_token_id=2, pad_token_id=0)

# All GQA (tiny_config: 4 query heads, 2 key/value heads). The tied case also carries a tokenizer, a generation
# config and stochastic depth; the untied one has no generation config and replaces a non-empty --out with --force.
PARITY_CASES = {
    "tied_default": dict(tie_word_embeddings=True, drop_path_rate=0.1),
    "untied_dynamic": dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
    # Mixtral: 4 experts, top-2, with a training-only capacity limit (noted, not refused).
    "moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, moe_capacity_factor=1.25),
    # Mistral: a window shorter than the inputs compared.
    "sliding": dict(sliding_window=5),
}
TARGET_CLASSES = {"tied_default": "LlamaForCausalLM", "untied_dynamic": "LlamaForCausalLM", "moe": "MixtralForCausalLM",
                  "sliding": "MistralForCausalLM"}
REFUSALS = {
    "parallel_residual": "parallel_residual=True cannot be exported",
    "layer_scale": "layer_scale_init=0.0001 cannot be exported",
    "mixed_layer_types": "layer_types mixing sliding and full attention cannot be exported",
    "missing_model": "model folder not found",
    "truncated_weights": "cannot read a model from",
    "out_not_empty": "exists and is not empty; pass --force",
}

# Runs in a fresh interpreter, from a folder where the project is not importable: only transformers reads the export.
LOADER = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

request = json.loads(sys.stdin.read())
greedy = GenerationConfig(do_sample=False, max_new_tokens=request["new_tokens"], min_new_tokens=request["new_tokens"],
                          eos_token_id=None, pad_token_id=0)
results = {}
for folder in request["folders"]:
    exported = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = exported(torch.tensor([request["input_ids"][:request["lengths"][folder]]])).logits[0]
        prompt = torch.tensor([request["prompt_ids"]])
        tokens = exported.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=greedy)[0]
    result = {"logits": logits.tolist(), "tokens": tokens.tolist(), "auto_class": type(exported).__name__}
    try:
        result["tokenizer_ids"] = AutoTokenizer.from_pretrained(folder)(request["text"])["input_ids"]
    except (OSError, ValueError):  # no tokenizer in this export
        result["tokenizer_ids"] = None
    results[folder] = result
assert "model" not in sys.modules, "the export loaded this project's package"
print(json.dumps({"results": results, "model_imported": "model" in sys.modules}))
"""


def environment() -> dict[str, str]:
    # No PYTHONPATH: the script must find the repository's packages by itself, and the loader must not find them.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def build(**overrides) -> ByteModel:
    torch.manual_seed(0)
    return randomize_(ByteModel(tiny_config(**overrides))).eval()  # random norm weights too


def ids(length: int, seed: int) -> list[int]:
    return torch.randint(0, tiny_config().vocab_size, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def byte_outputs(model: ByteModel, input_ids: list[int], prompt_ids: list[int]) -> tuple[torch.Tensor, list[int]]:
    greedy = GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                              eos_token_id=None, pad_token_id=0)
    logits = model(torch.tensor([input_ids])).logits[0]
    prompt = torch.tensor([prompt_ids])
    tokens = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=greedy)[0]
    return logits, tokens.tolist()


def prepare_sources(root: Path) -> dict[str, list[str]]:
    """Write every source folder and return name -> command-line arguments."""
    cases = {}
    for name, overrides in PARITY_CASES.items():
        build(**overrides).save_pretrained(root / name / "src")
        cases[name] = ["--model", str(root / name / "src"), "--out", str(root / name / "out")]
    tied = root / "tied_default" / "src"
    AutoTokenizer.from_pretrained(ROOT / "tokenizer").save_pretrained(tied)
    GenerationConfig(**GENERATION).save_pretrained(tied)
    untied = root / "untied_dynamic"
    (untied / "src" / "generation_config.json").unlink()  # a source without one: the export gets none either
    (untied / "out").mkdir()
    (untied / "out" / "stale.txt").write_text("from an earlier export")
    cases["untied_dynamic"].append("--force")

    for name in REFUSALS:
        (root / name).mkdir()
        cases[name] = ["--model", str(root / name / "src"), "--out", str(root / name / "out")]
    build(parallel_residual=True).save_pretrained(root / "parallel_residual" / "src")
    build(layer_scale_init=1e-4).save_pretrained(root / "layer_scale" / "src")
    build(sliding_window=5, layer_types=["sliding_attention", "full_attention"]).save_pretrained(
        root / "mixed_layer_types" / "src")
    build().save_pretrained(root / "truncated_weights" / "src")
    weights = root / "truncated_weights" / "src" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    build().save_pretrained(root / "out_not_empty" / "src")
    (root / "out_not_empty" / "out").mkdir()
    (root / "out_not_empty" / "out" / "keep.txt").write_text("not mine")
    return cases


def start(command: list[str], root: Path, name: str, cwd: Path, **options) -> subprocess.Popen:
    # Output goes to files, so that a chatty process can never block on a full pipe.
    with open(root / f"{name}.out", "w") as stdout, open(root / f"{name}.err", "w") as stderr:
        return subprocess.Popen(command, cwd=cwd, env=environment(), stdout=stdout, stderr=stderr, **options)


def finish(process: subprocess.Popen, root: Path, name: str) -> tuple[int, str, str]:
    code = process.wait(timeout=TIMEOUT)
    return code, (root / f"{name}.out").read_text(), (root / f"{name}.err").read_text()


def run_in_process(arguments: list[str]) -> tuple[int, str, str]:
    return run_script_main(main, arguments)


# The export that runs as a script: the case with a tokenizer and a generation config to copy.
SCRIPT_CASE = "tied_default"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> (exit code, stdout, stderr, case folder) for every export, plus "llama" -> the loader's results and
    "byte" -> the ByteModel's own (logits, greedy tokens) per parity case."""
    root = tmp_path_factory.mktemp("export")
    cases = prepare_sources(root)
    input_ids, prompt_ids = ids(INPUT_LENGTH, seed=1), ids(PROMPT_LENGTH, seed=2)
    started = {}
    try:
        started["llama"] = start([sys.executable, "-c", LOADER], root, "llama", cwd=root, stdin=subprocess.PIPE,
                                 text=True)
        started[SCRIPT_CASE] = start([sys.executable, "scripts/export_hf.py", *cases[SCRIPT_CASE]], root,
                                     SCRIPT_CASE, cwd=ROOT)
        results = {name: (*run_in_process(arguments), root / name) for name, arguments in cases.items()
                   if name != SCRIPT_CASE}
        byte = {name: byte_outputs(build(**overrides), input_ids, prompt_ids)
                for name, overrides in PARITY_CASES.items()}
        results[SCRIPT_CASE] = (*finish(started[SCRIPT_CASE], root, SCRIPT_CASE), root / SCRIPT_CASE)
        for name in PARITY_CASES:
            code, _, stderr, _ = results[name]
            assert code == 0, f"{name}: {stderr}"
        # Dynamic RoPE: transformers scales every position for the whole input's length, this model causally, so
        # the export's logits are asked for an input within max_position_embeddings.
        lengths = {str(root / name / "out"): MAX_POSITIONS if "rope_parameters" in PARITY_CASES[name] else INPUT_LENGTH
                   for name in PARITY_CASES}
        request = {"folders": [str(root / name / "out") for name in PARITY_CASES], "input_ids": input_ids,
                   "lengths": lengths,
                   "prompt_ids": prompt_ids, "new_tokens": NEW_TOKENS, "text": TOKENIZER_TEXT}
        started["llama"].communicate(json.dumps(request), timeout=TIMEOUT)
        code, stdout, stderr = finish(started["llama"], root, "llama")
        assert code == 0, stderr
        loaded = json.loads(stdout.splitlines()[-1])
        results["llama"] = {name: loaded["results"][str(root / name / "out")] for name in PARITY_CASES}
        results["model_imported"] = loaded["model_imported"]
        results["byte"] = byte
        return results
    finally:
        for process in started.values():
            if process.poll() is None:
                process.kill()
                process.wait()


# ---------------------------------------------------------------- parity


@pytest.mark.slow
@pytest.mark.parametrize("case", PARITY_CASES)
def test_export_gives_the_same_logits_and_greedy_tokens_without_the_project(runs, case):
    byte_logits, byte_tokens = runs["byte"][case]
    llama = runs["llama"][case]
    assert runs["model_imported"] is False
    assert llama["auto_class"] == TARGET_CLASSES[case]
    llama_logits = torch.tensor(llama["logits"])
    compared = MAX_POSITIONS if "rope_parameters" in PARITY_CASES[case] else INPUT_LENGTH
    assert byte_logits.shape == (INPUT_LENGTH, tiny_config().vocab_size)
    assert llama_logits.shape == (compared, tiny_config().vocab_size)
    # A causal model's first positions do not depend on the rest of the input.
    assert (llama_logits - byte_logits[:compared]).abs().max().item() < MAX_ABS_DIFF
    assert llama["tokens"] == byte_tokens
    assert len(byte_tokens) == PROMPT_LENGTH + NEW_TOKENS


@pytest.mark.slow
@pytest.mark.parametrize("case", PARITY_CASES)
def test_config_is_plain_llama_or_mixtral(runs, case):
    config = json.loads((runs[case][3] / "out" / "config.json").read_text())
    source = json.loads((runs[case][3] / "src" / "config.json").read_text())
    assert config["architectures"] == [TARGET_CLASSES[case]]
    assert "auto_map" not in config
    assert not {"parallel_residual", "layer_scale_init", "drop_path_rate", "scoring_func", "moe_capacity_factor",
                "router_bias_update_rate"} & set(config)
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_parameters", "tie_word_embeddings"):
        assert config[key] == source[key], key
    if case == "sliding":
        assert (config["model_type"], config["sliding_window"]) == ("mistral", 5)
    elif case == "moe":
        assert config["model_type"] == "mixtral"
        assert (config["num_local_experts"], config["num_experts_per_tok"]) == (4, 2)
        assert config["intermediate_size"] == source["moe_intermediate_size"] == 48
    else:
        assert config["model_type"] == "llama"
        for key in ("intermediate_size", "attention_bias", "mlp_bias"):
            assert config[key] == source[key], key
    with safe_open(runs[case][3] / "out" / "model.safetensors", "pt") as weights:
        # A tied export stores the embedding once, as transformers' own checkpoints do.
        assert ("lm_head.weight" in weights.keys()) == (not config["tie_word_embeddings"])


@pytest.mark.slow
def test_tokenizer_and_generation_config_are_copied(runs):
    out = runs["tied_default"][3] / "out"
    assert runs["llama"]["tied_default"]["tokenizer_ids"] == AutoTokenizer.from_pretrained(ROOT / "tokenizer")(
        TOKENIZER_TEXT)["input_ids"]
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).is_file(), name
    generation = json.loads((out / "generation_config.json").read_text())
    assert {key: generation.get(key) for key in GENERATION} == GENERATION


@pytest.mark.slow
def test_no_tokenizer_or_generation_config_when_the_source_has_none(runs):
    out = runs["untied_dynamic"][3] / "out"
    assert runs["llama"]["untied_dynamic"]["tokenizer_ids"] is None
    assert sorted(path.name for path in out.iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.slow
def test_force_replaces_a_non_empty_out_and_leaves_no_temporary_folder(runs):
    folder = runs["untied_dynamic"][3]
    assert not (folder / "out" / "stale.txt").exists()
    assert sorted(path.name for path in folder.iterdir()) == ["out", "src"]


@pytest.mark.slow
def test_drop_path_is_noted(runs):
    stdout = runs["tied_default"][1]
    assert "note: drop_path_rate=0.1" in stdout
    assert "exported" in stdout.splitlines()[-1]
    assert runs["untied_dynamic"][1].count("note") == 1
    assert "note: transformers scales dynamic RoPE" in runs["untied_dynamic"][1]
    assert "note: moe_capacity_factor=1.25" in runs["moe"][1]


# ---------------------------------------------------------------- refusals


@pytest.mark.slow
@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_are_one_line_exit_2_and_write_nothing(runs, case):
    code, stdout, stderr, folder = runs[case]
    assert code == 2, stderr
    assert "Traceback" not in stderr + stdout
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and REFUSALS[case] in lines[0]
    if case == "out_not_empty":
        assert [path.name for path in (folder / "out").iterdir()] == ["keep.txt"]
    else:
        assert not (folder / "out").exists()
    expected = ["src"] if case != "missing_model" else []
    assert sorted(path.name for path in folder.iterdir() if path.name != "out") == expected  # no temporary folder


def test_parameters_outside_llama_are_refused_by_name():
    model = build()
    config = target_config_from(model.config, torch.float32)
    extra = {**model.state_dict(), "model.layers.0.attn_layer_scale.gamma": torch.ones(64)}
    with pytest.raises(InputError, match="parameters Llama lacks: model.layers.0.attn_layer_scale.gamma"):
        build_target(extra, config)
    missing = {name: tensor for name, tensor in model.state_dict().items() if not name.startswith("model.layers.1.")}
    with pytest.raises(InputError, match=r"missing from the model: model\.layers\.1\.input_layernorm\.weight, "
                                         r".*\(and 6 more\)"):
        build_target(missing, config)


# ---------------------------------------------------------------- in process


MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48)
MOE_REFUSALS = {
    "shared": (dict(num_shared_experts=1), "num_shared_experts=1 cannot be exported: Mixtral has no shared experts"),
    "sigmoid": (dict(scoring_func="sigmoid"), "scoring_func='sigmoid' cannot be exported: Mixtral's router is a "
                                              "softmax"),
    "not_renormalised": (dict(norm_topk_prob=False), "norm_topk_prob=False cannot be exported"),
    "sparse_step": (dict(decoder_sparse_step=2), "decoder_sparse_step=2 cannot be exported: every Mixtral layer"),
    "parallel": (dict(parallel_residual=True), "parallel_residual=True cannot be exported: Mixtral's decoder layer"),
}


@pytest.mark.parametrize("case", MOE_REFUSALS)
def test_moe_features_mixtral_lacks_are_refused(case):
    overrides, message = MOE_REFUSALS[case]
    model = build(**MOE, **overrides)
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        check_expressible(model.config, model.state_dict())


def test_a_trained_routing_bias_is_refused_and_a_zero_one_is_not_exported():
    model = build(**MOE)
    check_expressible(model.config, model.state_dict())
    exported = build_target(model.state_dict(), target_config_from(model.config, torch.float32))
    assert type(exported).__name__ == "MixtralForCausalLM"
    assert not any("expert_bias" in name for name in exported.state_dict())
    model.model.layers[1].mlp.gate.expert_bias[2] = 1e-3
    with pytest.raises(InputError, match=r"model\.layers\.1\.mlp\.gate\.expert_bias is non-zero"):
        check_expressible(model.config, model.state_dict())


def test_bf16_export_holds_the_cast_weights(tmp_path):
    model = build(tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "src")
    main(["--model", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--dtype", "bf16"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    expected = {name: tensor.to(torch.bfloat16) for name, tensor in model.state_dict().items()}
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as weights:
        assert set(weights.keys()) == set(expected) - {"lm_head.weight"}
        for name in weights.keys():
            assert torch.equal(weights.get_tensor(name), expected[name]), name
