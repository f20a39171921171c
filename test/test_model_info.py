"""utils/model_info.py: memory estimates and weight statistics checked against the model itself, the report it
writes (with the counts of utils/counting.py), and the script's input errors (one line, exit code 2)."""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import tiny_config
from model import CACHE_FIELD, ByteModel, ByteModelConfig
from utils.checkpoint import load_model_folder as load_model
from utils.errors import InputError, exit_on_input_error
from utils.counting import flops_per_token, parameter_counts
from utils.model_info import config_from_yaml, inference_memory, main, training_memory, weight_statistics

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN_CONFIG = ROOT / "configs" / "model_pretrain.yaml"
MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PNG = b"\x89PNG\r\n\x1a\n"
TIMEOUT = 180

def build(**overrides) -> ByteModel:
    torch.manual_seed(0)
    return ByteModel(tiny_config(**overrides))


@pytest.mark.slow
def test_moe_model_report_shows_routing(tmp_path):
    torch.manual_seed(0)
    model = ByteModel(tiny_config(vocab_size=6400, num_experts=4, moe_intermediate_size=32, moe_capacity_factor=1.0))
    with torch.no_grad():
        model.model.layers[1].mlp.gate.expert_bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))  # expert 0 always picked
    model.save_pretrained(tmp_path / "moe")
    report_path = main(["--model", str(tmp_path / "moe"), "--out", str(tmp_path / "report"), "--tokenizer",
                        str(ROOT / "tokenizer"), "--data", str(ROOT / "datasets/demo/pretrain_val.jsonl"),
                        "--routing-tokens", "300", "--seq-len", "64"])
    report = json.loads((tmp_path / "report" / "moe_report.json").read_text())
    routing = report["routing"]
    assert routing["tokens"] == 300 and routing["layers"] == [0, 1]
    assert all(sum(layer) == pytest.approx(1.0) for layer in routing["expert_load"])
    # Layer 1 sends every token to expert 0 (half of the top-2 slots): load 0.5, max load 2.0, and with capacity
    # 1.0 x the even share an expert keeps a quarter of the slots, so expert 0 drops half of its own.
    assert routing["expert_load"][1][0] == pytest.approx(0.5)
    assert routing["max_load"][1] == pytest.approx(2.0)
    assert routing["dropped_frac"][1] >= 0.25 - 1e-6
    assert report["moe"]["num_experts"] == 4 and report["parameters"]["active_per_token"] < report["parameters"]["total"]
    text = report_path.read_text()
    assert "## Routing (300 tokens" in text and "| 1 | 0.500 |" in text
    assert (tmp_path / "report" / "plots" / "moe_routing.png").read_bytes()[:8] == PNG


def test_routing_reads_the_data_and_the_tokenizer_it_is_given(tmp_path, tokenizer):
    """--data and --tokenizer: the routed tokens are the given text's under the given tokenizer, and a --tokenizer
    folder without one is refused by name rather than replaced by another."""
    torch.manual_seed(0)
    ByteModel(tiny_config(vocab_size=6400, num_experts=4, moe_intermediate_size=32)).save_pretrained(tmp_path / "moe")
    text = "Routing reads this text, 路由读这段文字。"
    data = tmp_path / "short.jsonl"
    data.write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n", encoding="utf-8")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    arguments = ["--model", str(tmp_path / "moe"), "--out", str(tmp_path / "report"), "--data", str(data)]
    main([*arguments, "--tokenizer", str(tmp_path / "tokenizer")])
    routing = json.loads((tmp_path / "report" / "moe_report.json").read_text())["routing"]
    assert routing["tokens"] == len(tokenizer(text, add_special_tokens=False)["input_ids"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=f"no tokenizer in {tmp_path / 'empty'}"):
        main([*arguments, "--tokenizer", str(tmp_path / "empty")])


# ---------------------------------------------------------------- memory


@pytest.mark.parametrize("parameters", [1, 106_816, 4_600_000])
def test_training_memory_states_follow_the_parameter_count(parameters):
    config = tiny_config(num_hidden_layers=4)
    rows = training_memory(config, parameters, seq_len=256, batch_size=8)
    assert set(rows) == {"fp32", "bf16"}
    for row in rows.values():
        assert row["weights"] == 4 * parameters
        assert row["gradients"] == 4 * parameters
        assert row["adamw_states"] == 8 * parameters
        states = 16 * parameters
        assert row["total"] == states + row["activations"]
        assert row["total_checkpointed"] == states + row["activations_checkpointed"]
        assert 0 < row["activations_checkpointed"] < row["activations"]
    assert rows["bf16"]["activations"] < rows["fp32"]["activations"]
    assert rows["bf16"]["activations_checkpointed"] < rows["fp32"]["activations_checkpointed"]
    assert rows["bf16"]["total"] < rows["fp32"]["total"]


def test_training_activations_scale_with_tokens_and_depth():
    config = tiny_config(num_hidden_layers=4)
    base = training_memory(config, 1000, seq_len=128, batch_size=2)
    for precision in ("fp32", "bf16"):
        for key in ("activations", "activations_checkpointed"):
            value = base[precision][key]
            # A fused attention kernel stores no seq x seq matrix: activations are linear in the token count.
            assert training_memory(config, 1000, 128, 4)[precision][key] == pytest.approx(2 * value)
            assert training_memory(config, 1000, 256, 2)[precision][key] == pytest.approx(2 * value)
        deeper = training_memory(tiny_config(num_hidden_layers=8), 1000, 128, 2)[precision]
        assert deeper["activations"] > base[precision]["activations"]
        # Checkpointing saves more the deeper the model.
        assert (deeper["activations"] - deeper["activations_checkpointed"]
                > base[precision]["activations"] - base[precision]["activations_checkpointed"])


@pytest.mark.parametrize("overrides", [dict(), dict(num_key_value_heads=4), dict(head_dim=32, num_hidden_layers=3)],
                         ids=["gqa", "mha", "wide_heads"])
def test_inference_memory_kv_cache_closed_form_and_linear_in_context(overrides):
    config = tiny_config(**overrides)
    parameters = 123_456
    contexts = [1, 256, 512, 1024, 4096]
    per_token_bf16 = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2
    rows = inference_memory(config, parameters, contexts)  # bf16 by default
    assert [row["context"] for row in rows] == contexts
    for row in rows:
        assert row["weights"] == 2 * parameters
        assert row["kv_cache"] == per_token_bf16 * row["context"]
        assert row["total"] == row["weights"] + row["kv_cache"]
    assert rows[3]["kv_cache"] == 2 * rows[2]["kv_cache"] == 4 * rows[1]["kv_cache"]

    fp32 = inference_memory(config, parameters, contexts, precision="fp32")
    assert [row["kv_cache"] for row in fp32] == [2 * row["kv_cache"] for row in rows]
    assert all(row["weights"] == 4 * parameters for row in fp32)
    batched = inference_memory(config, parameters, contexts, batch_size=3)
    assert [row["kv_cache"] for row in batched] == [3 * row["kv_cache"] for row in rows]
    assert [row["weights"] for row in batched] == [row["weights"] for row in rows]


@pytest.mark.parametrize("context", [17, 48])
def test_inference_kv_cache_matches_a_real_bf16_cache(context):
    model = build().eval().to(torch.bfloat16)
    input_ids = torch.randint(0, 128, (1, context), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = getattr(model(input_ids, use_cache=True), CACHE_FIELD)
    stored = sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
                 for layer in cache.layers)
    [row] = inference_memory(model.config, parameter_counts(model)["total"], [context], precision="bf16")
    assert row["kv_cache"] == stored
    assert row["weights"] == sum(p.numel() * p.element_size() for p in model.parameters())


# ---------------------------------------------------------------- weight statistics


@pytest.mark.parametrize("layer, matrix", [(0, "q_proj"), (1, "v_proj"), (2, "down_proj")])
def test_weight_statistics_single_out_a_zeroed_matrix(layer, matrix):
    model = build(num_hidden_layers=3)
    module = getattr(model.model.layers[layer].self_attn, matrix, None) or getattr(model.model.layers[layer].mlp,
                                                                                   matrix)
    with torch.no_grad():
        module.weight.zero_()
    stats = weight_statistics(model)
    assert stats["matrices"] == list(MATRICES)
    assert len(stats["norms"]) == len(stats["near_zero_fraction"]) == 3
    column = MATRICES.index(matrix)
    for index, decoder_layer in enumerate(model.model.layers):
        assert len(stats["norms"][index]) == len(stats["near_zero_fraction"][index]) == len(MATRICES)
        for position, name in enumerate(MATRICES):
            norm, near_zero = stats["norms"][index][position], stats["near_zero_fraction"][index][position]
            if (index, position) == (layer, column):
                assert norm == 0.0
                assert near_zero == 1.0
                continue
            owner = decoder_layer.self_attn if hasattr(decoder_layer.self_attn, name) else decoder_layer.mlp
            weight = getattr(owner, name).weight.detach()
            assert norm == pytest.approx(torch.linalg.norm(weight).item(), rel=1e-5)
            assert norm > 0
            assert near_zero == pytest.approx((weight.abs() < 1e-3).float().mean().item())
            assert near_zero < 0.5  # N(0, 0.02) init: only a few percent of entries are that small


def test_weight_statistics_count_near_zero_entries_exactly():
    model = build()
    weight = model.model.layers[0].mlp.gate_proj.weight  # 192 x 64
    with torch.no_grad():
        weight.fill_(0.5)
        weight[:48] = 1e-4  # a quarter of the rows: below the 1e-3 threshold
    stats = weight_statistics(model)
    column = MATRICES.index("gate_proj")
    assert stats["near_zero_fraction"][0][column] == pytest.approx(0.25)
    assert stats["norms"][0][column] == pytest.approx((144 * 64 * 0.25 + 48 * 64 * 1e-8) ** 0.5, rel=1e-5)


# ---------------------------------------------------------------- config and model loading


def test_config_from_yaml_reads_the_model_section_and_the_tokenizer_vocabulary():
    config, _ = config_from_yaml(PRETRAIN_CONFIG)
    section = yaml.safe_load(PRETRAIN_CONFIG.read_text())["model"]
    assert config.vocab_size == 6400
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(config, key) == section[key], key
    assert section["intermediate_size"] is None
    assert config.intermediate_size == 64 * ((8 * section["hidden_size"] // 3 + 63) // 64)


def test_load_model_round_trips_a_saved_model(saved_model):
    folder, original = saved_model
    loaded = load_model(folder)
    assert not loaded.training
    assert parameter_counts(loaded) == parameter_counts(original)
    for (name, a), (_, b) in zip(original.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------- end to end (in process)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny, untied ByteModel saved with save_pretrained into <tmp>/m."""
    model = build(num_hidden_layers=3, num_key_value_heads=4)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.zero_()
    folder = tmp_path_factory.mktemp("saved") / "m"
    model.save_pretrained(folder)
    return folder, model


def pretrain_reference_model() -> ByteModel:
    """The model configs/model_pretrain.yaml describes, built independently of model_info: the model section plus
    the repository tokenizer's vocabulary."""
    from transformers import AutoTokenizer

    vocab_size = len(AutoTokenizer.from_pretrained(ROOT / "tokenizer"))
    assert vocab_size == 6400
    section = yaml.safe_load(PRETRAIN_CONFIG.read_text())["model"]
    return ByteModel(ByteModelConfig(vocab_size=vocab_size, **section))


@pytest.mark.slow
def test_main_with_a_config_writes_report_json_and_plots(tmp_path, capsys):
    report_path = main(["--config", str(PRETRAIN_CONFIG), "--out", str(tmp_path)])
    name = "model_pretrain"
    assert report_path == tmp_path / f"{name}_report.md"
    json_path = tmp_path / f"{name}_report.json"
    plots = [tmp_path / "plots" / f"{name}_parameters.png", tmp_path / "plots" / f"{name}_memory.png"]
    for path in (report_path, json_path, *plots):
        assert path.is_file() and path.stat().st_size > 0, path
    for plot in plots:
        assert plot.read_bytes()[:8] == PNG
    assert not (tmp_path / "plots" / f"{name}_weights.png").exists()  # no weights for an untrained config

    report = json.loads(json_path.read_text())
    reference = pretrain_reference_model()
    total = sum(p.numel() for p in reference.parameters())
    assert report["parameters"]["total"] == total
    assert report["parameters"] == parameter_counts(reference)
    assert report["config"]["vocab_size"] == 6400
    assert report["config"]["tie_word_embeddings"] is True
    assert report["parameters"]["by_component"]["lm_head"] == 0
    assert report["seq_len"] == 256 and report["batch_size"] == 8  # data.seq_len of the config, default batch
    assert report["flops_per_token"]["total"] == pytest.approx(sum(flops_per_token(reference.config, 256).values()))
    assert report["flops_per_sequence"] == pytest.approx(report["flops_per_token"]["total"] * 256)
    assert report["training_memory"]["fp32"]["weights"] == 4 * total
    assert [row["context"] for row in report["inference_memory"]] == [256, 1024, 4096]
    assert "weights" not in report

    text = report_path.read_text()
    assert f"{total:,}" in text and "," in f"{total:,}"
    assert f"| total | {total:,} |" in text
    assert f"](plots/{name}_parameters.png)" in text
    assert f"](plots/{name}_memory.png)" in text
    assert "## Weights" not in text
    assert f"report written to {report_path}" in capsys.readouterr().out


@pytest.mark.slow
def test_main_options_seq_len_batch_size_and_name(tmp_path):
    report_path = main(["--config", str(PRETRAIN_CONFIG), "--out", str(tmp_path), "--seq-len", "64",
                        "--batch-size", "2", "--name", "custom"])
    assert report_path == tmp_path / "custom_report.md"
    report = json.loads((tmp_path / "custom_report.json").read_text())
    assert report["seq_len"] == 64 and report["batch_size"] == 2
    config, _ = config_from_yaml(PRETRAIN_CONFIG)
    assert report["flops_per_token"]["total"] == pytest.approx(sum(flops_per_token(config, 64).values()))
    assert report["training_memory"] == json.loads(json.dumps(
        training_memory(config, report["parameters"]["total"], 64, 2)))
    assert (tmp_path / "plots" / "custom_memory.png").stat().st_size > 0


@pytest.mark.slow
def test_main_with_a_saved_model_adds_weight_statistics(saved_model, tmp_path):
    folder, model = saved_model
    report_path = main(["--model", str(folder), "--out", str(tmp_path), "--seq-len", "32"])
    assert report_path == tmp_path / "m_report.md"
    plots = tmp_path / "plots"
    for plot in ("m_parameters.png", "m_memory.png", "m_weights.png"):
        assert (plots / plot).read_bytes()[:8] == PNG, plot

    report = json.loads((tmp_path / "m_report.json").read_text())
    total = sum(p.numel() for p in model.parameters())
    assert report["parameters"]["total"] == total
    assert report["parameters"]["by_component"]["lm_head"] == 128 * 64  # untied
    assert report["seq_len"] == 32
    weights = report["weights"]
    assert weights["matrices"] == list(MATRICES)
    assert len(weights["norms"]) == 3
    down = MATRICES.index("down_proj")
    assert weights["norms"][1][down] == 0.0 and weights["near_zero_fraction"][1][down] == 1.0
    expected = weight_statistics(model)
    for got_row, expected_row in zip(weights["norms"], expected["norms"]):
        assert got_row == pytest.approx(expected_row, rel=1e-6)

    text = report_path.read_text()
    assert "## Weights" in text
    assert f"| total | {total:,} |" in text
    assert "](plots/m_weights.png)" in text
    assert "| 1 | " in text and "0.00 (100.0%)" in text  # the zeroed down_proj of layer 1


@pytest.mark.slow
def test_main_names_final_and_best_folders_after_their_run(tmp_path):
    model = build()
    model.save_pretrained(tmp_path / "run7" / "final")
    report_path = main(["--model", str(tmp_path / "run7" / "final"), "--out", str(tmp_path / "out"),
                        "--seq-len", "16"])
    assert report_path == tmp_path / "out" / "run7_final_report.md"
    assert (tmp_path / "out" / "plots" / "run7_final_weights.png").stat().st_size > 0


@pytest.mark.parametrize("argv, message", [
    (["--config", "{missing}"], "config file not found"),
    (["--model", "{missing}"], "model folder not found"),
    (["--config", str(PRETRAIN_CONFIG), "--seq-len", "-3"], "must be positive"),
    (["--config", str(PRETRAIN_CONFIG), "--batch-size", "0"], "must be positive"),
])
def test_main_raises_input_error(tmp_path, argv, message):
    argv = [arg.replace("{missing}", str(tmp_path / "missing")) for arg in argv] + ["--out", str(tmp_path / "o")]
    with pytest.raises(InputError, match=message):
        main(argv)
    assert not (tmp_path / "o").exists()


# Bad values in an otherwise readable config are input errors too.

def test_a_data_section_that_is_not_a_mapping_is_an_input_error(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("model:\n  hidden_size: 64\n  num_hidden_layers: 2\ndata: [a, b]\n")
    with pytest.raises(InputError, match="section 'data' must be a mapping"):
        config_from_yaml(path)
    # An empty section means "all defaults", as in the training scripts.
    path.write_text("model:\n  hidden_size: 64\n  num_hidden_layers: 2\ndata:\n")
    config, seq_len = config_from_yaml(path)
    assert config.hidden_size == 64 and seq_len == 1024


def test_a_non_integer_data_seq_len_is_an_input_error(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("model:\n  hidden_size: 64\n  num_hidden_layers: 2\ndata:\n  seq_len: abc\n")
    with pytest.raises(InputError):
        main(["--config", str(path), "--out", str(tmp_path / "o")])


def test_seq_len_zero_is_rejected(tmp_path):
    with pytest.raises(InputError, match="must be positive"):
        main(["--config", str(PRETRAIN_CONFIG), "--out", str(tmp_path), "--seq-len", "0"])


# ---------------------------------------------------------------- the script


def environment() -> dict[str, str]:
    # No PYTHONPATH: running utils/model_info.py as a script must find the repository's packages by itself.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def run_in_process(arguments: list[str]) -> tuple[int, str, str]:
    """What `python utils/model_info.py ARGUMENTS` runs, in this process: (exit code, stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        patch.chdir(ROOT)  # relative paths (the demo tokenizer and data) as the script sees them
        try:
            exit_on_input_error(lambda: main(arguments))()
            code = 0
        except SystemExit as stop:
            code = stop.code
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def script_runs(tmp_path_factory):
    """The run with no arguments as a real process (it proves the command line), every other case through the same
    entry in this process while that one imports: name -> (exit code, stdout, stderr, out dir)."""
    root = tmp_path_factory.mktemp("script")
    default_out = root / "out_default"
    stdout, stderr = open(root / "default.out", "w"), open(root / "default.err", "w")
    process = subprocess.Popen([sys.executable, "utils/model_info.py", "--out", str(default_out)],
                               cwd=ROOT, env=environment(), stdout=stdout, stderr=stderr)
    stdout.close()
    stderr.close()
    try:
        truncated = root / "truncated"
        build().save_pretrained(truncated)
        weights = (truncated / "model.safetensors").read_bytes()
        (truncated / "model.safetensors").write_bytes(weights[:len(weights) // 2])
        garbage = root / "garbage_config"
        build().save_pretrained(garbage)
        (garbage / "config.json").write_text("this is { not json")
        (root / "no_model.yaml").write_text("data:\n  seq_len: 64\ntrain:\n  max_steps: 3\n")
        (root / "invalid.yaml").write_text("model:\n  hidden_size: [64\n  num_hidden_layers: 2\n")
        small_vocab_moe = root / "small_vocab_moe"  # no tokenizer beside it, and the demo tokenizer's ids do not fit
        ByteModel(tiny_config(vocab_size=1234, num_experts=4, moe_intermediate_size=32)).save_pretrained(
            small_vocab_moe)

        cases = {
            "missing_config": ["--config", str(root / "nope.yaml")],
            "missing_model": ["--model", str(root / "nope")],
            "truncated_weights": ["--model", str(truncated)],
            "garbage_config_json": ["--model", str(garbage)],
            "no_model_section": ["--config", str(root / "no_model.yaml")],
            "invalid_yaml": ["--config", str(root / "invalid.yaml")],
            "small_vocab_moe": ["--model", str(small_vocab_moe), "--routing-tokens", "64"],
            "small_vocab_moe_with_data": ["--model", str(small_vocab_moe), "--data",
                                          "datasets/demo/pretrain_val.jsonl"],
        }
        results = {name: (*run_in_process([*arguments, "--out", str(root / f"out_{name}")]), root / f"out_{name}")
                   for name, arguments in cases.items()}
        code = process.wait(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    results["default"] = (code, (root / "default.out").read_text(), (root / "default.err").read_text(), default_out)
    return results


@pytest.mark.slow
def test_script_runs_with_no_arguments(script_runs):
    code, stdout, stderr, out_dir = script_runs["default"]
    assert code == 0, stderr
    assert "Traceback" not in stderr
    report = out_dir / "model_pretrain_report.md"
    assert f"report written to {report}" in stdout
    for path in (report, out_dir / "model_pretrain_report.json", out_dir / "plots" / "model_pretrain_parameters.png",
                 out_dir / "plots" / "model_pretrain_memory.png"):
        assert path.is_file() and path.stat().st_size > 0, path
    total = json.loads((out_dir / "model_pretrain_report.json").read_text())["parameters"]["total"]
    assert total == parameter_counts(pretrain_reference_model())["total"]
    assert f"{total:,}" in stdout  # the printed summary table


@pytest.mark.slow
def test_moe_routing_is_skipped_when_the_demo_tokenizer_does_not_fit_the_model(script_runs):
    code, stdout, stderr, out_dir = script_runs["small_vocab_moe"]
    assert code == 0, stderr
    assert "Traceback" not in stderr
    assert "routing section skipped: the tokenizer in tokenizer has 6400 ids, the model's vocabulary only 1234" in stdout
    report = json.loads((out_dir / "small_vocab_moe_report.json").read_text())
    assert "routing" not in report and report["parameters"]["active_per_token"] < report["parameters"]["total"]


@pytest.mark.slow
@pytest.mark.parametrize("case, message", [
    ("small_vocab_moe_with_data", "the tokenizer in tokenizer has 6400 ids, the model's vocabulary only 1234"),
    ("missing_config", "config file not found"),
    ("missing_model", "model folder not found"),
    ("truncated_weights", "cannot read a model from"),
    ("garbage_config_json", "cannot read a model from"),
    ("no_model_section", "no 'model' section"),
    ("invalid_yaml", "invalid YAML"),
])
def test_script_input_errors_are_one_line_and_exit_2(script_runs, case, message):
    code, stdout, stderr, out_dir = script_runs[case]
    assert code == 2, stderr
    assert "Traceback" not in stderr and "Traceback" not in stdout
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    assert message in lines[0]
    assert not out_dir.exists()  # nothing written for a failed run
