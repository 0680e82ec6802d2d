"""Data order for training runs: deterministic per (seed, epoch), so resume is exact.

The order comes from torch's ``DistributedSampler`` (a permutation seeded by ``seed + epoch``,
padded by repetition to a multiple of the number of replicas, one share per rank), which also
tells Lightning not to replace it. :class:`EpochSampler` adds one thing: it hands each index to
the dataset together with its epoch, so each sample's augmentation RNG is seeded from
``(seed, epoch, index)`` in whichever process loads it. The batches of epoch ``e`` are thus the
same whether the run was interrupted or not, whatever the number of workers, persistent or
not. Loaders draw their worker seeds from their own generator, never from the global RNG that
the detectors' samplers use.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from ...data import collate_fn

__all__ = ["EpochSampler", "EpochSeeded", "limit", "make_loader"]


class EpochSeeded(Dataset):
    """Wraps a dataset so each item's random augmentation is seeded by (seed, epoch, index).

    Items are asked for as ``(epoch, index)`` (what :class:`EpochSampler` yields); a plain
    index uses epoch 0.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, epoch, index)) & 0x7FFF_FFFF_FFFF)
            return self.dataset[index]


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` whose indices carry their epoch when the dataset is
    :class:`EpochSeeded` (evaluation removes the images that padding repeats, by id)."""

    def __init__(self, dataset: Dataset, *, seed: int, shuffle: bool, num_replicas: int = 1,
                 rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=False)

    def __iter__(self) -> Iterator[Any]:
        indices = super().__iter__()
        if isinstance(self.dataset, EpochSeeded):  # the epoch travels with each index
            return iter([(self.epoch, i) for i in indices])
        return indices


def limit(dataset: Dataset, n: int | None) -> Dataset:
    """The first ``n`` items of a dataset (all of them for None)."""
    if n is None or n >= len(dataset):  # type: ignore[arg-type]
        return dataset
    if n <= 0:
        raise ValueError(f"limit={n}; expected a positive number of images")
    return Subset(dataset, range(n))


def make_loader(
    dataset: Dataset, *, batch_size: int, num_workers: int, shuffle: bool, seed: int,
    num_replicas: int = 1, rank: int = 0, persistent_workers: bool = False, epoch: int = 0,
) -> DataLoader:
    """A loader whose order and augmentation depend on (seed, epoch) only.

    ``epoch`` is the epoch the loader starts in (a resumed run's): with workers, the first
    indices are fetched when the iterator is created, possibly before ``set_epoch`` is called.
    """
    ds = EpochSeeded(dataset, seed) if shuffle else dataset
    sampler = EpochSampler(ds, seed=seed, shuffle=shuffle, num_replicas=num_replicas, rank=rank)
    sampler.set_epoch(epoch)
    return DataLoader(
        ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
        collate_fn=collate_fn, persistent_workers=persistent_workers and num_workers > 0,
        pin_memory=False, generator=torch.Generator().manual_seed(seed),
    )
