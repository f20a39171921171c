"""utils/batches.py: batches on the device with `labels`, the endless resumable training stream, evaluation batches."""

import json
import math

import pytest
import torch
from torch.utils.data import Dataset, IterableDataset

from utils.batches import TrainBatches, evaluation_batches, model_inputs
from utils.config import DataSection, TrainSection
from utils.distributed import DistributedContext
from utils.errors import InputError


class Numbered(Dataset):
    """Sample i is {"index": i}, so a batch says which samples it holds."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"index": torch.tensor(index)}


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {"index": torch.stack([sample["index"] for sample in samples])}


def train_batches(size: int = 10, batch_size: int = 4, seed: int = 7, context: DistributedContext | None = None):
    return TrainBatches(Numbered(size), collate, DataSection(num_workers=0),
                        TrainSection(micro_batch_size=batch_size, seed=seed), context or DistributedContext())


def take(batches, count: int) -> list[list[int]]:
    iterator = iter(batches)
    return [next(iterator)["index"].tolist() for _ in range(count)]


def test_model_inputs_adds_labels_naming_shift_labels():
    targets = torch.tensor([[5, 6, -100]])
    batch = model_inputs({"input_ids": torch.tensor([[1, 5, 6]]), "shift_labels": targets}, torch.device("cpu"))
    assert batch["labels"] is batch["shift_labels"]
    assert torch.equal(batch["labels"], targets)


def test_model_inputs_without_shift_labels_adds_nothing():
    batch = model_inputs({"input_ids": torch.tensor([[1, 5, 6]])}, torch.device("cpu"))
    assert set(batch) == {"input_ids"}


def test_model_inputs_keeps_existing_labels():
    labels, shift_labels = torch.tensor([[-100, 5, 6]]), torch.tensor([[5, 6, -100]])
    batch = model_inputs({"labels": labels, "shift_labels": shift_labels}, torch.device("cpu"))
    assert torch.equal(batch["labels"], labels)
    assert batch["labels"] is not batch["shift_labels"]


def test_model_inputs_moves_every_tensor_to_the_device():
    batch = model_inputs({"input_ids": torch.ones(2, 3, dtype=torch.long), "shift_labels": torch.zeros(2, 3)},
                         torch.device("meta"))
    assert {key: (value.device.type, value.dtype) for key, value in batch.items()} == {
        "input_ids": ("meta", torch.long), "shift_labels": ("meta", torch.float32), "labels": ("meta", torch.float32)}


def test_train_batches_order_depends_only_on_the_seed():
    torch.manual_seed(0)
    first = take(train_batches(seed=7), 6)
    torch.manual_seed(123)
    torch.rand(10)
    again = take(train_batches(seed=7), 6)
    other = take(train_batches(seed=8), 6)
    assert first == again
    assert first != other


def test_train_batches_epochs_are_permutations_without_repeats():
    batches = take(train_batches(size=12, batch_size=4), 6)
    first_epoch, second_epoch = sum(batches[:3], []), sum(batches[3:], [])
    assert sorted(first_epoch) == sorted(second_epoch) == list(range(12))
    assert first_epoch != second_epoch  # reshuffled every epoch
    assert all(len(batch) == 4 for batch in batches)


def test_train_batches_drop_the_incomplete_last_batch():
    # 10 samples in batches of 4: two full batches per epoch, the last two samples are left out.
    batches = take(train_batches(size=10, batch_size=4), 4)
    assert all(len(batch) == 4 for batch in batches)
    assert len(set(sum(batches[:2], []))) == 8 and len(set(sum(batches[2:], []))) == 8


@pytest.mark.parametrize("taken", range(7))
def test_train_batches_resume_continues_the_uninterrupted_stream(taken):
    # Two batches per epoch: resuming after 0..6 batches crosses epoch boundaries, also right at one.
    expected = take(train_batches(), 9)
    interrupted = train_batches()
    assert take(interrupted, taken) == expected[:taken]
    position = json.loads(json.dumps(interrupted.state_dict()))  # as a checkpoint stores it
    resumed = train_batches()
    resumed.load_state_dict(position)
    assert take(resumed, 9 - taken) == expected[taken:]


def test_train_batches_position_names_epoch_and_samples_consumed():
    batches = train_batches(size=10, batch_size=4)
    take(batches, 3)
    state = batches.state_dict()
    assert (state["epoch"], state["consumed"], state["num_samples"], state["seed"]) == (1, 4, 10, 7)


def test_train_batches_refuse_a_position_from_other_data():
    position = train_batches(size=10).state_dict()
    with pytest.raises(InputError, match="num_samples=10"):
        train_batches(size=12).load_state_dict(position)


def test_train_batches_ranks_take_disjoint_shares():
    shares = [sum(take(train_batches(size=16, batch_size=2, context=DistributedContext(rank=rank, world_size=2)), 4),
                  []) for rank in range(2)]
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == list(range(16))


def test_steps_per_epoch():
    batches = train_batches(size=10, batch_size=4)
    assert batches.steps_per_epoch(1) == 2
    assert batches.steps_per_epoch(2) == 1
    with pytest.raises(InputError, match=r"10 samples.*one step of 12"):
        batches.steps_per_epoch(3)


def test_steps_per_epoch_of_a_stream_is_unknown():
    class Stream(IterableDataset):
        def __iter__(self):
            return iter([])

    batches = TrainBatches(Stream(), collate, DataSection(), TrainSection(micro_batch_size=4), DistributedContext())
    assert batches.steps_per_epoch(1) is None


@pytest.mark.parametrize("max_batches, expected", [(3, 3), (5, 5), (100, 5)])
def test_evaluation_batches_single_process(max_batches, expected):
    batches = [batch["index"].tolist() for batch in evaluation_batches(Numbered(10), collate, max_batches, 2, 0, 0,
                                                                       DistributedContext())]
    assert len(batches) == expected
    assert sum(batches, []) == list(range(2 * expected))  # in order, not shuffled


def test_evaluation_batches_are_shared_by_the_ranks():
    max_batches, world_size = 3, 2
    per_rank = [[batch["index"].tolist() for batch in evaluation_batches(
        Numbered(20), collate, max_batches, 2, 0, 0, DistributedContext(rank=rank, world_size=world_size))]
        for rank in range(world_size)]
    assert [len(batches) for batches in per_rank] == [math.ceil(max_batches / world_size)] * world_size
    assert per_rank[0] == [[0, 2], [4, 6]] and per_rank[1] == [[1, 3], [5, 7]]
