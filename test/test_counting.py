"""utils/counting.py: parameter counts and training FLOPs per token, checked against the model itself and PyTorch's
FlopCounterMode; FLOPs of a transformers Llama/Mixtral config equal those of the same ByteModel."""

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from helpers import llama_config_from, tiny_config
from model import ByteModel, ByteModelConfig
from utils.counting import COMPONENTS, flops_per_token, measure_peak_flops, parameter_counts


# Tied and untied, GQA and MHA, the optional LayerScale / parallel residual, and a head_dim that is not
# hidden / heads (so the closed forms have to use head_dim, not hidden).
COUNT_CONFIGS = {
    "untied_gqa": dict(),
    "tied_gqa": dict(tie_word_embeddings=True),
    "untied_mha": dict(num_key_value_heads=4),
    "layer_scale": dict(layer_scale_init=1e-4),
    "parallel_residual": dict(parallel_residual=True, tie_word_embeddings=True),
    "layer_scale_parallel": dict(layer_scale_init=1e-4, parallel_residual=True),
    "wide_heads": dict(head_dim=32, num_hidden_layers=3),
}


def build(**overrides) -> ByteModel:
    torch.manual_seed(0)
    return ByteModel(tiny_config(**overrides))


# ---------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("overrides", COUNT_CONFIGS.values(), ids=COUNT_CONFIGS.keys())
def test_parameter_counts_match_the_model_and_the_closed_forms(overrides):
    model = build(**overrides)
    config = model.config
    hidden, vocab, layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    counts = parameter_counts(model)

    assert counts["total"] == sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    assert counts["trainable"] == counts["total"]
    assert set(counts["by_component"]) == set(COMPONENTS)
    assert sum(counts["by_component"].values()) == counts["total"]
    assert counts["embedding"] == counts["by_component"]["embeddings"] == vocab * hidden
    assert counts["non_embedding"] == counts["total"] - vocab * hidden
    tied = config.tie_word_embeddings
    assert counts["by_component"]["lm_head"] == (0 if tied else vocab * hidden)

    attention = hidden * config.head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    mlp = 3 * hidden * config.intermediate_size
    layer_norms = 2 * hidden + (2 * hidden if config.layer_scale_init is not None else 0)  # + LayerScale gammas
    assert len(counts["per_layer"]) == layers
    for layer in counts["per_layer"]:
        assert layer == {"attention": attention, "mlp": mlp, "norms": layer_norms}
    assert counts["by_component"]["attention"] == layers * attention
    assert counts["by_component"]["mlp"] == layers * mlp
    assert counts["by_component"]["norms"] == layers * layer_norms + hidden  # + the final norm
    # The whole model from the closed forms alone.
    assert counts["total"] == vocab * hidden * (1 if tied else 2) + layers * (attention + mlp + layer_norms) + hidden


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_trainable_drops_by_exactly_the_frozen_count(tied):
    model = build(tie_word_embeddings=tied)
    total = parameter_counts(model)["total"]
    frozen = [model.model.embed_tokens.weight, model.model.layers[0].mlp.up_proj.weight,
              model.model.layers[1].self_attn.k_proj.weight, model.model.norm.weight]
    for parameter in frozen:
        parameter.requires_grad_(False)
    frozen_count = sum(p.numel() for p in frozen)
    assert frozen_count == 128 * 64 + 64 * 192 + 64 * 32 + 64
    counts = parameter_counts(model)
    assert counts["total"] == total
    assert counts["trainable"] == total - frozen_count
    assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_a_meta_device_model_counts_like_a_real_one(tied):
    # main() counts a config's model on the meta device; that must not change any number (tying included).
    config = tiny_config(tie_word_embeddings=tied)
    with torch.device("meta"):
        meta = ByteModel(config)
    assert parameter_counts(meta) == parameter_counts(ByteModel(config))


# ---------------------------------------------------------------- FLOPs


def counted_training_step(model: ByteModel, seq_len: int) -> FlopCounterMode:
    """FLOPs of one fp32 forward + backward (batch 1, labels = input) as FlopCounterMode counts them.

    The MATH SDPA backend is forced: on CPU the default kernel (aten._scaled_dot_product_flash_attention_for_cpu)
    has no FLOP formula in FlopCounterMode, so it would count zero for the attention matrices. The math backend
    decomposes SDPA into (b)mm's over the full seq_len x seq_len square, which is what flops_per_token counts."""
    model.train()
    input_ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False, depth=None)
    with sdpa_kernel(SDPBackend.MATH), counter:
        model(input_ids, labels=input_ids).loss.backward()
    return counter


FLOP_CASES = {
    "untied_gqa_64": (dict(), 64),
    "tied_mha_128": (dict(tie_word_embeddings=True, num_key_value_heads=4, max_position_embeddings=128), 128),
    "untied_mha_layer_scale_parallel_96": (dict(num_key_value_heads=4, layer_scale_init=1e-4,
                                                parallel_residual=True, max_position_embeddings=128), 96),
    "tied_gqa_wide_heads_128": (dict(tie_word_embeddings=True, head_dim=32, max_position_embeddings=128), 128),
}


@pytest.mark.parametrize("overrides, seq_len", FLOP_CASES.values(), ids=FLOP_CASES.keys())
def test_training_flops_match_flop_counter_mode(overrides, seq_len):
    model = build(**overrides)
    config = model.config
    flops = flops_per_token(config, seq_len)
    assert set(flops) == {"attention", "mlp", "lm_head"}
    assert all(value > 0 for value in flops.values())

    counter = counted_training_step(model, seq_len)
    counted = counter.get_total_flops()
    assert counted > 0
    assert sum(flops.values()) * seq_len == pytest.approx(counted, rel=0.05)

    # Split by kind of op: the linear layers are plain mm's, the attention matrices are the batched products.
    by_op = {str(op): value for op, value in counter.get_flop_counts()["Global"].items()}
    linear = sum(value for op, value in by_op.items() if op in ("aten.mm", "aten.addmm"))
    attention_matrices = counted - linear
    scores_and_values = 3 * config.num_hidden_layers * 2 * 2 * seq_len * config.num_attention_heads * config.head_dim
    assert attention_matrices == pytest.approx(scores_and_values * seq_len, rel=0.05)
    assert linear == pytest.approx((sum(flops.values()) - scores_and_values) * seq_len, rel=0.05)


@pytest.mark.parametrize("overrides, seq_len", list(FLOP_CASES.values())[:2], ids=list(FLOP_CASES)[:2])
def test_each_flop_component_matches_its_modules(overrides, seq_len):
    """Per component: 3 x the forward FLOPs the counter attributes to the modules of that component. (Forward only:
    FlopCounterMode attributes backward ops to whichever module hook fired last, which is not reliable per module.)"""
    model = build(**overrides).train()
    input_ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(1))
    counter = FlopCounterMode(display=False, depth=None)
    with sdpa_kernel(SDPBackend.MATH), counter:
        model(input_ids)
    counts = counter.get_flop_counts()

    def forward_of(suffix: str) -> int:
        return sum(sum(ops.values()) for module, ops in counts.items() if module.endswith(suffix))

    flops = flops_per_token(model.config, seq_len)
    assert 3 * forward_of(".self_attn") == pytest.approx(flops["attention"] * seq_len, rel=0.05)
    assert 3 * forward_of(".mlp") == pytest.approx(flops["mlp"] * seq_len, rel=0.05)
    assert 3 * forward_of("ByteModel.lm_head") == pytest.approx(flops["lm_head"] * seq_len, rel=0.05)
    # The components cover the whole forward: nothing outside attention, MLP and LM head does FLOPs here.
    assert 3 * counter.get_total_flops() == pytest.approx(sum(flops.values()) * seq_len, rel=0.05)


MOE_CASES = {
    "every_layer_shared": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, num_shared_experts=1),
    "every_other_layer_top1": dict(num_experts=8, num_experts_per_tok=1, moe_intermediate_size=32,
                                   decoder_sparse_step=2, num_hidden_layers=4),
}


@pytest.mark.slow
@pytest.mark.parametrize("overrides", MOE_CASES.values(), ids=MOE_CASES.keys())
def test_moe_counts_active_parameters_and_flops_like_the_counter(overrides, monkeypatch):
    model = build(**overrides)
    config = model.config
    counts = parameter_counts(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    expert = 3 * config.hidden_size * config.moe_intermediate_size
    moe = sum(config.is_moe_layer(index) for index in range(config.num_hidden_layers))
    assert counts["active_per_token"] == counts["total"] - moe * (config.num_experts - config.num_experts_per_tok) * expert
    # FlopCounterMode has no formula for grouped matmuls: count the per-expert fallback, which does the same mm's.
    monkeypatch.setattr("model.moe.GROUPED_MM", None)
    seq_len = 48
    counted = counted_training_step(model, seq_len).get_total_flops()
    assert sum(flops_per_token(config, seq_len).values()) * seq_len == pytest.approx(counted, rel=0.02)


def test_flops_grow_as_expected_with_sequence_length():
    config = tiny_config()
    short, long = flops_per_token(config, 64), flops_per_token(config, 128)
    # Only the attention matrices depend on the sequence length, linearly per token.
    assert long["mlp"] == short["mlp"] and long["lm_head"] == short["lm_head"]
    per_token_per_position = 3 * config.num_hidden_layers * 2 * 2 * config.num_attention_heads * config.head_dim
    assert long["attention"] - short["attention"] == 64 * per_token_per_position


@pytest.mark.parametrize("overrides", [{}, {"num_experts": 4, "num_experts_per_tok": 2}], ids=["llama", "mixtral"])
def test_flops_of_a_transformers_config_equal_the_byte_models(overrides):
    config = tiny_config(**overrides)
    foreign = config.to_mixtral_config() if overrides else llama_config_from(config)
    assert flops_per_token(ByteModelConfig.from_llama_family(foreign), 64) == flops_per_token(config, 64)
    with pytest.raises(ValueError, match="'gpt2' model"):
        from transformers import GPT2Config

        ByteModelConfig.from_llama_family(GPT2Config())


def test_measured_matmul_peak_is_a_plausible_rate():
    peak = measure_peak_flops(torch.device("cpu"), torch.float32, size=128, repeats=2)
    assert math.isfinite(peak) and 1e6 < peak < 1e15
