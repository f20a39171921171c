"""What a model costs: parameters (total, trainable, embedding, by component and per layer, active per token),
training FLOPs per token by component, and the matrix-multiply speed a device reaches. The trainer (MFU), the
model report and the benchmarks all count with these."""

import time

import torch
from torch import nn

from model import ByteModelConfig, moe_layers

COMPONENTS = ("embeddings", "attention", "mlp", "norms", "lm_head")


def component_of(name: str) -> str:
    if "embed_tokens" in name:
        return "embeddings"
    if name.startswith("lm_head"):
        return "lm_head"
    if ".self_attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    return "norms"  # input/post-attention/final norms; LayerScale gammas are counted with them


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[1] == "layers" else None


def parameter_counts(model: nn.Module) -> dict:
    """Every parameter counted once (tied embeddings share one tensor), by component and per decoder layer."""
    by_component = dict.fromkeys(COMPONENTS, 0)
    per_layer: dict[int, dict[str, int]] = {}
    total = trainable = 0
    for name, parameter in model.named_parameters():  # named_parameters yields a shared tensor only once
        count = parameter.numel()
        total += count
        trainable += count if parameter.requires_grad else 0
        component = component_of(name)
        by_component[component] += count
        layer = layer_of(name)
        if layer is not None:
            per_layer.setdefault(layer, dict.fromkeys(("attention", "mlp", "norms"), 0))[component] += count
    embedding = by_component["embeddings"]
    counts = {"total": total, "trainable": trainable, "embedding": embedding, "non_embedding": total - embedding,
              "by_component": by_component, "per_layer": [per_layer[index] for index in sorted(per_layer)]}
    layers = moe_layers(model)
    if layers:
        # A token runs through k of the routed experts: the other experts' weights are idle for it.
        idle = sum((layer.num_experts - layer.top_k) * (layer.experts.gate_up_proj[0].numel()
                                                        + layer.experts.down_proj[0].numel()) for layer in layers)
        counts["active_per_token"] = total - idle
    return counts


def flops_per_token(config: ByteModelConfig, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token (forward + backward = 3 x forward), by component, counting a multiply-add as 2.

    Attention scores and values are counted over the full seq_len x seq_len square, as FlopCounterMode counts
    SDPA's math backend (it does not see the CPU flash kernel at all); a causal kernel skips about half of it."""
    hidden, heads, kv_heads, head_dim = (config.hidden_size, config.num_attention_heads,
                                         config.num_key_value_heads, config.head_dim)
    layers = config.num_hidden_layers
    projections = 2 * hidden * head_dim * (2 * heads + 2 * kv_heads)  # q and o: heads; k and v: kv heads
    scores_and_values = 2 * 2 * seq_len * heads * head_dim
    moe = sum(config.is_moe_layer(index) for index in range(layers))
    # An MoE layer: the router, then k routed experts and the shared ones, each a SwiGLU of moe_intermediate_size.
    experts_per_token = config.num_experts_per_tok + config.num_shared_experts
    moe_mlp = 2 * hidden * config.num_experts + 2 * 3 * hidden * config.moe_intermediate_size * experts_per_token
    mlp = (layers - moe) * 2 * 3 * hidden * config.intermediate_size + moe * moe_mlp
    forward = {"attention": layers * (projections + scores_and_values), "mlp": mlp,
               "lm_head": 2 * hidden * config.vocab_size}
    return {name: 3.0 * value for name, value in forward.items()}


def measure_peak_flops(device: torch.device, dtype: torch.dtype, size: int = 1024, repeats: int = 8) -> float:
    """Matrix-multiply FLOP/s this device reaches right now: the honest denominator of MFU on a machine whose
    datasheet peak is unknown (a laptop CPU) or shared."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size ** 3 * repeats / (time.perf_counter() - start)
