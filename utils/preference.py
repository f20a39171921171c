"""The preference stage's objective: DPO (Rafailov et al. 2023), conservative DPO (label smoothing), IPO (Azar et al.
2023) and an optional NLL term on the chosen reply (RPO), measured against a frozen reference model.

A batch holds B pairs as 2B rows (chosen rows, then rejected rows; see `utils.data.PairCollator`). The reference is
the starting model loaded again and frozen, or, with LoRA, the policy itself with its adapters switched off (no
second copy); with `rlhf.precompute_reference` its log-probabilities are computed once for every pair before
training, stored with the run, and the reference model is released.
"""

import io
import json
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from utils.batches import make_loader, model_inputs
from utils.checkpoint import load_starting_model
from utils.config import RlhfSection
from utils.distributed import main_first
from utils.errors import InputError
from utils.files import write_atomically
from utils.precision import autocast

# What `PreferenceLoss` reports per pair (summed over the batch; the engine averages over pairs).
PREFERENCE_METRICS = ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy", "logps_chosen",
                      "logps_rejected")


def reply_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probabilities of the labelled tokens (labels aligned with the inputs, -100 ignored)
    and their count. Always in fp32, outside autocast: a bf16 log-softmax is how DPO losses end up stuck at ln 2 or
    NaN."""
    with torch.autocast(logits.device.type, enabled=False):
        targets = labels[:, 1:]
        token_logps = -F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                                       reduction="none").view_as(targets)
        return token_logps.sum(-1), (targets != -100).sum(-1)


def pair_losses(method: str, beta: float, label_smoothing: float, logps: torch.Tensor, reference: torch.Tensor,
                counts: torch.Tensor) -> torch.Tensor:
    """The loss of each pair. `logps`, `reference` and `counts` are [pairs, 2] (chosen, rejected): the policy's and
    the reference's summed reply log-probabilities and the reply lengths. IPO compares per-token averages, as TRL
    does after checking with the paper's authors; DPO compares sums."""
    ratios = logps - reference
    if method == "ipo":
        delta = ratios[:, 0] / counts[:, 0].clamp(min=1) - ratios[:, 1] / counts[:, 1].clamp(min=1)
        return (delta - 1 / (2 * beta)) ** 2
    delta = beta * (ratios[:, 0] - ratios[:, 1])
    return -(1 - label_smoothing) * F.logsigmoid(delta) - label_smoothing * F.logsigmoid(-delta)


def pairs_in(batch: dict[str, torch.Tensor]) -> int:
    """The targets of a preference batch: its pairs."""
    return batch["input_ids"].shape[0] // 2


def as_pairs(values: torch.Tensor) -> torch.Tensor:
    """[2B] (chosen rows, then rejected rows) -> [B, 2]."""
    return torch.stack(values.chunk(2), dim=1)


class Reference:
    """Reference log-probabilities from a frozen model, or from the policy with its LoRA adapters disabled."""

    def __init__(self, model: nn.Module, adapters_off: bool = False):
        self.model, self.adapters_off = model, adapters_off

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        training = self.model.training
        self.model.eval()  # no dropout in the reference, whatever mode the policy is in
        try:
            with self.model.disable_adapter() if self.adapters_off else nullcontext():
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    use_cache=False).logits
        finally:
            self.model.train(training)
        return as_pairs(reply_logps(logits, batch["labels"])[0])


@dataclass
class PreferenceOutput:
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    aux_loss: torch.Tensor | None = None  # an MoE policy's balancing terms, for the router monitor
    z_loss: torch.Tensor | None = None


class PreferenceLoss:
    """`loss(model, batch, num_items_in_batch)` for the engine: one forward over the 2B rows, the pair losses summed
    and divided by the pairs of the whole step (`num_items_in_batch`), so the loss is the same however the pairs
    fall into micro-batches; without it (evaluation) the mean over the batch's pairs."""

    def __init__(self, section: RlhfSection, reference: Callable[[dict], torch.Tensor] | None, model_config):
        self.section, self.reference = section, reference
        self.router_weights = (getattr(model_config, "router_aux_loss_coef", 0.0) or 0.0,
                               getattr(model_config, "router_z_loss_coef", 0.0) or 0.0)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor],
                 num_items_in_batch: float | None) -> PreferenceOutput:
        section, pairs = self.section, pairs_in(batch)
        # The reference first: with adapters off it runs the policy's own layers, whose router statistics must
        # come from the policy's forward.
        reference = batch["reference_logps"] if "reference_logps" in batch else self.reference(batch)
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        logps, counts = (as_pairs(values) for values in reply_logps(outputs.logits, batch["labels"]))
        reference = reference.float()
        losses = pair_losses(section.method, section.beta, section.label_smoothing, logps, reference, counts)
        if section.sft_weight:
            losses = losses - section.sft_weight * logps[:, 0] / counts[:, 0].clamp(min=1)
        total = num_items_in_batch if num_items_in_batch is not None else pairs
        loss = losses.sum() / total
        aux_loss, z_loss = getattr(outputs, "aux_loss", None), getattr(outputs, "z_loss", None)
        if aux_loss is not None and z_loss is not None and model.training:
            # Weighted by this micro-batch's share of the step's pairs, as the pair losses are.
            loss = loss + pairs / total * (self.router_weights[0] * aux_loss + self.router_weights[1] * z_loss)
        with torch.no_grad():
            rewards = section.beta * (logps - reference)
            margin = rewards[:, 0] - rewards[:, 1]
            # A tie (the policy still equals the reference) is a coin flip, so accuracy starts at 0.5.
            accuracy = (margin > 0).float() + 0.5 * (margin == 0).float()
            metrics = dict(zip(PREFERENCE_METRICS, (rewards[:, 0].sum(), rewards[:, 1].sum(), margin.sum(),
                                                    accuracy.sum(), logps[:, 0].sum(), logps[:, 1].sum())))
        return PreferenceOutput(loss, metrics, aux_loss, z_loss)


def attach_reference_logps(make_reference: Callable[[], Callable[[dict], torch.Tensor]], datasets: list, collate,
                           trainer, source: str) -> None:
    """Give each dataset its reference log-probabilities ([pairs, 2]): read from the run's reference_logps.pt when
    it was computed for the same pairs, reference and precision, else computed now and written there. The
    reference model is built (`make_reference()`) only in the second case."""
    path = Path(trainer.out_dir) / "reference_logps.pt"
    key = json.dumps({"reference": str(Path(source).resolve()), "precision": str(trainer.dtype),
                      "pairs": [dataset.fingerprint() for dataset in datasets]})
    if path.is_file():
        try:
            saved = torch.load(path, weights_only=True)
        except Exception:  # unreadable: computed again and replaced
            saved = {}
        if saved.get("key") == key:
            for dataset, table in zip(datasets, saved["tables"]):
                dataset.reference_logps = table
            trainer.log.info(f"reference log-probabilities read from {path}")
            return
    device, reference = trainer.context.device, make_reference()
    for dataset in datasets:
        tables = []
        for batch in make_loader(dataset, trainer.config.train.micro_batch_size, collate, 0, 0, device):
            with autocast(device, trainer.dtype):
                tables.append(reference(model_inputs(batch, device)).float().cpu())
        dataset.reference_logps = torch.cat(tables)
    buffer = io.BytesIO()
    torch.save({"key": key, "tables": [dataset.reference_logps for dataset in datasets]}, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, buffer.getvalue())
    trainer.log.info(f"reference log-probabilities of {sum(map(len, datasets))} pairs computed once, in {path}")


def reference_model(trainer) -> tuple[nn.Module, bool]:
    """(the reference model, whether it is the policy with its adapters off): `rlhf.reference_from` or the starting
    model loaded again, or, with LoRA and no reference_from, the policy itself (no second copy)."""
    config, section = trainer.config, trainer.config.rlhf
    if section.reference_from is None and config.lora.enabled:
        return trainer.model, True
    reference = load_starting_model(section.reference_from or config.model.init_from,
                                    config.model.attn_implementation).to(trainer.context.device)
    return reference.eval().requires_grad_(False), False


def preference_objective(trainer) -> PreferenceLoss:
    """The loss for a `Trainer` whose model is built: the reference it needs, computed ahead when asked."""
    config, section = trainer.config, trainer.config.rlhf
    source = section.reference_from or config.model.init_from

    def make_reference() -> Reference:
        return Reference(*reference_model(trainer))

    if not section.precompute_reference:
        return PreferenceLoss(section, make_reference(), trainer.model.config)
    datasets = [dataset for dataset in (trainer.train_dataset, trainer.val_dataset) if dataset is not None]
    # Ranks that find the stored values (all but rank 0, and a resumed run) never load a reference model.
    main_first(lambda: attach_reference_logps(make_reference, datasets, trainer.collate, trainer, source),
               trainer.context, (InputError,))
    return PreferenceLoss(section, None, trainer.model.config)  # training holds one model
