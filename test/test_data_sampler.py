"""utils/data.py ResumableSampler: seeded shuffling, sharing over ranks, resuming mid-epoch, length grouping."""

import json

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from utils.data import ResumableSampler
from utils.errors import InputError


def test_sampler_order_depends_only_on_seed_and_epoch():
    a, b = ResumableSampler(50, seed=7), ResumableSampler(50, seed=7)
    assert list(a) == list(b) and sorted(a) == list(range(50)) and len(a) == 50
    first = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) != first
    a.set_epoch(0)
    assert list(a) == first  # going back to an epoch gives it again
    assert list(ResumableSampler(50, seed=8)) != first
    assert list(iter(a)) == list(iter(a))  # iterating twice does not advance anything


@pytest.mark.parametrize("num_samples", [30, 31, 32])
@pytest.mark.parametrize("world_size", [2, 3])
def test_sampler_ranks_share_disjointly(world_size, num_samples):
    shares = [list(ResumableSampler(num_samples, rank=rank, world_size=world_size, seed=3))
              for rank in range(world_size)]
    assert {len(share) for share in shares} == {num_samples // world_size}
    assert all(len(ResumableSampler(num_samples, rank=r, world_size=world_size)) == num_samples // world_size
               for r in range(world_size))
    union = set().union(*shares)
    assert len(union) == sum(len(share) for share in shares)  # disjoint
    assert union <= set(range(num_samples)) and num_samples - len(union) == num_samples % world_size
    assert num_samples - len(union) <= world_size - 1

    ordered = [list(ResumableSampler(num_samples, rank=rank, world_size=world_size, shuffle=False))
               for rank in range(world_size)]
    usable = num_samples // world_size * world_size
    assert ordered == [list(range(rank, usable, world_size)) for rank in range(world_size)]

    with pytest.raises(InputError, match="cannot be shared"):
        ResumableSampler(world_size - 1, world_size=world_size)


@pytest.mark.parametrize("rank,world_size", [(0, 1), (1, 2)])
def test_sampler_set_epoch_start_and_state_dict_continue_exactly(rank, world_size):
    sampler = ResumableSampler(41, rank=rank, world_size=world_size, seed=5)
    sampler.set_epoch(3)
    full = list(sampler)
    for start in (0, 1, 7, len(full) - 1, len(full)):
        sampler.set_epoch(3, start=start)
        assert list(sampler) == full[start:] and len(sampler) == len(full) - start

    sampler.set_epoch(3)
    state = sampler.state_dict(consumed=6)
    assert state == {"epoch": 3, "consumed": 6, "num_samples": 41, "world_size": world_size, "seed": 5}
    fresh = ResumableSampler(41, rank=rank, world_size=world_size, seed=5)
    fresh.load_state_dict(json.loads(json.dumps(state)))  # survives a round trip through a checkpoint file
    assert list(fresh) == full[6:]
    # Resuming a resumed sampler: `consumed` counts from the start of the epoch.
    again = ResumableSampler(41, rank=rank, world_size=world_size, seed=5)
    again.load_state_dict(fresh.state_dict(consumed=4))
    assert list(again) == full[10:]


class _Numbered(Dataset):
    def __len__(self):
        return 30

    def __getitem__(self, index):
        return {"x": torch.tensor([index, index * index]), "y": torch.tensor(float(index) / 7)}


@pytest.mark.parametrize("rank,world_size", [(0, 1), (1, 2)])
def test_dataloader_resumed_mid_epoch_yields_the_remaining_batches(rank, world_size):
    dataset = _Numbered()

    def loader(sampler):
        return DataLoader(dataset, batch_size=4, sampler=sampler)

    sampler = ResumableSampler(len(dataset), rank=rank, world_size=world_size, seed=11)
    sampler.set_epoch(2)
    uninterrupted = list(loader(sampler))
    assert len(uninterrupted) == -(-len(sampler) // 4)

    interrupted = ResumableSampler(len(dataset), rank=rank, world_size=world_size, seed=11)
    interrupted.set_epoch(2)
    taken = 0
    for batch_index, batch in enumerate(loader(interrupted)):
        assert torch.equal(batch["x"], uninterrupted[batch_index]["x"])
        taken += len(batch["x"])
        if batch_index == 1:
            break
    state = interrupted.state_dict(consumed=taken)

    resumed = ResumableSampler(len(dataset), rank=rank, world_size=world_size, seed=11)
    resumed.load_state_dict(state)
    remaining = list(loader(resumed))
    assert len(remaining) == len(uninterrupted) - 2
    for got, want in zip(remaining, uninterrupted[2:], strict=True):
        assert torch.equal(got["x"], want["x"]) and torch.equal(got["y"], want["y"])


@pytest.mark.parametrize("key,value", [("num_samples", 31), ("world_size", 2), ("seed", 1)])
def test_sampler_load_state_dict_rejects_a_different_run(key, value):
    state = ResumableSampler(30, seed=0).state_dict(consumed=3)
    state[key] = value
    sampler = ResumableSampler(30, seed=0)
    with pytest.raises(InputError, match=rf"{key}={value}"):
        sampler.load_state_dict(state)
    assert (sampler.epoch, sampler.start) == (0, 0)


@pytest.mark.parametrize("world_size", [1, 2])
def test_sampler_length_grouping(world_size):
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 500, (64,), generator=generator).tolist()
    group_size = 8
    plain = ResumableSampler(64, seed=4)  # same permutation, no grouping
    plain.set_epoch(1)
    plain_order = plain.epoch_indices()
    shares = []
    for rank in range(world_size):
        sampler = ResumableSampler(64, rank=rank, world_size=world_size, seed=4, lengths=lengths,
                                   group_size=group_size)
        twin = ResumableSampler(64, rank=rank, world_size=world_size, seed=4, lengths=lengths, group_size=group_size)
        sampler.set_epoch(1)
        twin.set_epoch(1)
        share = list(sampler)
        assert share == list(twin)  # deterministic
        per_group = group_size // world_size
        for start in range(0, len(share), per_group):
            group = share[start:start + per_group]
            assert [lengths[i] for i in group] == sorted((lengths[i] for i in group), reverse=True)
            # grouping only reorders within the group of the plain permutation
            global_group = plain_order[start * world_size:(start + per_group) * world_size]
            assert set(group) <= set(global_group)
        shares.append(share)
    assert sorted(sum(shares, [])) == list(range(64))
    # Still random across groups: another epoch gives another order.
    other = ResumableSampler(64, seed=4, lengths=lengths, group_size=group_size)
    other.set_epoch(2)
    if world_size == 1:
        assert list(other) != shares[0]

