"""Training micro-batches as an endless stream over epochs, with a position that checkpoints save and restore."""

import math
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from utils.data import ResumableSampler
from utils.distributed import DistributedContext, all_gather_objects
from utils.errors import InputError


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch on `device`. Packed windows carry `shift_labels` only; transformers' models (Llama, Mixtral) compute
    a loss only when `labels` is given and then prefer `shift_labels`, as their Trainer passes both, so `labels`
    names the same tensor (ByteModel reads `shift_labels` alone). Values that are not tensors (a prompt batch's raw
    prompts and columns) pass as they are."""
    batch = {key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
             for key, value in batch.items()}
    if "shift_labels" in batch:
        batch.setdefault("labels", batch["shift_labels"])
    return batch


def make_loader(dataset: Dataset, batch_size: int, collate, num_workers: int, seed: int, device: torch.device,
                sampler=None) -> DataLoader:
    # An own generator: creating a loader must not draw from the global RNG, or a resumed run (which creates
    # its loader at another moment) would see different dropout masks than an uninterrupted one.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=num_workers,
                      drop_last=sampler is not None, pin_memory=device.type == "cuda",
                      generator=torch.Generator().manual_seed(seed))


def evaluation_batches(dataset: Dataset, collate, max_batches: int, batch_size: int, num_workers: int, seed: int,
                       context: DistributedContext) -> Iterator[dict[str, torch.Tensor]]:
    """The first `max_batches` batches of a validation split, shared by the ranks, so that an evaluation does not
    depend on the number of processes."""
    sampler = ResumableSampler(len(dataset), context.rank, context.world_size, shuffle=False)
    batches_per_rank = math.ceil(max_batches / context.world_size)
    loader = make_loader(dataset, batch_size, collate, num_workers, seed, context.device, sampler)
    for index, batch in enumerate(loader):
        if index >= batches_per_rank:
            break
        yield model_inputs(batch, context.device)


class TrainBatches:
    """Endless micro-batches of a map-style dataset (through ResumableSampler) or of a stream. The position always
    names the point right after the last batch handed out: (epoch, samples consumed), or for a stream each shard's
    (document, offset)."""

    def __init__(self, dataset: Dataset, collate, data, train, context: DistributedContext,
                 batch_size: int | None = None):
        self.dataset, self.collate, self.context = dataset, collate, context
        self.batch_size = batch_size or train.micro_batch_size
        self.num_workers, self.seed = data.num_workers, train.seed
        self.epoch = self.consumed = 0
        self.stream_positions: dict[int, tuple[int, int]] = {}
        self.sampler = None
        if not isinstance(dataset, IterableDataset):
            self.sampler = ResumableSampler(len(dataset), context.rank, context.world_size, train.seed,
                                            lengths=getattr(dataset, "lengths", None),
                                            group_size=64 * self.batch_size * context.world_size)

    def steps_per_epoch(self, grad_accum_steps: int) -> int | None:
        """None for a stream, whose length is unknown."""
        if self.sampler is None:
            return None
        steps = len(self.sampler) // (self.batch_size * grad_accum_steps)
        if steps < 1:
            raise InputError(f"the training data ({len(self.dataset)} samples) does not fill one step "
                             f"of {self.batch_size * grad_accum_steps} per rank")
        return steps

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while self.sampler is None:
            self.dataset.positions = dict(self.stream_positions)
            for batch in make_loader(self.dataset, self.batch_size, self.collate, self.num_workers, self.seed,
                                     self.context.device):
                # A batch comes from one shard (one DataLoader worker); its last row says where that shard resumes.
                shard = int(batch.pop("shard")[-1])
                self.stream_positions[shard] = (int(batch.pop("document")[-1]), int(batch.pop("offset")[-1]))
                yield model_inputs(batch, self.context.device)
            self.epoch, self.stream_positions = self.epoch + 1, {}
        while True:
            self.sampler.set_epoch(self.epoch, self.consumed)
            for batch in make_loader(self.dataset, self.batch_size, self.collate, self.num_workers, self.seed,
                                     self.context.device, self.sampler):
                self.consumed += self.batch_size
                yield model_inputs(batch, self.context.device)
            self.epoch, self.consumed = self.epoch + 1, 0

    def state_dict(self) -> dict:
        """Collective for a stream: every rank reads its own shards, so all their positions are gathered."""
        if self.sampler is None:
            positions = all_gather_objects(self.stream_positions, self.context)
            merged = {str(shard): list(value) for part in positions for shard, value in part.items()}
            num_shards = self.context.world_size * max(1, self.num_workers)
            return {"epoch": self.epoch, "num_shards": num_shards, "positions": merged}
        return {**self.sampler.state_dict(0), "epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, position: dict) -> None:
        if self.sampler is None:
            self.epoch = position["epoch"]
            self.stream_positions = {int(shard): tuple(value) for shard, value in position["positions"].items()}
        else:
            self.sampler.load_state_dict(position)
            self.epoch, self.consumed = self.sampler.epoch, self.sampler.start
