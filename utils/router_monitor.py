"""What the routers of a mixture-of-experts model do while it trains: expert load, dropped token-slots and the
balancing losses, summed over micro-batches and processes; and the auxiliary-loss-free bias update."""

import torch
from torch import nn

from model import moe_layers, update_expert_bias
from utils.distributed import DistributedContext, all_reduce_sum


def load_statistics(routed: torch.Tensor, dropped: torch.Tensor) -> dict:
    """Per MoE layer, from token-slot counts `routed` (layers x experts) and `dropped` (layers): each expert's share
    of the slots (`expert_load`), the busiest share times the number of experts (`max_load`, 1.0 = balanced) and
    the share of slots the capacity limit dropped (`dropped_frac`)."""
    slots = routed.sum(dim=1).clamp(min=1)
    load = routed / slots[:, None]
    return {"expert_load": load, "max_load": load.max(dim=1).values * load.shape[1], "dropped_frac": dropped / slots}


class RouterMonitor:
    """Does nothing for a dense model. Per MoE layer it keeps one row of counts, token-slots routed to each expert
    and then the slots dropped, so that a step needs a single all-reduce."""

    def __init__(self, model: nn.Module, context: DistributedContext):
        self.layers = moe_layers(model)
        self.context = context
        self.rate = getattr(model.config, "router_bias_update_rate", 0.0) if self.layers else 0.0
        if self.layers:
            self.step_counts = torch.zeros(len(self.layers), self.layers[0].num_experts + 1, device=context.device)
            self.window_counts = torch.zeros_like(self.step_counts)
            self.window_losses = torch.zeros(3, device=context.device)  # aux, z, micro-batches

    def after_forward(self, outputs) -> None:
        if not self.layers:
            return
        self.step_counts += torch.stack([torch.cat([layer.router_stats.expert_counts, layer.router_stats.dropped[None]])
                                         for layer in self.layers])
        self.window_losses += torch.stack([outputs.aux_loss.detach().float(), outputs.z_loss.detach().float(),
                                           torch.ones((), device=self.context.device)])

    def after_step(self, model: nn.Module, applied: bool) -> None:
        """After every optimizer step (`applied`: the step changed the weights)."""
        if not self.layers:
            return
        counts = all_reduce_sum(self.step_counts, self.context)
        if self.rate > 0 and applied:
            update_expert_bias(model, counts[:, :-1], self.rate)
        self.window_counts += counts
        self.step_counts.zero_()

    def metrics(self) -> dict:
        """Means over the logging window, overall (`max_load`, `dropped_frac`) and per layer (`expert_load`)."""
        if not self.layers:
            return {}
        aux, z, micro_batches = all_reduce_sum(self.window_losses, self.context).tolist()
        routed, dropped = self.window_counts[:, :-1], self.window_counts[:, -1]
        load = load_statistics(routed, dropped)["expert_load"]
        row = {"aux_loss": aux / max(micro_batches, 1), "z_loss": z / max(micro_batches, 1),
               "dropped_frac": (dropped.sum() / routed.sum(dim=1).clamp(min=1).sum()).item(),
               "max_load": (load.max() * load.shape[1]).item(),
               "expert_load": [[round(value, 4) for value in layer] for layer in load.tolist()]}
        self.window_counts.zero_()
        self.window_losses.zero_()
        return row
