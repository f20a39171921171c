"""utils/quantize.py and speculative decoding in scripts/chat.py.

The quantized layers are checked against torch's own implementations of the same arithmetic: its dynamic int8
Linear (`quantize_dynamic`, fbgemm) and its packed int4 CPU kernel (`_weight_int4pack_mm_for_cpu`), layer by layer
and as whole models. Against fp32 only tolerances can be stated; they were measured on these tiny random models and
are written next to each bound. Assisted generation (a draft model proposing tokens) must give exactly the tokens
of plain greedy decoding. The command line goes through chat.main(), what `python scripts/chat.py` runs."""

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.ao.quantization import (PerChannelMinMaxObserver, PlaceholderObserver, QConfig,
                                   per_channel_dynamic_qconfig, quantize_dynamic)
from transformers import GenerationConfig

from helpers import ATOL, randomize_, tiny_config
from model import ByteModel
from utils.quantize import (QUANTIZE_CHOICES, Int4Linear, Int8Linear, QuantizedEmbedding, check_quantizable,
                            int4_pack, int4_unpack, quantize, weight_bytes)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import chat  # noqa: E402

# torch's stock per-channel qconfig divides the largest weight by 127.5 (range -128..127), Int8Linear by 127
# (symmetric -127..127): with torch's observer restricted to -127..127 both pick the same scales, so every output
# must agree to rounding.
SYMMETRIC_INT8 = QConfig(
    activation=PlaceholderObserver.with_args(dtype=torch.quint8, quant_min=0, quant_max=255, is_dynamic=True),
    weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                              quant_min=-127, quant_max=127))
# One linear layer against fp32, ||quantized - fp32|| / ||fp32||, nn.Linear's uniform init and randn inputs of 1, 7
# and 15 rows, 20 seeds: int8 1.0-1.8% (7-bit activations, one scale per call), int4 4.9-7.2%.
LINEAR_INT8_RTOL, LINEAR_INT4_RTOL = 0.03, 0.10
# Whole tiny_config model, randomize_ weights (std 0.1 Gaussians, the hardest case for min/max 4-bit groups: each
# layer alone is ~9% off), 2 x 24 tokens, 20 seeds: int8 7.4-9.7% and top-1 agreement 0.77-0.96; int4 32-41% and
# 0.40-0.73. A random network amplifies what each layer adds, and its logits have small margins; a broken layout
# (wrong group, swapped nibbles, transposed codes) gives errors near 100% and top-1 near chance (1/128).
MODEL_INT8_RTOL, MODEL_INT4_RTOL = 0.15, 0.6
MODEL_INT8_TOP1, MODEL_INT4_TOP1 = 0.7, 0.3
# weight_bytes(fp32) / weight_bytes(quantized) for tiny_config (vocab 128, hidden 64): measured 3.77 (int8), 6.31
# (int4); tied 3.50 (int8 keeps two tables where fp32 had one) and 6.30.
MIN_SHRINK = {("int8", False): 3.6, ("int4", False): 6.0, ("int8", True): 3.3, ("int4", True): 6.0}
NEW_TOKENS = 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small run fastest on one thread; on two, assisted generation's many small calls mostly wait for
    the other core when other processes share the machine (seconds instead of a fraction of one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def torch_dynamic_int8(module: nn.Module, qconfig=SYMMETRIC_INT8) -> nn.Module:
    """`module` (a copy) with every nn.Linear replaced by torch's dynamic int8 Linear."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        return quantize_dynamic(copy.deepcopy(module), {nn.Linear: qconfig}, dtype=torch.qint8)


def torch_int8_table(weight: torch.Tensor) -> torch.Tensor:
    """`weight` rounded to int8 by torch's symmetric per-row observer and quantize_per_channel, back in fp32."""
    observer = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                        quant_min=-127, quant_max=127)
    observer(weight.detach())
    scale, zero_point = observer.calculate_qparams()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.quantize_per_channel(weight.detach(), scale, zero_point, 0, torch.qint8).dequantize()


def torch_int4_inputs(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor):
    """torch's packed int4 weight and (groups, N, 2) scales-and-zeros from `int4_pack`'s output. torch's kernel
    computes (code - 8) * scale + zero, so zero = low + 8 * scale."""
    nibbles = torch.stack([codes & 15, codes >> 4], dim=-1).flatten(1).to(torch.int32)  # low nibble: even column
    packed = torch._convert_weight_to_int4pack_for_cpu(nibbles, 1)
    scales_and_zeros = torch.stack([scale, low + 8 * scale], dim=-1).transpose(0, 1).contiguous()
    return packed, scales_and_zeros, nibbles.shape[1] // scale.shape[1]


def torch_int4_matmul(x: torch.Tensor, codes, scale, low) -> torch.Tensor:
    packed, scales_and_zeros, group_size = torch_int4_inputs(codes, scale, low)
    out = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]), packed, group_size, scales_and_zeros)
    return out.view(*x.shape[:-1], -1)


def torch_int4_weight(codes, scale, low) -> torch.Tensor:
    """The fp32 weight torch's int4 kernel multiplies by: its product with the identity."""
    return torch_int4_matmul(torch.eye(codes.shape[1] * 2), codes, scale, low).T


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).norm() / reference.norm()).item()


def random_model(seed: int = 0, **overrides) -> ByteModel:
    torch.manual_seed(seed)
    return randomize_(ByteModel(tiny_config(**overrides))).eval()


@torch.no_grad()
def greedy(language_model, prompt: torch.Tensor, cache: str | None = None, draft=None) -> torch.Tensor:
    config = GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                              eos_token_id=None, pad_token_id=0, cache_implementation=cache,
                              disable_compile=True)  # an fp32 static cache would otherwise compile for ~10 s
    return language_model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config,
                                   assistant_model=draft)


def prompts(count: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(3, 128, (1, 5 + 4 * index), generator=generator) for index in range(count)]


def count_calls(module: nn.Module) -> list:
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


# --- layers -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_equals_torch_dynamic_linear(bias):
    """Int8Linear is fbgemm's dynamic int8 GEMM with symmetric per-channel weights: torch's own dynamic Linear with
    the same scales gives the same outputs, for one row, several and a 3D input; both Int8Linear and torch's stock
    per-channel module (scales /127.5) stay within the int8 tolerance of fp32."""
    torch.manual_seed(0)
    linear = nn.Linear(96, 80, bias=bias)
    mine = Int8Linear(linear)
    same_scales = torch_dynamic_int8(nn.Sequential(linear))[0]
    stock = torch_dynamic_int8(nn.Sequential(linear), per_channel_dynamic_qconfig)[0]
    assert type(same_scales).__module__.startswith("torch.ao.nn.quantized.dynamic")
    for shape in [(1, 96), (7, 96), (3, 5, 96)]:
        x = torch.randn(shape)
        with torch.no_grad():
            out, reference, fp32 = mine(x), same_scales(x), linear(x)
        assert out.shape == fp32.shape
        torch.testing.assert_close(out, reference, rtol=0, atol=ATOL)
        assert relative_error(out, fp32) < LINEAR_INT8_RTOL
        assert relative_error(stock(x), fp32) < LINEAR_INT8_RTOL


@pytest.mark.parametrize("in_features, out_features, group_size, expected_group, bias", [
    (64, 48, 32, 32, False),
    (256, 48, None, 128, True),  # the default group: the largest of 128, 64, 32 dividing the input size
    (192, 64, None, 64, False),
])
def test_int4_linear_equals_torch_int4_kernel(in_features, out_features, group_size, expected_group, bias):
    """From the same codes, scales and minima, torch's packed int4 CPU kernel gives Int4Linear's outputs (bias added
    by hand: the kernel has none), so codes, nibble order, groups and the affine mapping are right; the result stays
    within the int4 tolerance of fp32."""
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=bias)
    layer = Int4Linear(linear, group_size)
    assert layer.group_size == expected_group
    assert layer.codes.dtype == torch.uint8 and layer.codes.shape == (out_features, in_features // 2)
    for shape in [(1, in_features), (5, in_features), (2, 3, in_features)]:
        x = torch.randn(shape)
        with torch.no_grad():
            out, fp32 = layer(x), linear(x)
            reference = torch_int4_matmul(x, layer.codes, layer.scale, layer.low)
            if bias:
                reference = reference + linear.bias
        assert out.shape == fp32.shape
        # measured at most 5e-7 of the largest output
        assert (out - reference).abs().max() <= 1e-5 * reference.abs().max()
        assert relative_error(out, fp32) < LINEAR_INT4_RTOL


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_round_trip_is_within_half_a_step(group_size):
    """int4_unpack(int4_pack(w)) is off by at most half of each group's step (max - min) / 15, computed here from
    w; a constant group (step 0) comes back exactly."""
    torch.manual_seed(0)
    weight = torch.randn(24, 256)
    weight[3, 40] = 9.0  # an outlier widens only its own group's step
    weight[5] = 0.5
    codes, scale, low = int4_pack(weight, group_size)
    assert codes.dtype == torch.uint8 and codes.shape == (24, 128)
    groups = weight.reshape(24, -1, group_size)
    step = (groups.amax(-1) - groups.amin(-1)) / 15
    error = (int4_unpack(codes, scale, low) - weight).reshape(24, -1, group_size).abs().amax(-1)
    # 1e-6 absolute for fp32 rounding of code * scale + low (measured at most 0.99997 of half a step)
    assert (error <= step / 2 + 1e-6).all(), (error / step).max()
    assert error[5].max() == 0
    assert error[3].max() > error[4].max()  # the outlier's group is coarser, the others are not


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_embedding_rows(bits):
    """Looked-up rows are the table's quantized rows: int8 equals torch's per-row symmetric quantize_per_channel
    dequantized, int4 the weight torch's int4 kernel multiplies by; both within half a step of the fp32 rows."""
    torch.manual_seed(0)
    embedding = nn.Embedding(100, 64)
    with torch.no_grad():
        embedding.weight.normal_(0, 0.1)
    table = QuantizedEmbedding(embedding, bits)
    ids = torch.tensor([[0, 5, 99, 5, 17], [42, 42, 1, 0, 63]])
    rows = table(ids)
    fp32 = embedding.weight.detach()[ids]
    assert rows.shape == (2, 5, 64) and rows.dtype == torch.float32
    if bits == 8:
        assert table.codes.dtype == torch.int8
        torch.testing.assert_close(rows, torch_int8_table(embedding.weight)[ids], rtol=0, atol=1e-7)
        half_step = embedding.weight.detach().abs().amax(1)[ids, None] / 127 / 2
    else:
        # 100 rows: torch's kernel needs a multiple of 16 rows, so the reference is built from the first 96.
        reference = torch_int4_weight(table.codes[:96], table.scale[:96], table.low[:96])
        kept = ids < 96
        torch.testing.assert_close(rows[kept], reference[ids[kept]], rtol=0, atol=1e-6)
        groups = embedding.weight.detach().reshape(100, 1, 64)  # one group: 64 is the largest size dividing 64
        half_step = ((groups.amax(-1) - groups.amin(-1)) / 15 / 2)[ids]
    assert ((rows - fp32).abs() <= half_step + 1e-6).all()


def test_tied_int4_shares_one_table_and_int8_keeps_two():
    """A tied head and embedding stay one table under int4 (the same storage; counted once by weight_bytes), while
    int8 keeps fbgemm's packed head and a separate int8 table and unties the config."""
    tied, untied = random_model(tie_word_embeddings=True), random_model()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    four = quantize(copy.deepcopy(tied), "int4")
    head, table = four.lm_head, four.model.embed_tokens
    assert isinstance(head, Int4Linear) and isinstance(table, QuantizedEmbedding)
    for name in ("codes", "scale", "low"):
        assert getattr(head, name).data_ptr() == getattr(table, name).data_ptr(), name
    assert four.config.tie_word_embeddings and four.config.quantization == "int4"
    ids = torch.tensor([[3, 64, 127]])
    torch.testing.assert_close(table(ids)[0], int4_unpack(head.codes, head.scale, head.low)[ids[0]], rtol=0, atol=0)
    table_bytes = sum(tensor.numel() * tensor.element_size() for tensor in (table.codes, table.scale, table.low))
    assert weight_bytes(quantize(copy.deepcopy(untied), "int4")) - weight_bytes(four) == table_bytes

    eight = quantize(copy.deepcopy(tied), "int8")
    assert isinstance(eight.lm_head, Int8Linear) and eight.model.embed_tokens.codes.dtype == torch.int8
    assert not eight.config.tie_word_embeddings and eight.config.quantization == "int8"
    assert weight_bytes(eight) == weight_bytes(quantize(copy.deepcopy(untied), "int8"))


# --- whole models -----------------------------------------------------------------------------------------------


def test_quantized_models_equal_torch_built_references():
    """The int8 model is the fp32 model with every nn.Linear replaced by torch's dynamic int8 Linear (same scales)
    and the table rounded by torch's per-row observer; the int4 model is the fp32 model holding the weights torch's
    int4 kernel multiplies by. Measured difference: 0 in both."""
    fp32 = random_model()
    x = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))

    eight = quantize(copy.deepcopy(fp32), "int8")
    reference = copy.deepcopy(fp32)
    with torch.no_grad():
        reference.model.embed_tokens.weight.copy_(torch_int8_table(fp32.model.embed_tokens.weight))
    reference = torch_dynamic_int8(reference)
    assert sum(type(module).__name__ == "Linear" and "dynamic" in type(module).__module__
               for module in reference.modules()) == 15  # 7 per layer and the head

    four = quantize(copy.deepcopy(fp32), "int4")
    fake = copy.deepcopy(fp32)
    quantized = dict(four.named_modules())
    with torch.no_grad():
        for name, module in fake.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                source = quantized[name]
                module.weight.copy_(torch_int4_weight(source.codes, source.scale, source.low))
        torch.testing.assert_close(eight(x).logits, reference(x).logits, rtol=0, atol=ATOL)
        torch.testing.assert_close(four(x).logits, fake(x).logits, rtol=0, atol=ATOL)


def test_quantized_logits_stay_close_to_fp32():
    """Logits of the int8 and int4 models against fp32 on three random models: relative error and top-1 agreement
    within the bounds measured above."""
    for seed in range(3):
        fp32 = random_model(seed)
        x = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            reference = fp32(x).logits
            for mode, rtol, top1 in (("int8", MODEL_INT8_RTOL, MODEL_INT8_TOP1),
                                     ("int4", MODEL_INT4_RTOL, MODEL_INT4_TOP1)):
                logits = quantize(copy.deepcopy(fp32), mode)(x).logits
                agreement = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
                assert relative_error(logits, reference) < rtol, (mode, seed)
                assert agreement >= top1, (mode, seed, agreement)


@pytest.mark.parametrize("tied", [False, True])
def test_weight_bytes_shrink(tied):
    """fp32 weight_bytes is 4 bytes per parameter as transformers counts them; int8 and int4 shrink it at least as
    far as measured."""
    fp32 = random_model(tie_word_embeddings=tied)
    assert weight_bytes(fp32) == 4 * fp32.num_parameters()
    for mode in ("int8", "int4"):
        ratio = weight_bytes(fp32) / weight_bytes(quantize(copy.deepcopy(fp32), mode))
        assert ratio >= MIN_SHRINK[mode, tied], (mode, ratio)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_generate_with_a_quantized_model(mode):
    """Greedy generate runs on a quantized model with a dynamic and a static cache (eager here; the compiled step
    has its own test), gives the requested number of tokens and the same tokens with both."""
    quantized = quantize(random_model(max_position_embeddings=128), mode)
    for prompt in prompts(2):
        dynamic = greedy(quantized, prompt)
        config = GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                  eos_token_id=None, pad_token_id=0, cache_implementation="static",
                                  disable_compile=True)
        with torch.no_grad():
            static = quantized.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
        assert dynamic.shape == (1, prompt.shape[1] + NEW_TOKENS)
        assert torch.equal(dynamic[:, :prompt.shape[1]], prompt)
        assert torch.equal(dynamic, static)


@pytest.mark.slow
def test_int8_static_cache_decode_step_compiles_to_the_same_tokens(monkeypatch):
    """With a static cache the int8 model runs the compiled decode step (fbgemm's GEMM behind a custom op, so the
    compiler never sees its packed weights) in one graph, and gives the eager tokens."""
    quantized = quantize(random_model(max_position_embeddings=128), "int8")
    prompt = prompts(1)[0]
    config = GenerationConfig(do_sample=False, max_new_tokens=8, min_new_tokens=8, eos_token_id=None,
                              pad_token_id=0, cache_implementation="static")
    compiled_calls = []
    original = quantized.get_compiled_call

    def recording(*args):
        compiled_calls.append(args)
        return original(*args)

    monkeypatch.setattr(quantized, "get_compiled_call", recording)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        compiled = quantized.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
    assert compiled_calls
    assert torch.equal(compiled, greedy(quantized, prompt)[:, :compiled.shape[1]])
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])


# --- speculative decoding -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def target():
    return random_model(max_position_embeddings=128)


@pytest.fixture(scope="module")
def drafts(target):
    small = random_model(1, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=128)
    return {"small": small, "int8": quantize(copy.deepcopy(target), "int8")}


@pytest.fixture(scope="module")
def plain_greedy(target):
    return [greedy(target, prompt) for prompt in prompts()]


@pytest.mark.parametrize("cache", [None, "static"])
@pytest.mark.parametrize("draft_name", ["small", "int8"])
def test_assisted_generation_equals_greedy(target, drafts, plain_greedy, draft_name, cache):
    """With a draft proposing tokens (a smaller random model, or the target's own int8 copy), greedy assisted
    generation gives exactly the target's plain greedy tokens, with a dynamic and a static cache; the draft ran, and
    the int8 copy, which mostly agrees with the target, saves target calls."""
    draft, hooked = copy.deepcopy(drafts[draft_name]), copy.deepcopy(target)
    draft_calls, target_calls = count_calls(draft), count_calls(hooked)
    for prompt, expected in zip(prompts(), plain_greedy):
        target_calls.clear()
        assert torch.equal(greedy(hooked, prompt, cache, draft), expected)
        if draft_name == "int8":
            # plain greedy takes NEW_TOKENS calls; measured 8-12 with the int8 copy (the small random draft: 32)
            assert len(target_calls) < NEW_TOKENS * 3 // 4, len(target_calls)
    assert len(draft_calls) > 0


def test_assisted_generation_equals_greedy_for_an_int4_target(target, drafts):
    """An int4 model expands its weights and multiplies in fp32, row by row alike, so a draft leaves its greedy
    tokens exactly its own too. (An int8 model quantizes each call's activations with one scale, so verifying
    several drafted tokens in one call can change its tokens: README says so.)"""
    quantized = quantize(copy.deepcopy(target), "int4")
    for prompt in prompts(2):
        assert torch.equal(greedy(quantized, prompt, draft=drafts["small"]), greedy(quantized, prompt))


# --- refusals -----------------------------------------------------------------------------------------------------


def test_refusals_are_one_line_value_errors_and_change_nothing():
    """A mixture of experts, an unknown mode, int4 with a layer input not divisible by 32, and a model off the CPU
    are refused with one-line ValueErrors before anything is replaced; int8 has no size constraint; "none" returns
    the model untouched."""
    moe = random_model(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48)
    for mode in ("int8", "int4"):
        with pytest.raises(ValueError) as error:
            quantize(moe, mode)
        assert "\n" not in str(error.value) and "mixture of experts" in str(error.value)
    assert not any(isinstance(module, (Int8Linear, Int4Linear, QuantizedEmbedding)) for module in moe.modules())
    assert getattr(moe.config, "quantization", "none") == "none"

    dense = random_model()
    with pytest.raises(ValueError, match="int3") as error:
        quantize(dense, "int3")
    assert "\n" not in str(error.value) and all(choice in str(error.value) for choice in QUANTIZE_CHOICES)
    assert quantize(dense, "none") is dense and type(dense.lm_head) is nn.Linear

    odd = random_model(hidden_size=48, intermediate_size=96)  # 4 heads of 12; 96 is divisible by 32, 48 is not
    with pytest.raises(ValueError, match="divisible by 128 or 64 or 32; a layer has 48") as error:
        quantize(odd, "int4")
    assert "\n" not in str(error.value)
    assert type(odd.lm_head) is nn.Linear
    assert isinstance(quantize(odd, "int8").lm_head, Int8Linear)

    with torch.device("meta"):
        off_cpu = ByteModel(tiny_config())
    with pytest.raises(ValueError, match="CPU only"):
        check_quantizable(off_cpu, "int8")


# --- the command line -------------------------------------------------------------------------------------------


def save_folder(folder: Path, language_model: ByteModel, tokenizer) -> str:
    language_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def chat_model(tokenizer, seed: int = 0, **overrides) -> ByteModel:
    language_model = random_model(seed, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                  **overrides)
    with torch.no_grad():
        language_model.lm_head.weight[tokenizer.eos_token_id] = 0  # replies run to --max-new-tokens
    return language_model


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("quantize_chat")
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<draft-only>"])
    return {
        "model": save_folder(root / "model", chat_model(tokenizer), tokenizer),
        "draft": save_folder(root / "draft", chat_model(tokenizer, 1, hidden_size=32, num_hidden_layers=1,
                                                        num_attention_heads=2, num_key_value_heads=1), tokenizer),
        "moe": save_folder(root / "moe", chat_model(tokenizer, num_experts=4, num_experts_per_tok=2,
                                                    moe_intermediate_size=48), tokenizer),
        "other_tokenizer": save_folder(root / "other_tokenizer", random_model(vocab_size=len(other)), other),
    }


def run_chat(monkeypatch, capsys, *arguments: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["chat.py", *arguments])
    capsys.readouterr()
    try:
        chat.main()
        code = 0
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def test_chat_draft_replies_equal_the_models_own(folders, monkeypatch, capsys):
    """`--temperature 0` replies are the same with `--draft int8` and with a smaller draft folder sharing the
    tokenizer as without a draft; `--quantize int4` and `--quantize int8` answer too."""
    prompt = ["--model", folders["model"], "--prompt", "hi", "--temperature", "0", "--max-new-tokens", "12"]
    code, plain, err = run_chat(monkeypatch, capsys, *prompt)
    assert code == 0 and plain.strip(), err
    draft_calls = []
    load_draft = chat.load_draft

    def counted_draft(*arguments):
        draft = load_draft(*arguments)
        if draft is not None:
            draft.register_forward_hook(lambda *_: draft_calls.append(1))
        return draft

    monkeypatch.setattr(chat, "load_draft", counted_draft)
    for draft in ("int8", folders["draft"]):
        draft_calls.clear()
        code, out, err = run_chat(monkeypatch, capsys, *prompt, "--draft", draft)
        assert (code, out) == (0, plain), (draft, err)
        assert draft_calls, draft  # the reply really was drafted
    for mode in ("int4", "int8"):
        code, out, err = run_chat(monkeypatch, capsys, *prompt, "--quantize", mode)
        assert code == 0 and out.strip() and "Traceback" not in err, (mode, err)


@pytest.mark.parametrize("arguments, message", [
    (["--model", "{moe}", "--quantize", "int8"], "mixture of experts"),
    (["--model", "{moe}", "--draft", "int4"], "mixture of experts"),
    (["--model", "{model}", "--draft", "{other_tokenizer}"], "its tokenizer differs"),
    (["--model", "{model}", "--draft", "{model}/missing"], "--draft: model folder not found"),
], ids=["moe_quantize", "moe_draft", "other_tokenizer", "missing_draft"])
def test_chat_refusals_exit_2_with_one_line(folders, monkeypatch, capsys, arguments, message):
    """Quantizing an MoE model (as the model or as its draft), a draft with a different vocabulary and a missing
    draft folder end with exit code 2 and one `error:` line, nothing on stdout."""
    arguments = [argument.format(**folders) for argument in arguments]
    code, out, err = run_chat(monkeypatch, capsys, *arguments, "--prompt", "hi", "--temperature", "0")
    lines = err.strip().splitlines()
    assert code == 2 and out == "", err
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
