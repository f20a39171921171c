"""scripts/benchmark.py's inference rows: on tiny models, what each row claims must follow from what ran."""

import argparse
import importlib.util
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
import trl

import utils.trainer
from helpers import randomize_, tiny_config
from model import ByteModel
from utils.inference import DTYPES
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


LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


def test_inference_rows_cover_every_variant_and_batch(rows):
    """Batch 1 has the reference, fp32, int8, int4, both speculative rows and llama.cpp's (where it is installed);
    batch 2 no speculative or llama.cpp ones (assisted generation takes one sequence; llama.cpp is the batch-1
    yardstick)."""
    _, _, rows = rows
    by_batch = {batch: [row["variant"] for row in rows if row["batch"] == batch] for batch in (1, 2)}
    assert by_batch[1] == ["Llama fp32", "ByteModel fp32", "ByteModel int8", "ByteModel int4",
                           "ByteModel fp32 + draft", "ByteModel fp32 + int8 self-draft"] + (
        ["llama.cpp f32", "llama.cpp q8_0"] if LLAMA_CPP else [])
    assert by_batch[2] == by_batch[1][:4]


@pytest.mark.skipif(not LLAMA_CPP, reason="llama-cpp-python is not installed (its build needs a compiler)")
def test_llama_cpp_rows_run_the_exported_weights(rows):
    """llama.cpp's f32 file decodes the fp32 tokens; each row reads its file's weights once per token."""
    _, _, rows = rows
    llama = {row["variant"]: row for row in rows if row["variant"].startswith("llama.cpp")}
    fp32 = next(row for row in rows if row["variant"] == "ByteModel fp32" and row["batch"] == 1)
    assert llama["llama.cpp f32"]["tokens_equal_fp32"]
    # The f32 file holds the fp32 weights and the tokenizer (a few hundred KiB); q8_0 about a quarter of them.
    assert fp32["weight_mib"] <= llama["llama.cpp f32"]["weight_mib"] < fp32["weight_mib"] + 0.5
    assert llama["llama.cpp q8_0"]["weight_mib"] < 0.4 * fp32["weight_mib"]
    assert all(row["ppl"] is None and row["tokens_per_s"] > 0 for row in llama.values())


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
    our_steps, trl_settings, tokenizers = [], [], []
    train_step, grpo_config = utils.trainer.Trainer.train_step, trl.GRPOConfig
    monkeypatch.setattr(utils.trainer.Trainer, "train_step",
                        lambda self, batches: our_steps.append(self.config.rlhf) or train_step(self, batches))
    monkeypatch.setattr(trl, "GRPOConfig", lambda **settings: trl_settings.append(settings) or grpo_config(**settings))
    from_pretrained = benchmark.AutoTokenizer.from_pretrained
    monkeypatch.setattr(benchmark.AutoTokenizer, "from_pretrained",
                        lambda folder, **kwargs: tokenizers.append(str(folder)) or from_pretrained(folder, **kwargs))
    with torch.random.fork_rng():
        benchmark.grpo_rows(args, result)
    # Two warm-up steps and the timed one on each side, with the options' prompts, completions and tokens.
    assert len(our_steps) == 3 and {(rlhf.prompts_per_step, rlhf.num_generations, rlhf.max_completion_tokens)
                                    for rlhf in our_steps} == {(2, 2, 4)}
    (settings,) = trl_settings
    assert (settings["max_steps"], settings["per_device_train_batch_size"], settings["num_generations"],
            settings["max_completion_length"]) == (3, 4, 2, 4)
    assert tokenizers[0] == args.tokenizer
    ours, theirs = result["rows"]
    assert (ours["variant"], theirs["variant"]) == ("StellarByte", "TRL GRPOTrainer")
    assert ours["steps_per_s"] > 0 and theirs["steps_per_s"] > 0 and theirs["ratio"] == 1.0
    assert ours["ratio"] == pytest.approx(ours["steps_per_s"] / theirs["steps_per_s"])
    assert ours["tokens_per_s"] == pytest.approx(ours["steps_per_s"] * 2 * 2 * 4)
    assert "| grpo step |" in benchmark.markdown({**result, "date": "d", "machine": "m", "peak_matmul_flops": {},
                                                  "settings": {}})


TINY_DENSE = dict(vocab_size=6400, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
TINY_MOE = dict(TINY_DENSE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
VAL_TEXT = ROOT / "datasets/demo/pretrain_val.jsonl"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Stand-ins for trained models (a tiny one with the demo tokenizer, and a smaller draft), and output folders."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("benchmark")
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "tokenizer")
    for name, model in (("model", tiny(0)), ("draft", tiny(1, hidden_size=16, num_attention_heads=1,
                                                            num_key_value_heads=1))):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    # Other validation text: the demo's documents in reverse order.
    (root / "val.jsonl").write_text("".join(reversed(VAL_TEXT.read_text(encoding="utf-8").splitlines(True))),
                                    encoding="utf-8")
    return {"model": root / "model", "draft": root / "draft", "out": root / "out", "elsewhere": root / "elsewhere",
            "val": root / "val.jsonl"}


def measured_once(measures: dict) -> dict[str, benchmark.Measured]:
    """What `benchmark.alternate` returns, from one call of each measure."""
    results = {name: benchmark.Measured() for name in measures}
    for name, measure in measures.items():
        results[name].run(measure)
    return results


def benchmark_arguments(folders: dict) -> list[str]:
    """A small benchmark of every kind of row but GRPO's."""
    return ["--models", "dense", "--batch-size", "2", "--seq-len", "8", "--train-steps", "1", "--rounds", "1",
            "--prompt-len", "4", "--new-tokens", "3", "--generate-batches", "1", "--generate-rounds", "1",
            "--inference-models", str(folders["model"]), "--quantize", "int8", "--draft", "",
            "--inference-new-tokens", "3", "--quality-windows", "2", "--val-files", str(VAL_TEXT),
            "--tokenizer", str(ROOT / "tokenizer"), "--grpo-steps", "0", "--out", str(folders["out"])]


def benchmarked(monkeypatch, folders: dict, arguments: list[str]) -> dict:
    """benchmark.py's main with `arguments` on tiny models, each measure run once and nothing compiled: the result it
    wrote, and what it measured (the rounds of the training and the generation measures, each training measure's
    steps, each generation's new tokens, each quality measurement's files and windows, the tokenizers it loaded, the
    attention implementations of the models it compared)."""
    seen = {"folders": folders, "rounds": {"train": set(), "generate": set()}, "train_steps": [], "new_tokens": [],
            "texts": [], "windows": [], "tokenizers": [], "attention": set(), "generated": [], "auto_batches": []}
    trainer_for = benchmark.trainer_for

    def timed_training(model, batch, precision, steps, compiled=False):
        seen["train_steps"].append(steps)
        measure = trainer_for(model, batch, precision, steps, compiled)
        measure.training = True
        return measure

    def alternate(measures, rounds):
        seen["rounds"]["train" if any(hasattr(measure, "training") for measure in measures.values())
                       else "generate"].add(rounds)
        return measured_once(measures)

    def recorded(function, **positions):
        def call(*args, **kwargs):
            for key, position in positions.items():
                seen[key].append(args[position])
            return function(*args, **kwargs)
        return call

    def referenced(byte):
        reference = reference_for(byte)
        seen["attention"].update({byte.config._attn_implementation, reference.config._attn_implementation})
        return reference

    from_pretrained, reference_for = benchmark.AutoTokenizer.from_pretrained, benchmark.reference_for
    with monkeypatch.context() as patch:
        patch.setattr(benchmark, "DENSE", TINY_DENSE)
        patch.setattr(benchmark, "MOE", TINY_MOE)
        patch.setattr(benchmark, "alternate", alternate)
        patch.setattr(benchmark, "measure_peak_flops", lambda device, dtype: 1e12)
        patch.setattr(benchmark, "stream_read_bandwidth", lambda: 1e10)
        patch.setattr(benchmark, "gguf_files", lambda *args: {})  # the llama.cpp rows: tested on `rows` above
        patch.setattr(benchmark, "trainer_for", timed_training)
        patch.setattr(benchmark, "generator_for", recorded(benchmark.generator_for, new_tokens=2, generated=0))
        # bf16 rows wherever the test runs, and auto's pick without its timing
        patch.setattr(benchmark.torch.cpu, "_is_avx512_bf16_supported", lambda: True)
        patch.setattr(benchmark, "auto_dtype", lambda model, batch_size: seen["auto_batches"].append(batch_size)
                      or (torch.bfloat16, 1.25))
        patch.setattr(benchmark, "reference_for", referenced)
        patch.setattr(benchmark, "validation_windows", recorded(benchmark.validation_windows, texts=1, windows=2))
        patch.setattr(benchmark.AutoTokenizer, "from_pretrained",
                      lambda folder, **kwargs: seen["tokenizers"].append(str(folder)) or from_pretrained(folder))
        patch.setattr(torch, "compile", lambda model, **kwargs: model)
        patch.chdir(ROOT)
        with torch.random.fork_rng():
            seen["written"] = benchmark.main(arguments)
    seen["result"] = json.loads(seen["written"].with_suffix(".json").read_text())
    return seen


@pytest.fixture(scope="module")
def default_benchmark(folders):
    with pytest.MonkeyPatch.context() as patch:
        return benchmarked(patch, folders, benchmark_arguments(folders))


def variants(seen: dict, key: str = "rows") -> set[str]:
    return {row["variant"] for row in seen["result"][key]}


def shapes(seen: dict, task: str) -> set[str]:
    return {row["batch"] for row in seen["result"]["rows"] if row["task"].startswith(task)}


def models(seen: dict, key: str = "rows") -> set[str]:
    return {row["model"] for row in seen["result"][key]}


def test_generation_rows_decode_with_the_weights_their_precision_names(default_benchmark):
    """Generation in bf16 runs weights cast to bf16 (as utils/inference.py loads them; training rows use autocast),
    fp32 the fp32 ones, and each generation shape reports what `--precision auto` picks for it."""
    result = default_benchmark["result"]
    generated = [model.dtype for model in default_benchmark["generated"]]
    rows = [row for row in result["rows"] if row["task"] != "train"]
    assert {row["precision"] for row in rows} == {"fp32", "bf16"}
    # the measures are made in the order of the rows
    assert generated[:len(rows)] == [DTYPES[row["precision"]] for row in rows]
    assert [(row["task"], row["picks"], row["bf16_speedup"]) for row in result["auto_precision"]] == [
        ("generate b1", "bf16", 1.25), ("sample b16", "bf16", 1.25)]
    assert default_benchmark["auto_batches"] == [1, 16]
    assert "dense generate b1: bf16 (bf16 x1.25)" in default_benchmark["written"].read_text()


# An option -> its value (with any other options it needs), and what is true of the benchmark run with it (and not of
# the run without it). Braces name the test's folders. The GRPO rows' options are
# test_grpo_rows_time_both_trainers_on_the_same_work's.
OPTIONS = {
    "--models": (["moe"], lambda seen: models(seen) == {"moe"}),
    "--batch-size": (["3"], lambda seen: shapes(seen, "train") == {"3x8"}),
    "--seq-len": (["12"], lambda seen: shapes(seen, "train") == {"2x12"}),
    "--train-steps": (["2"], lambda seen: set(seen["train_steps"]) == {2}),
    "--rounds": (["2"], lambda seen: seen["rounds"]["train"] == {2}),
    "--prompt-len": (["5"], lambda seen: shapes(seen, "generate") == {"1x5+3"}),
    "--new-tokens": (["4"], lambda seen: shapes(seen, "generate") == {"1x4+4"}),
    "--generate-batches": (["2"], lambda seen: {row["batch"] for row in seen["result"]["inference"]} == {2}),
    "--generate-rounds": (["2"], lambda seen: seen["rounds"]["generate"] == {2}),
    # Sampled at batch 3 (16 by default) on both models, tokens not compared (sampling differs run to run).
    "--sample-batch": (["3"], lambda seen: shapes(seen, "sample") == {"3x4+3"} and {
        (row["variant"], "tokens_equal_eager" in row) for row in seen["result"]["rows"] if row["task"] == "sample b3"}
        == {("ByteModel", False), ("Llama", False)}),
    "--no-compile": ([], lambda seen: not any("compiled" in variant for variant in variants(seen))),
    "--inference-models": (["dense"], lambda seen: models(seen, "inference") == {"dense"}),
    "--quantize": (["int4"], lambda seen: "ByteModel int4" in variants(seen, "inference")),
    "--draft": (["{draft}"], lambda seen: "ByteModel fp32 + draft" in variants(seen, "inference")),
    "--inference-new-tokens": (["5"], lambda seen: set(seen["new_tokens"][-3:]) == {5}),
    "--quality-windows": (["3"], lambda seen: set(seen["windows"]) == {3}),
    "--val-files": (["{val}"], lambda seen: seen["texts"] == [[str(seen["folders"]["val"])]]),
    # The tokenizer of the `dense` inference model (and of the GRPO rows).
    "--tokenizer": (["{draft}", "--inference-models", "dense"],
                    lambda seen: str(seen["folders"]["draft"]) in seen["tokenizers"]),
    "--out": (["{elsewhere}"], lambda seen: seen["written"].parent.name == "elsewhere"),
    "--quick": ([], lambda seen: seen["written"].name == "benchmark_quick.md"),
    # ByteModel and the Llama/Mixtral it is measured against.
    "--attn-implementation": (["eager"], lambda seen: seen["attention"] == {"eager"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_each_option_reaches_what_the_benchmark_measures(option, folders, default_benchmark, monkeypatch):
    values, holds = OPTIONS[option]
    changed = benchmark_arguments(folders) + [option] + [value.format(**folders) for value in values]
    assert holds(benchmarked(monkeypatch, folders, changed)) and not holds(default_benchmark)


def test_bench_model_is_the_quick_dense_benchmark_with_its_options_after(monkeypatch):
    """scripts/bench_model.py's options are the benchmark's (OPTIONS above), given after its presets."""
    calls = []
    monkeypatch.setattr(benchmark, "main", calls.append)
    monkeypatch.setattr(sys, "argv", ["bench_model.py", "--rounds", "5", "--models", "moe"])
    runpy.run_path(str(ROOT / "scripts" / "bench_model.py"), run_name="__main__")
    assert calls == [["--models", "dense", "--quick", "--rounds", "5", "--models", "moe"]]


# ----------------------------------------------------------------------------------------------------------------
# scripts/bench_moe.py

import bench_moe  # noqa: E402

BENCH_MOE = ["--hidden-size", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--experts", "4", "--top-k",
             "2", "--expert-size", "16", "--vocab-size", "64", "--batch-size", "2", "--seq-len", "8", "--train-steps",
             "1", "--layer-repeats", "1", "--rounds", "1"]


def bench_moe_run(monkeypatch, tmp_path, arguments: list[str]) -> dict:
    """bench_moe.py's main with `arguments`, each measure run once: its JSON result, the models it trained and the
    steps, repeats and rounds it timed."""
    seen = {"configs": [], "steps": set(), "repeats": set(), "rounds": set()}
    trainer_for, layer_seconds = bench_moe.trainer_for, bench_moe.layer_seconds

    def alternate(measures, rounds):
        seen["rounds"].add(rounds)
        return measured_once(measures)

    def timed_training(model, batch, precision, steps, compiled=False):
        seen["configs"].append(model.config)
        seen["steps"].add(steps)
        return trainer_for(model, batch, precision, steps, compiled)

    def timed_layer(forward, layer, x, precision, repeats):
        seen["repeats"].add(repeats)
        return layer_seconds(forward, layer, x, precision, repeats)

    output = tmp_path / "bench_moe.json"
    with monkeypatch.context() as patch:
        patch.setattr(bench_moe, "alternate", alternate)
        patch.setattr(bench_moe, "trainer_for", timed_training)
        patch.setattr(bench_moe, "layer_seconds", timed_layer)
        patch.setattr(sys, "argv", ["bench_moe.py", "--output", str(output), *arguments])
        with torch.random.fork_rng():
            bench_moe.main()
    seen["output"], seen["result"] = output, json.loads(output.read_text())
    seen["byte_model"] = seen["configs"][0]
    return seen


def moe_config(seen: dict, key: str):
    return getattr(seen["byte_model"], key)


# An option -> its value, and what is true of the run with it (and not of the run without it).
BENCH_MOE_OPTIONS = {
    "--hidden-size": ("64", lambda seen: seen["result"]["config"]["hidden_size"] == 64),
    "--layers": ("2", lambda seen: seen["result"]["config"]["num_hidden_layers"] == 2),
    "--heads": ("4", lambda seen: moe_config(seen, "num_attention_heads") == 4),
    "--kv-heads": ("2", lambda seen: moe_config(seen, "num_key_value_heads") == 2),
    "--experts": ("8", lambda seen: seen["result"]["config"]["num_experts"] == 8),
    "--top-k": ("1", lambda seen: seen["result"]["config"]["num_experts_per_tok"] == 1),
    "--expert-size": ("24", lambda seen: seen["result"]["config"]["moe_intermediate_size"] == 24),
    "--vocab-size": ("96", lambda seen: moe_config(seen, "vocab_size") == 96),
    "--batch-size": ("3", lambda seen: seen["result"]["tokens"] == 3 * 8),
    "--seq-len": ("12", lambda seen: seen["result"]["tokens"] == 2 * 12),
    "--train-steps": ("2", lambda seen: seen["steps"] == {2}),
    "--layer-repeats": ("2", lambda seen: seen["repeats"] == {2}),
    "--rounds": ("2", lambda seen: seen["rounds"] == {2}),
}


@pytest.fixture(scope="module")
def default_bench_moe(tmp_path_factory) -> dict:
    with pytest.MonkeyPatch.context() as patch:
        return bench_moe_run(patch, tmp_path_factory.mktemp("bench_moe"), BENCH_MOE)


@pytest.mark.parametrize("option", sorted(BENCH_MOE_OPTIONS))
def test_each_option_reaches_what_bench_moe_measures(option, default_bench_moe, tmp_path, monkeypatch):
    value, holds = BENCH_MOE_OPTIONS[option]
    assert holds(bench_moe_run(monkeypatch, tmp_path, BENCH_MOE + [option, value])) and not holds(default_bench_moe)


def test_bench_moe_writes_its_output_where_told(default_bench_moe):
    assert default_bench_moe["output"].name == "bench_moe.json" and default_bench_moe["output"].is_file()


# ----------------------------------------------------------------------------------------------------------------
# scripts/bench_serve.py

import bench_serve  # noqa: E402


def bench_serve_run(monkeypatch, tmp_path, arguments: list[str]) -> dict:
    """bench_serve.py's main with `arguments` against a stand-in server: the command it would start the server with,
    the client it made, the requests it sent and the table it wrote."""
    seen = {"commands": [], "clients": [], "requests": []}

    class Process:
        def poll(self):
            return None

        def terminate(self):
            pass

        def wait(self):
            return 0

    def one_request(client, endpoint, prompt, max_tokens):
        seen["requests"].append((endpoint, prompt, max_tokens))
        return {"ttft": 0.01, "latency": 0.02, "tokens": max_tokens}

    output = tmp_path / "bench_serve.json"
    with monkeypatch.context() as patch:
        patch.setattr(bench_serve.subprocess, "Popen", lambda command, **kwargs: seen["commands"].append(command)
                      or Process())
        patch.setattr(bench_serve, "health", lambda url: {"model": "tiny", "engine": "continuous"})
        patch.setattr(bench_serve.openai, "OpenAI", lambda **settings: seen["clients"].append(settings))
        patch.setattr(bench_serve, "one_request", one_request)
        patch.setattr(sys, "argv", ["bench_serve.py", "--output", str(output), *arguments])
        bench_serve.main()
    seen["output"], seen["result"] = output, json.loads(output.read_text())
    return seen


def first_words(path: Path, count: int) -> list[str]:
    return [json.loads(line)["text"][:bench_serve.PROMPT_CHARACTERS]
            for line in path.read_text(encoding="utf-8").splitlines()[:count]]


BENCH_SERVE = ["--requests", "3", "--clients", "1", "2"]
# An option -> its value, and what is true of the run with it (and not of the run without it). "{text}" is a file of
# other documents.
BENCH_SERVE_OPTIONS = {
    "--model": ("elsewhere/final", lambda seen: seen["commands"][0][seen["commands"][0].index("--model") + 1]
                == "elsewhere/final"),
    "--url": ("http://127.0.0.1:1/", lambda seen: not seen["commands"]
              and seen["clients"][0]["base_url"] == "http://127.0.0.1:1/v1"),
    "--api-key": ("secret", lambda seen: seen["clients"][0]["api_key"] == "secret"),
    "--engines": ("continuous", lambda seen: [command[command.index("--engine") + 1] for command in seen["commands"]]
                  == ["continuous"] and [level["engine"] for level in seen["result"]["levels"]] == ["continuous"] * 2),
    "--requests": ("5", lambda seen: [level["requests"] for level in seen["result"]["levels"]] == [5] * 4),
    "--clients": ("4", lambda seen: [level["clients"] for level in seen["result"]["levels"]] == [4, 4]),
    # Varied limits average --max-tokens; the warm-up request asks for it exactly.
    "--max-tokens": ("9", lambda seen: seen["requests"][0][2] == 9 and seen["result"]["max_tokens"] == 9
                     and {request[2] for request in seen["requests"][2:]} <= set(range(1, 18))),
    "--lengths": ("equal", lambda seen: {request[2] for request in seen["requests"]} == {64}
                  and seen["result"]["token_limits"] == [64] * 3),
    "--threads": ("1", lambda seen: seen["commands"][0][-2:] == ["--threads", "1"]),
    "--endpoint": ("chat", lambda seen: {request[0] for request in seen["requests"]} == {"chat"}
                   and seen["result"]["endpoint"] == "chat"),
    "--data": ("{text}", lambda seen: [request[1] for request in seen["requests"][-3:]]
               == first_words(seen["text"], 3)),
}


@pytest.fixture(scope="module")
def other_text(tmp_path_factory) -> Path:
    lines = VAL_TEXT.read_text(encoding="utf-8").splitlines(True)
    return write_text(tmp_path_factory.mktemp("bench_serve") / "other.jsonl", "".join(reversed(lines)))


def write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("option", sorted(BENCH_SERVE_OPTIONS))
def test_each_option_reaches_what_bench_serve_measures(option, other_text, tmp_path, monkeypatch):
    value, holds = BENCH_SERVE_OPTIONS[option]
    default = bench_serve_run(monkeypatch, tmp_path / "default", BENCH_SERVE)
    changed = bench_serve_run(monkeypatch, tmp_path / "changed", BENCH_SERVE + [option, value.format(text=other_text)])
    default["text"] = changed["text"] = other_text
    assert holds(changed) and not holds(default)


def test_bench_serve_writes_its_table_where_told(tmp_path, monkeypatch):
    seen = bench_serve_run(monkeypatch, tmp_path, BENCH_SERVE)
    assert seen["output"].is_file() and seen["output"].with_suffix(".md").read_text().startswith("Serving `tiny`")
