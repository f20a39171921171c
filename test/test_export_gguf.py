"""scripts/export_gguf.py: GGUF files read back with the gguf package's reader (every tensor, shape, type, value and
metadata key), and run by llama.cpp itself (llama-cpp-python): the same token ids as our tokenizer on mixed
Chinese/English/code/emoji text and chat prompts, logits within 1e-3 of this project's model in f32, identical greedy
continuations in f32 and f16, close ones in q8_0; what llama.cpp cannot express is refused with one line, exit code 2
and nothing written.

Each file is exported once per module, in this process; one export runs as a real process (slow) to prove the
command line. Where llama-cpp-python could not be built, the llama.cpp tests are skipped and the reader's still run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, TokenType
from gguf.quants import dequantize
from transformers import GenerationConfig

from helpers import MULTI_TURNS, ROOT, TWO_TURNS, randomize_, run_script_main, tiny_config
from model import ByteModel
from utils.llama_cpp_runner import greedy, open_gguf
sys.path.insert(0, str(ROOT / "scripts"))
from export_gguf import main, rope_pairs  # noqa: E402

TEXT = ("你好，世界！今天天气很好。Hello, world: it's a 'test', don't panic. def f(x):\n    return x ** 2  # 平方\n"
        "\tTabs\t and   spaces\n\n emoji 🚀🦙😶‍🌫️✅ 3.14159 1234567 café ÄÖÜ; 中文English混合")
DTYPES = ("f32", "f16", "bf16", "q8_0")
QUANT = {"f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16, "bf16": GGMLQuantizationType.BF16,
         "q8_0": GGMLQuantizationType.Q8_0}
# Largest difference from the source weights that each type's rounding allows (the weights are ~0.1 and ~1).
WEIGHT_TOLERANCE = {"f32": 0.0, "f16": 1e-3, "bf16": 1e-2, "q8_0": 2e-2}
NEW_TOKENS = 16
MAX_POSITIONS = 128  # the models' context: a chat prompt and its continuation fit
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)
# The models exported: all GQA (4 query heads, 2 key/value heads), the demo tokenizer's vocabulary.
CASES = {
    "dense": dict(tie_word_embeddings=True),  # exported at every dtype
    "moe": dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 5000.0}, **MOE),
    "biased": dict(attention_bias=True, mlp_bias=True),  # a checkpoint-like folder: its tokenizer is given apart
}
REFUSALS = {
    "parallel_residual": (dict(parallel_residual=True), "parallel_residual=True cannot be exported"),
    "layer_scale": (dict(layer_scale_init=1e-4), "layer_scale_init=0.0001 cannot be exported"),
    "shared_experts": (dict(num_shared_experts=1, **MOE), "num_shared_experts=1 cannot be exported"),
    "sparse_step": (dict(decoder_sparse_step=2, **MOE), "decoder_sparse_step=2 cannot be exported"),
    "routing_bias": (MOE, "expert_bias is non-zero"),
    "small_vocabulary": (dict(vocab_size=128), "the tokenizer has 6400 tokens, the model's vocab_size is 128"),
    "no_tokenizer": ({}, "has no tokenizer.json, and a GGUF file needs one"),
    "sentencepiece_like": ({}, "is not byte-level BPE with the GPT-2 split pattern"),
    "missing_model": ({}, "model folder not found"),
    "out_exists": ({}, "exists; pass --force to replace it"),
    "out_is_folder": ({}, "is a folder; name the .gguf file to write"),
}


def build(**overrides) -> ByteModel:
    torch.manual_seed(0)
    return randomize_(ByteModel(tiny_config(**{"vocab_size": 6400, "max_position_embeddings": MAX_POSITIONS,
                                               **overrides}))).eval()


def run(arguments: list[str]) -> tuple[int, str, str]:
    return run_script_main(main, arguments)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small run fastest on one thread: a second one mostly waits, the longer the busier the machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    """name -> (model, source folder, {dtype: (file, stdout)})."""
    root = tmp_path_factory.mktemp("gguf")
    models = {}
    for name, overrides in CASES.items():
        source = root / name
        model = build(**overrides)
        model.save_pretrained(source)
        if name != "biased":
            tokenizer.save_pretrained(source)
            GenerationConfig(do_sample=False, eos_token_id=2, pad_token_id=0).save_pretrained(source)
        models[name] = (model, source, {})
    for name, (_, source, files) in models.items():
        for dtype in DTYPES if name == "dense" else ("f32",):
            out = root / f"{name}-{dtype}.gguf"
            extra = ["--tokenizer", str(ROOT / "tokenizer")] if name == "biased" else []
            code, stdout, stderr = run(["--model", str(source), "--out", str(out), "--dtype", dtype, *extra])
            assert code == 0, stderr
            files[dtype] = (out, stdout)
    return models


def fields(reader: GGUFReader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def expected_tensors(config) -> dict[str, tuple[int, ...]]:
    """llama.cpp's Llama tensor names and (torch-order) shapes for a config."""
    hidden, heads, kv, head_dim = (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                                   config.head_dim)
    tensors = {"token_embd.weight": (config.vocab_size, hidden), "output_norm.weight": (hidden,)}
    if not config.tie_word_embeddings:
        tensors["output.weight"] = (config.vocab_size, hidden)
    for layer in range(config.num_hidden_layers):
        block = f"blk.{layer}."
        tensors.update({block + "attn_norm.weight": (hidden,), block + "ffn_norm.weight": (hidden,),
                        block + "attn_q.weight": (heads * head_dim, hidden),
                        block + "attn_k.weight": (kv * head_dim, hidden),
                        block + "attn_v.weight": (kv * head_dim, hidden),
                        block + "attn_output.weight": (hidden, heads * head_dim)})
        if config.attention_bias:
            tensors.update({block + "attn_q.bias": (heads * head_dim,), block + "attn_k.bias": (kv * head_dim,),
                            block + "attn_v.bias": (kv * head_dim,), block + "attn_output.bias": (hidden,)})
        if config.num_experts:
            experts, inner = config.num_experts, config.moe_intermediate_size
            tensors.update({block + "ffn_gate_inp.weight": (experts, hidden),
                            block + "ffn_gate_exps.weight": (experts, inner, hidden),
                            block + "ffn_up_exps.weight": (experts, inner, hidden),
                            block + "ffn_down_exps.weight": (experts, hidden, inner)})
            continue
        inner = config.intermediate_size
        tensors.update({block + "ffn_gate.weight": (inner, hidden), block + "ffn_up.weight": (inner, hidden),
                        block + "ffn_down.weight": (hidden, inner)})
        if config.mlp_bias:
            tensors.update({block + "ffn_gate.bias": (inner,), block + "ffn_up.bias": (inner,),
                            block + "ffn_down.bias": (hidden,)})
    return tensors


def source_values(model: ByteModel) -> dict[str, torch.Tensor]:
    """The model's weights under their GGUF names, in llama.cpp's layout."""
    config, state = model.config, model.state_dict()
    values = {"token_embd.weight": state["model.embed_tokens.weight"], "output_norm.weight": state["model.norm.weight"],
              "output.weight": state["lm_head.weight"]}
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "mlp.gate": "ffn_gate_inp"}
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        for ours, theirs in names.items():
            for suffix in ("weight", "bias"):
                if f"{prefix}{ours}.{suffix}" in state:
                    values[f"blk.{layer}.{theirs}.{suffix}"] = state[f"{prefix}{ours}.{suffix}"]
        for suffix in ("weight", "bias"):
            for key, heads in (("attn_q", config.num_attention_heads), ("attn_k", config.num_key_value_heads)):
                if f"blk.{layer}.{key}.{suffix}" in values:
                    values[f"blk.{layer}.{key}.{suffix}"] = rope_pairs(values[f"blk.{layer}.{key}.{suffix}"], heads)
        if config.num_experts:
            gate, up = state[prefix + "mlp.experts.gate_up_proj"].chunk(2, dim=1)
            values.update({f"blk.{layer}.ffn_gate_exps.weight": gate, f"blk.{layer}.ffn_up_exps.weight": up,
                           f"blk.{layer}.ffn_down_exps.weight": state[prefix + "mlp.experts.down_proj"]})
    return values


# ---------------------------------------------------------------- the file, read back by gguf's reader


@pytest.mark.parametrize("case", [("dense", dtype) for dtype in DTYPES] + [("moe", "f32"), ("biased", "f32")],
                         ids=lambda case: "-".join(case))
def test_every_tensor_has_llama_cpp_name_shape_type_and_the_source_values(exported, case):
    name, dtype = case
    model, _, files = exported[name]
    reader = GGUFReader(files[dtype][0])
    expected = expected_tensors(model.config)
    assert sorted(tensor.name for tensor in reader.tensors) == sorted(expected)
    values = source_values(model)
    for tensor in reader.tensors:
        # ggml lists dimensions fastest first: the reverse of torch's order.
        assert tuple(int(size) for size in reversed(tensor.shape)) == expected[tensor.name], tensor.name
        keeps_f32 = len(expected[tensor.name]) == 1 or "ffn_gate_inp" in tensor.name
        assert tensor.tensor_type == (GGMLQuantizationType.F32 if keeps_f32 else QUANT[dtype]), tensor.name
        weights = dequantize(tensor.data, tensor.tensor_type).reshape(expected[tensor.name])
        difference = np.abs(weights - values[tensor.name].numpy()).max()
        assert difference <= (0.0 if keeps_f32 else WEIGHT_TOLERANCE[dtype]), (tensor.name, difference)


@pytest.mark.parametrize("name", CASES)
def test_metadata_keys_and_values(exported, name, tokenizer):
    model, _, files = exported[name]
    config = model.config
    metadata = fields(GGUFReader(files["f32"][0]))
    expected = {
        "general.architecture": "llama", "general.name": "StellarByte", "general.file_type": 0,
        "general.quantization_version": 2, "llama.vocab_size": 6400,
        "llama.context_length": config.max_position_embeddings, "llama.embedding_length": config.hidden_size,
        "llama.block_count": config.num_hidden_layers,
        "llama.feed_forward_length": config.moe_intermediate_size if config.num_experts else config.intermediate_size,
        "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.attention.key_length": 16,
        "llama.attention.value_length": 16, "llama.rope.dimension_count": 16,
        "llama.rope.freq_base": pytest.approx(config.rope_theta),
        "llama.attention.layer_norm_rms_epsilon": pytest.approx(config.rms_norm_eps),
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": False,
        "tokenizer.chat_template": tokenizer.chat_template,
    }
    if config.num_experts:
        expected.update({"llama.expert_count": 4, "llama.expert_used_count": 2})
    listed = {"tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"}
    assert set(metadata) - {key for key in metadata if key.startswith("GGUF.")} == set(expected) | listed
    assert {key: metadata[key] for key in expected} == expected

    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    assert metadata["tokenizer.ggml.tokens"] == [by_id[index] for index in range(len(tokenizer))]
    specials = {0, 1, 2, 3, 4, 5}  # pad, bos, eos and the role markers
    assert metadata["tokenizer.ggml.token_type"] == [TokenType.CONTROL if index in specials else TokenType.NORMAL
                                                     for index in range(len(tokenizer))]
    merges = json.loads((ROOT / "tokenizer" / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"]
    assert metadata["tokenizer.ggml.merges"] == [" ".join(pair) for pair in merges]


def test_file_sizes_shrink_with_the_dtype(exported):
    sizes = {dtype: file.stat().st_size for dtype, (file, _) in exported["dense"][2].items()}
    assert sizes["q8_0"] < sizes["f16"] == sizes["bf16"] < sizes["f32"]


@pytest.mark.slow
def test_the_command_line_writes_the_same_file(exported, tmp_path):
    # No PYTHONPATH, another working folder: the script finds the repository's packages by itself.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "export_gguf.py"), "--model",
                           str(exported["dense"][1]), "--out", str(tmp_path / "cli.gguf")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith(f"exported {exported['dense'][1]} -> ")
    assert (tmp_path / "cli.gguf").read_bytes() == exported["dense"][2]["f32"][0].read_bytes()


def test_dynamic_rope_is_noted(exported):
    assert "note: GGUF has no dynamic NTK RoPE" in exported["moe"][2]["f32"][1]
    assert "note" not in exported["dense"][2]["f32"][1]


# ---------------------------------------------------------------- llama.cpp runs the file


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (its build needs a compiler)")


def load(llama_cpp, path: Path):
    # One thread: for models this small, waiting for a second thread costs more than it saves on a busy machine.
    return open_gguf(path, MAX_POSITIONS, threads=1, all_logits=True)


def llama_greedy(llm, prompt: list[int]) -> list[int]:
    return greedy(llm, prompt, NEW_TOKENS)


@torch.no_grad()
def our_greedy(model: ByteModel, prompt: list[int]) -> list[int]:
    # Plain argmax over full forwards: no logits processor (generate's min_new_tokens would forbid the eos token).
    sequence = list(prompt)
    for _ in range(NEW_TOKENS):
        sequence.append(int(model(torch.tensor([sequence])).logits[0, -1].argmax()))
    return sequence[len(prompt):]


@pytest.fixture(scope="module")
def continuations(exported, tokenizer) -> dict[str, list[tuple[list[int], list[int]]]]:
    """name -> (prompt, this project's greedy continuation) for two chats and three plain texts."""
    chats = [tokenizer.apply_chat_template(turns[:-1], add_generation_prompt=True, return_dict=True)["input_ids"]
             for turns in (TWO_TURNS, MULTI_TURNS)]
    texts = ("从前有一座山，", "The quick brown fox", "def add(a, b):\n")
    prompts = chats + [tokenizer(text)["input_ids"] for text in texts]
    return {name: [(prompt, our_greedy(exported[name][0], prompt)) for prompt in prompts] for name in CASES}


def test_llama_cpp_tokenizes_text_and_chats_as_our_tokenizer(exported, llama_cpp, tokenizer):
    llm = load(llama_cpp, exported["dense"][2]["f32"][0])
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == tokenizer(TEXT)["input_ids"]
    marked = TEXT + "<|user|>hi<|SEOS|>"
    assert llm.tokenize(marked.encode(), add_bos=False, special=True) == tokenizer(marked)["input_ids"]
    assert llm.detokenize(tokenizer(TEXT)["input_ids"]).decode() == TEXT
    # Chat mode: llama-cpp-python formats conversations with the file's template and bos/eos tokens.
    formatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"], bos_token=llm._model.token_get_text(llm.token_bos()),
        eos_token=llm._model.token_get_text(llm.token_eos()))
    for turns in (TWO_TURNS, MULTI_TURNS, TWO_TURNS[:1]):
        prompt = formatter(messages=turns).prompt
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == tokenizer.apply_chat_template(
            turns, add_generation_prompt=True, return_dict=True)["input_ids"]
    llm.close()


@pytest.mark.parametrize("name", CASES)
def test_llama_cpp_logits_equal_ours_in_f32(exported, llama_cpp, tokenizer, name):
    model, _, files = exported[name]
    ids = tokenizer(TEXT)["input_ids"][:model.config.max_position_embeddings]
    llm = load(llama_cpp, files["f32"][0])
    llm.eval(ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(np.array(llm.scores[:len(ids)]) - ours).max() < 1e-3
    llm.close()


@pytest.mark.parametrize("dtype", DTYPES)
def test_llama_cpp_greedy_continuations(exported, llama_cpp, continuations, dtype):
    """Identical in f32 and f16; bf16 and q8_0 round the weights more coarsely and may part from ours late."""
    llm = load(llama_cpp, exported["dense"][2][dtype][0])
    agreeing = total = 0
    for prompt, ours in continuations["dense"]:
        theirs = llama_greedy(llm, prompt)
        if dtype in ("f32", "f16"):
            assert theirs == ours, prompt
        same = next((index for index, (a, b) in enumerate(zip(theirs, ours)) if a != b), NEW_TOKENS)
        agreeing, total = agreeing + same, total + NEW_TOKENS
    assert agreeing / total >= 0.5
    llm.close()


@pytest.mark.parametrize("name", ("moe", "biased"))
def test_llama_cpp_greedy_continuations_of_moe_and_biases(exported, llama_cpp, continuations, name):
    llm = load(llama_cpp, exported[name][2]["f32"][0])
    for prompt, ours in continuations[name]:
        assert llama_greedy(llm, prompt) == ours, prompt
    llm.close()


# ---------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def refusals(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("refusals")
    results = {}
    for case, (overrides, _) in REFUSALS.items():
        folder = root / case
        source, out = folder / "src", folder / "model.gguf"
        folder.mkdir()
        if case != "missing_model":
            model = build(**overrides)
            if case == "routing_bias":
                with torch.no_grad():
                    model.model.layers[1].mlp.gate.expert_bias[2] = 1e-3
            model.save_pretrained(source)
            if case != "no_tokenizer":
                tokenizer.save_pretrained(source)
        if case == "sentencepiece_like":
            spec = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
            spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always",
                                     "split": True}
            (source / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        if case == "out_exists":
            out.write_text("not mine")
        if case == "out_is_folder":
            out.mkdir()
        results[case] = (*run(["--model", str(source), "--out", str(out), "--dtype", "q8_0"]), folder)
    return results


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_are_one_line_exit_2_and_write_nothing(refusals, case):
    code, stdout, stderr, folder = refusals[case]
    assert code == 2, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and REFUSALS[case][1] in lines[0], stderr
    assert stdout == ""
    left = sorted(path.name for path in folder.iterdir())
    expected = [] if case == "missing_model" else ["src"]
    if case in ("out_exists", "out_is_folder"):
        expected.append("model.gguf")
    assert left == sorted(expected)
    if case == "out_exists":
        assert (folder / "model.gguf").read_text() == "not mine"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(exported, tmp_path, monkeypatch):
    import gguf

    out = tmp_path / "model.gguf"
    out.write_bytes(b"the previous export")

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full_disk)
    code, _, stderr = run(["--model", str(exported["dense"][1]), "--out", str(out), "--force"])
    assert code == 2 and stderr.startswith(f"error: cannot write {out}: ") and len(stderr.splitlines()) == 1
    assert [path.name for path in tmp_path.iterdir()] == ["model.gguf"]
    assert out.read_bytes() == b"the previous export"
