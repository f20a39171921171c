"""Mixture of Experts: routed SwiGLU experts with top-k gating, run as grouped matrix multiplies.

Expert weights are stored as 3D tensors in transformers' Mixtral layout (`experts.gate_up_proj`: experts x 2*inner x
hidden, `experts.down_proj`: experts x hidden x inner, router `gate.weight`: experts x hidden), so a Mixtral-shaped
model exports without reshaping.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .compat import GROUPED_MM
from .config import ByteModelConfig
from .mlp import ByteMLP



def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of x sorted by expert times each expert's (out, in) matrix: rows offsets[e-1]:offsets[e] use weight[e].

    One grouped matmul kernel where PyTorch has one; otherwise one matmul per expert (a loop over experts, never over
    tokens). Grouped matmul is not covered by autocast, so the autocast dtype is applied here by hand.
    The output has x's dtype after that choice, so callers cast it where they need a particular one.
    """
    dtype = weight.dtype
    # Casting every expert's weights costs more than it saves when few rows go through them (decoding): then the
    # experts run in their stored precision, as transformers' Mixtral does.
    if torch.is_autocast_enabled(x.device.type) and x.shape[0] >= 16 * weight.shape[0]:
        dtype = torch.get_autocast_dtype(x.device.type)
    x, weight = x.to(dtype), weight.to(dtype)
    # CPU kernels need 16-byte aligned row strides; any width divisible by 8 meets that for 16- and 32-bit floats.
    aligned = x.device.type != "cpu" or (x.shape[-1] % 8 == 0 and weight.shape[1] % 8 == 0)
    # torch.compile traces grouped matmuls in bf16 only (PyTorch 2.13); compiled fp32 code takes the loop.
    supported = (torch.float32, torch.bfloat16, torch.float16) if not torch.compiler.is_compiling() else (
        torch.bfloat16,)
    if GROUPED_MM is not None and aligned and dtype in supported:
        return GROUPED_MM(x, weight.transpose(1, 2), offs=offsets.to(torch.int32))
    sizes = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()
    return torch.cat([rows @ matrix.T for rows, matrix in zip(x.split(sizes), weight)])


class ByteExperts(nn.Module):
    """`num_experts` SwiGLU MLPs with their weights stacked. Called as Mixtral's experts are (and as vLLM's
    Transformers backend calls them): each token's top-k experts and weights in, the weighted sum of those experts'
    outputs out. The (token, slot) pairs are sorted by expert and each expert's rows go through one grouped matmul.
    With `capacity`, an expert takes at most that many slots, first come first served in token order; the dropped
    slots add nothing."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                capacity: int | None = None) -> torch.Tensor:
        num_tokens, top_k = top_k_index.shape
        slot_experts = top_k_index.reshape(-1)  # slot s = token s // k, its (s % k)-th choice
        sorted_experts, slots = torch.sort(slot_experts, stable=True)
        counts = torch.bincount(slot_experts, minlength=self.num_experts)
        if capacity is not None:
            # Rank of each slot within its expert's group; a stable sort keeps token order inside the group.
            group_start = torch.cumsum(counts, 0) - counts
            rank = torch.arange(slots.shape[0], device=slots.device) - group_start[sorted_experts]
            slots = slots[rank < capacity]
            counts = counts.clamp(max=capacity)
        out = self.run_experts(hidden_states[slots // top_k], counts)
        out = out * top_k_weights.reshape(-1)[slots, None].to(out.dtype)
        # Back to (token, slot) order; dropped slots stay zero. Summing over slots is deterministic, unlike index_add_.
        combined = out.new_zeros(num_tokens * top_k, hidden_states.shape[-1]).index_copy(0, slots, out)
        return combined.view(num_tokens, top_k, -1).sum(dim=1)

    def run_experts(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows of x sorted by expert, counts[e] of them for expert e, each through its expert's SwiGLU. The seam
        where expert parallelism (utils/expert_parallel.py) sends the rows to the process that holds their expert."""
        offsets = torch.cumsum(counts, 0)
        gate, up = grouped_linear(x, self.gate_up_proj, offsets).chunk(2, dim=-1)
        return grouped_linear(F.silu(gate) * up, self.down_proj, offsets)


class ByteRouter(nn.Module):
    """Scores tokens against experts (softmax or sigmoid) and picks the top k.

    `expert_bias` is the auxiliary-loss-free balancing term (DeepSeek-V3): it is added to the scores only to choose
    the experts, never to the weights the chosen experts' outputs are mixed with, and it is updated from observed
    load by `update_expert_bias`, not by gradients.
    """

    def __init__(self, config: ByteModelConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.scoring_func = config.scoring_func
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(config.num_experts), persistent=True)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(tokens, hidden) -> router logits, scores (tokens, experts) and top-k weights and indices (tokens, k)."""
        # Routing decisions are computed in fp32 even under autocast: bf16 rounding flips close top-k choices.
        with torch.autocast(hidden_states.device.type, enabled=False):
            logits = F.linear(hidden_states.float(), self.weight.float())
        scores = logits.softmax(dim=-1) if self.scoring_func == "softmax" else logits.sigmoid()
        _, indices = torch.topk(scores.detach() + self.expert_bias, self.top_k, dim=-1)
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return logits, scores, weights, indices


@dataclass
class RouterStats:
    """What one MoE layer's last forward observed; read by the model (losses) and the trainer (load, bias). Not
    recorded in evaluation mode without gradients (generation), where nothing reads it."""

    aux_loss: torch.Tensor  # load-balancing loss, 1.0 when perfectly balanced
    z_loss: torch.Tensor  # mean squared log-partition of the router logits
    expert_counts: torch.Tensor  # (experts,) token-slots routed to each expert, before capacity dropping
    dropped: torch.Tensor  # token-slots dropped by the capacity limit


class ByteMoELayer(nn.Module):
    """Drop-in replacement for `ByteMLP`: routed SwiGLU experts plus optional shared experts that see every token.

    The router picks each token's experts and weights, `ByteExperts` runs and mixes them. With `moe_capacity_factor`
    set, an expert takes at most ceil(factor * tokens * k / experts) token-slots per forward while training, first
    come first served in token order, and the rest are dropped (the residual carries the token on).
    Evaluation and generation are always dropless, so a token's output never depends on the rest of the batch.
    """

    def __init__(self, config: ByteModelConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.capacity_factor = config.moe_capacity_factor
        self.gate = ByteRouter(config)
        self.experts = ByteExperts(config.num_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (ByteMLP(config, config.num_shared_experts * config.moe_intermediate_size)
                               if config.num_shared_experts else None)
        self.router_stats: RouterStats | None = None

    def capacity(self, num_tokens: int) -> int | None:
        if self.capacity_factor is None or not self.training:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        num_tokens = x.shape[0]
        logits, scores, weights, indices = self.gate(x)
        capacity = self.capacity(num_tokens)
        output = self.experts(x, indices, weights, capacity)
        if self.shared_experts is not None:
            output = output + self.shared_experts(x)

        self.router_stats = None
        if self.training or torch.is_grad_enabled():  # not while generating: a dozen small ops per layer and token
            counts = torch.bincount(indices.reshape(-1), minlength=self.num_experts)
            dropped = (counts - capacity).clamp(min=0).sum() if capacity is not None else counts.new_zeros(())
            self.router_stats = RouterStats(aux_loss=self.load_balancing_loss(scores, counts),
                                            z_loss=torch.logsumexp(logits, dim=-1).square().mean(),
                                            expert_counts=counts.detach(), dropped=dropped.detach())
        return output.reshape(shape).to(hidden_states.dtype)

    def load_balancing_loss(self, scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Switch Transformer's loss, experts * sum_e f_e * P_e: f_e is the share of token-slots routed to expert e,
        P_e its mean routing probability (sigmoid scores normalised per token). 1.0 when balanced; up to
        experts / k when routing has collapsed onto k experts."""
        probs = scores if self.gate.scoring_func == "softmax" else scores / (scores.sum(-1, keepdim=True) + 1e-20)
        load = counts.to(probs.dtype) / counts.sum()
        return self.num_experts * (load * probs.mean(dim=0)).sum()

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, capacity_factor={self.capacity_factor}, "
                f"scoring={self.gate.scoring_func}")


def moe_layers(model: nn.Module) -> list[ByteMoELayer]:
    """Every MoE layer of a model (wrapped or not), in layer order."""
    return [module for module in model.modules() if isinstance(module, ByteMoELayer)]


@torch.no_grad()
def update_expert_bias(model: nn.Module, expert_counts: torch.Tensor, rate: float) -> None:
    """Auxiliary-loss-free balancing (DeepSeek-V3): move each expert's routing bias by `rate` towards balance,
    down for experts that got more than the mean load, up for those that got less. `expert_counts` is
    (moe layers, experts), summed over the optimizer step (and over processes, so every replica moves alike)."""
    for layer, counts in zip(moe_layers(model), expert_counts):
        counts = counts.to(layer.gate.expert_bias.device, torch.float32)
        layer.gate.expert_bias.add_(rate * torch.sign(counts.mean() - counts))


def mixtral_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ByteModel state dict under transformers' Mixtral names: the same, less the routing biases Mixtral has no
    place for (callers make sure they are zero)."""
    return {name: tensor for name, tensor in state_dict.items() if not name.endswith("gate.expert_bias")}


def reference_moe_forward(layer: ByteMoELayer, hidden_states: torch.Tensor) -> torch.Tensor:
    """The same layer as a plain loop over experts and their tokens, written for clarity only: tests compare the
    grouped dispatch against it. Dropless (as in evaluation)."""
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    _, _, weights, indices = layer.gate(x)
    output = torch.zeros_like(x)
    for expert in range(layer.num_experts):
        token, slot = torch.where(indices == expert)
        gate, up = F.linear(x[token], layer.experts.gate_up_proj[expert]).chunk(2, dim=-1)
        out = F.linear(F.silu(gate) * up, layer.experts.down_proj[expert])
        output = output.index_add(0, token, out * weights[token, slot, None])
    if layer.shared_experts is not None:
        output = output + layer.shared_experts(x)
    return output.reshape(hidden_states.shape)
