"""The training loader's batches depend on (seed, epoch) only: a resumed run's fresh loader,
started at epoch e, yields what the uninterrupted run's loader yields in epoch e, whatever the
worker count, persistent workers included."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from structkd.engine.training.data_order import make_loader


class RandomAugmented(Dataset):
    """Each item draws its 'augmentation' from the global torch RNG, as transforms v2 do."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int):
        return torch.rand(3), {"index": i}


def _epoch(loader, epoch: int) -> list[tuple[list[int], torch.Tensor]]:
    loader.sampler.set_epoch(epoch)
    return [([t["index"] for t in targets], torch.stack(images)) for images, targets in loader]


@pytest.mark.parametrize(("workers", "persistent"), [(0, False), (2, False), (2, True)])
def test_resumed_loader_repeats_the_uninterrupted_epoch(workers: int, persistent: bool) -> None:
    kw = {"batch_size": 3, "num_workers": workers, "shuffle": True, "seed": 7,
          "persistent_workers": persistent}
    loader = make_loader(RandomAugmented(), **kw)
    epochs = [_epoch(loader, e) for e in range(3)]
    resumed = make_loader(RandomAugmented(), **kw, epoch=2)
    again = _epoch(resumed, 2)
    assert [idx for idx, _ in again] == [idx for idx, _ in epochs[2]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(again, epochs[2], strict=True))
    # and the epochs differ from each other (order and augmentation), so the check can fail
    assert [idx for idx, _ in epochs[1]] != [idx for idx, _ in epochs[2]]
    assert not torch.equal(epochs[1][0][1], epochs[2][0][1])


@pytest.mark.parametrize(("n", "replicas", "shuffle"), [(10, 1, True), (10, 3, True),
                                                        (7, 2, False), (2, 4, True)])
def test_order_is_the_seeded_permutation_shared_by_rank(n: int, replicas: int,
                                                        shuffle: bool) -> None:
    """The order, written from its definition: a permutation seeded by seed + epoch (torch's
    randperm), padded by repetition to a multiple of the replicas, rank r takes every
    replicas-th index from r (what the sampler did before it became a DistributedSampler)."""
    from torch.utils.data import DistributedSampler

    from structkd.engine.training.data_order import EpochSampler, EpochSeeded

    seed, epoch = 3, 5
    data = EpochSeeded(list(range(n)), seed)
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n, generator=g).tolist() if shuffle else list(range(n))
    total = -(-n // replicas) * replicas
    while len(order) < total:
        order += order[: total - len(order)]
    for rank in range(replicas):
        sampler = EpochSampler(data, seed=seed, shuffle=shuffle, num_replicas=replicas,
                               rank=rank)
        sampler.set_epoch(epoch)
        assert isinstance(sampler, DistributedSampler)  # Lightning keeps it under DDP
        assert list(sampler) == [(epoch, i) for i in order[rank:total:replicas]]
        assert len(sampler) == total // replicas
