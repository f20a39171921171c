"""Expert parallelism, applied from outside the model: each process holds `num_experts / ep` experts of every MoE
layer, and the token-slots routed to an expert travel to the process that holds it and back by all-to-all.

The processes form a mesh (world / ep, ep), ep innermost: the ep processes of a row exchange tokens and hold one
copy of all experts between them; the processes of a column hold the same experts (the expert-data-parallel
group). The router, its balancing bias and the shared experts stay replicated like every other weight.
Checkpoints keep one format: `global_state` gathers the slices into Mixtral's global expert tensors before a save,
`local_state` cuts them out again after a load, so any ep (or one process) reads what another wrote.
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from model import moe_layers
from model.moe import ByteExperts
from utils.distributed import DistributedContext, fsdp_policy, wrap_model
from utils.errors import InputError

EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


def check_expert_parallel(size: int, world_size: int, num_experts: int | None) -> None:
    """Refuse, in one line, an expert-parallel size this run cannot use (`num_experts` None: not known yet)."""
    if size < 1:
        raise InputError(f"train.expert_parallel_size must be >= 1, got {size}")
    if size == 1:
        return
    if world_size % size:
        raise InputError(f"train.expert_parallel_size={size} does not divide the {world_size} process(es) "
                         f"(torchrun --nproc_per_node)")
    if num_experts is None:
        return
    if num_experts == 0:
        raise InputError(f"train.expert_parallel_size={size} needs a mixture-of-experts model (model.num_experts > 0)")
    if num_experts % size:
        raise InputError(f"train.expert_parallel_size={size} does not divide model.num_experts={num_experts}")


def order_by_local_expert(received: torch.Tensor) -> torch.Tensor:
    """Rows arrive grouped by sending process, each group sorted by local expert (`received`: processes x local
    experts, the row counts); the index that sorts them by local expert, keeping the processes' order inside."""
    processes, local_experts = received.shape
    experts = torch.arange(local_experts, device=received.device).repeat(processes)
    return torch.sort(experts.repeat_interleave(received.reshape(-1)), stable=True).indices


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


class ExpertParallelExperts(ByteExperts):
    """One process's slice of a layer's experts. Routing, sorting, capacity and the weighted combination stay
    ByteExperts' own (over all `num_experts`); only the sorted rows travel."""

    def __init__(self, experts: ByteExperts, group: dist.ProcessGroup, index: int, size: int):
        nn.Module.__init__(self)
        self.num_experts, self.num_local_experts = experts.num_experts, experts.num_experts // size
        self.first_expert = index * self.num_local_experts
        self.group, self.index, self.size = group, index, size
        for name in EXPERT_WEIGHTS:
            weight = getattr(experts, name).detach()[self.first_expert:self.first_expert + self.num_local_experts]
            setattr(self, name, nn.Parameter(weight.clone()))
        self.tokens_sent = self.tokens_received = 0  # token-slots to and from the other processes, while training

    def run_experts(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # x is sorted by global expert, and the experts of a process are consecutive: the rows for each process
        # are already one block. The counts travel first, since the receivers need them to size the exchange.
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=self.group)
        received = received.view(self.size, self.num_local_experts)
        send_splits = counts.view(self.size, -1).sum(dim=1).tolist()
        receive_splits = received.sum(dim=1).tolist()
        if self.training:
            self.tokens_sent += sum(send_splits) - send_splits[self.index]
            self.tokens_received += sum(receive_splits) - receive_splits[self.index]
        rows = all_to_all_single_autograd(x, receive_splits, send_splits, self.group)
        order = order_by_local_expert(received)
        out = super().run_experts(rows[order], received.sum(dim=0))
        return all_to_all_single_autograd(out[inverse_permutation(order)], send_splits, receive_splits, self.group)

    def extra_repr(self) -> str:
        return (f"experts {self.first_expert}-{self.first_expert + self.num_local_experts - 1} of "
                f"{self.num_experts}")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of what this process's slice holds (a DTensor sharded by FSDP2 over the expert-data group)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


class ExpertParallel:
    """The mesh, and what the trainer and the checkpoint manager need of it. Build it, `shard` the model (before
    wrapping, before the optimizer), then `wrap` it."""

    def __init__(self, size: int, context: DistributedContext):
        self.size, self.context, self.strategy = size, context, "ddp"
        self.mesh = init_device_mesh(context.device.type, (context.world_size // size, size),
                                     mesh_dim_names=("expert_data", "expert"))
        self.group, self.data_group = self.mesh.get_group("expert"), self.mesh.get_group("expert_data")
        self.index = self.mesh.get_local_rank("expert")
        self.experts: dict[str, ExpertParallelExperts] = {}  # by qualified name in the unwrapped model

    def shard(self, model: nn.Module) -> nn.Module:
        """Replace every MoE layer's experts with this process's slice of them (the model keeps its names)."""
        layers = moe_layers(model)
        num_experts = layers[0].num_experts if layers else 0
        check_expert_parallel(self.size, self.context.world_size, num_experts)
        names = {layer: name for name, layer in model.named_modules()}
        for layer in layers:
            layer.experts = ExpertParallelExperts(layer.experts, self.group, self.index, self.size)
            self.experts[f"{names[layer]}.experts".lstrip(".")] = layer.experts
        return model

    def parameters(self) -> list[nn.Parameter]:
        return [getattr(module, name) for module in self.experts.values() for name in EXPERT_WEIGHTS]

    def wrap(self, model: nn.Module, strategy: str, param_dtype: torch.dtype | None = None) -> nn.Module:
        """`wrap_model`, with the experts kept out of the data-parallel reduction over all processes: DDP ignores
        them (`reduce_gradients` reduces them), FSDP2 shards each layer's experts over their expert-data group."""
        self.strategy = strategy
        if strategy == "ddp":
            names = [f"{module}.{name}" for module in self.experts for name in EXPERT_WEIGHTS]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
        else:
            for module in self.experts.values():
                fully_shard(module, mesh=self.mesh["expert_data"], mp_policy=fsdp_policy(param_dtype))
                # Every process's loss is scaled for an average over all of them, and an expert's gradient already
                # holds the tokens of its whole expert-parallel row: dividing by the group alone would leave it ep
                # times too large. A custom divisor needs sum reduction on gloo (no pre-multiplied sum).
                module.set_gradient_divide_factor(self.context.world_size)
                module.set_force_sum_reduction_for_comms(True)
        return wrap_model(model, strategy, self.context, param_dtype)

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Under DDP, after the step's last backward: sum the expert gradients over the processes holding the same
        experts, divided by all processes (see `wrap`). FSDP2 has done so already."""
        grads = [parameter.grad for parameter in self.parameters() if parameter.grad is not None]
        if self.strategy != "ddp" or not grads:
            return
        flat = torch.cat([grad.reshape(-1) for grad in grads])
        dist.all_reduce(flat, group=self.data_group)
        flat /= self.context.world_size
        torch._foreach_copy_(grads, [part.view_as(grad) for part, grad in zip(flat.split([g.numel() for g in grads]),
                                                                                grads)])

    @torch.no_grad()
    def clip_gradients(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """`clip_grad_norm_` over the whole model: the replicated weights once, every expert once (each process
        contributes its slice)."""
        experts = [parameter for parameter in self.parameters() if parameter.grad is not None]
        ids = {id(parameter) for parameter in self.parameters()}
        others = [parameter for parameter in model.parameters()
                  if parameter.grad is not None and id(parameter) not in ids]
        expert_square = _local(torch.nn.utils.get_total_norm([p.grad for p in experts])).square()
        dist.all_reduce(expert_square, group=self.group)
        total = (_local(torch.nn.utils.get_total_norm([p.grad for p in others])).square() + expert_square).sqrt()
        for parameters in (others, experts):  # one call per mesh: FSDP2's DTensors of two meshes do not mix
            torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
        return total

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        local = _local(tensor).detach().contiguous()
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts).cpu()

    def global_state(self, model_state: dict, optimizer_state: dict | None = None,
                     optimizer: torch.optim.Optimizer | None = None) -> None:
        """Collective. Put the global expert tensors (and their optimizer moments) into full state dicts, on the
        main process: the others' full state dicts may be empty (cpu_offload), so the slices come from the
        model and optimizer themselves."""
        for module_name, module in self.experts.items():
            for name in EXPERT_WEIGHTS:
                parameter, key = getattr(module, name), f"{module_name}.{name}"
                gathered = self.gather(parameter)
                if self.context.is_main:
                    model_state[key] = gathered
                if optimizer is None:
                    continue
                for state_name, value in optimizer.state.get(parameter, {}).items():
                    if torch.is_tensor(value) and value.ndim > 0:
                        gathered = self.gather(value)
                        if self.context.is_main:
                            optimizer_state["state"][key][state_name] = gathered

    def local_state(self, model_state: dict, optimizer_state: dict | None = None) -> None:
        """Cut this process's experts out of full state dicts holding the global tensors."""
        experts = slice(self.index * self.local_experts, (self.index + 1) * self.local_experts)
        for module_name in self.experts:
            for name in EXPERT_WEIGHTS:
                key = f"{module_name}.{name}"
                model_state[key] = model_state[key][experts]
                for state_name, value in (optimizer_state or {}).get("state", {}).get(key, {}).items():
                    if torch.is_tensor(value) and value.ndim > 0:
                        optimizer_state["state"][key][state_name] = value[experts]

    @property
    def local_experts(self) -> int:
        return next(iter(self.experts.values())).num_local_experts

    def metrics(self) -> dict:
        """Collective. Token-slots each process sent to and received from the others since the last call."""
        exchanged = torch.zeros(self.context.world_size, 2, device=self.context.device)
        exchanged[self.context.rank] = torch.tensor([sum(m.tokens_sent for m in self.experts.values()),
                                                     sum(m.tokens_received for m in self.experts.values())])
        dist.all_reduce(exchanged)
        for module in self.experts.values():
            module.tokens_sent = module.tokens_received = 0
        sent, received = exchanged.long().T.tolist()
        return {"expert_tokens_sent": sent, "expert_tokens_received": received}

    def describe(self) -> str:
        """The start-up log's line: the mesh, the experts each process holds, their parameters and memory."""
        module = next(iter(self.experts.values()))
        weights = sum(_local_numel(parameter) for parameter in self.parameters())
        element = self.parameters()[0].element_size()
        whole = weights * self.size * (self.mesh.size(0) if self.strategy == "fsdp" else 1)
        return (f"expert parallelism {self.size} (mesh {self.mesh.size(0)} x {self.size}, expert-data x expert): "
                f"{module.num_local_experts} of {module.num_experts} experts per MoE layer on each process; "
                f"{weights / 1e6:.2f}M expert parameters per process of {whole / 1e6:.2f}M "
                f"({weights * element / 2**20:.1f} MiB of weights, {4 * weights * element / 2**20:.1f} MiB with "
                f"gradients and AdamW moments)")


def _local_numel(parameter: torch.Tensor) -> int:
    return parameter.to_local().numel() if isinstance(parameter, DTensor) else parameter.numel()
