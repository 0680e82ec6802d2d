"""Datasets and loaders for training runs: deterministic per (seed, epoch), so resume is exact.

Shuffling comes from a sampler whose permutation depends only on the seed and the epoch, and it
hands each index to the dataset together with that epoch, so each sample's augmentation RNG is
seeded from (seed, epoch, index) in whichever process loads it: the batches of epoch ``e`` are
the same whether the run was interrupted or not, whatever the number of workers, persistent or
not. Loaders draw their worker seeds from their own generator, never from the global RNG that
the detectors' samplers use.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from ..config import DataConfig
from ..data import CocoDetection, build_transforms, collate_fn, make_synthetic_coco

logger = logging.getLogger("structkd.engine")
# make_synthetic_coco's difficulty options that data.synthetic_options may set.
SYNTHETIC_OPTIONS = ("max_objects", "max_occlusion", "clutter", "size_probs")


@dataclass
class DataPaths:
    train_ann: Path
    train_images: Path
    val_ann: Path
    val_images: Path


def resolve_data(cfg: DataConfig) -> DataPaths:
    """The annotation/image paths of a config; the built-in dataset only when none is given."""
    keys = ("train_ann", "train_images", "val_ann", "val_images")
    given = {k: getattr(cfg, k) for k in keys}
    if all(v is None for v in given.values()):
        unknown = sorted(set(cfg.synthetic_options) - set(SYNTHETIC_OPTIONS))
        if unknown:
            raise ValueError(f"data.synthetic_options: unknown keys {unknown}; expected some of "
                             f"{list(SYNTHETIC_OPTIONS)}")
        root = Path(cfg.synthetic_root).expanduser()
        logger.info("data: no data paths given (data.train_ann, ...); using the built-in "
                    "synthetic dataset in %s", root)
        p = make_synthetic_coco(
            root, num_train=cfg.synthetic_train, num_val=cfg.synthetic_val,
            image_size=cfg.synthetic_size, seed=cfg.synthetic_seed, **cfg.synthetic_options,
        )
        return DataPaths(p.train_ann, p.train_images, p.val_ann, p.val_images)
    missing = [f"data.{k}" for k, v in given.items() if v is None]
    if missing:
        have = [f"data.{k}" for k, v in given.items() if v is not None]
        raise ValueError(f"{missing} not set while {have} are; give all four data paths (or "
                         "none, for the built-in synthetic dataset)")
    return DataPaths(*(Path(given[k]).expanduser() for k in keys))


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


class EpochSampler(Sampler[Any]):
    """Shuffled (or ordered) indices for one replica; the order depends on seed and epoch only.

    Like ``DistributedSampler``, the index list is padded by repetition to a multiple of the
    number of replicas; evaluation removes the repeated images by id.
    """

    def __init__(
        self, dataset: Dataset, *, seed: int, shuffle: bool, num_replicas: int = 1, rank: int = 0
    ) -> None:
        self.dataset, self.seed, self.shuffle = dataset, seed, shuffle
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0
        self.num_samples = math.ceil(len(dataset) / num_replicas)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[Any]:
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        total = self.num_samples * self.num_replicas
        order += order[: total - n]
        mine = order[self.rank : total : self.num_replicas]
        if isinstance(self.dataset, EpochSeeded):  # the epoch travels with each index
            return iter([(self.epoch, i) for i in mine])
        return iter(mine)


def load_datasets(
    cfg: DataConfig, paths: DataPaths, *, check: tuple[str, ...] = ("train", "val"),
) -> tuple[CocoDetection, CocoDetection]:
    """Train and val COCO datasets sharing the train split's category mapping.

    The image files of the splits named in ``check`` are checked up front (exist, readable
    header, annotated size; ``CocoDetection.check_images``): a bad validation image fails the
    run now, not after an epoch of training. The problems of both splits are reported together.
    (Evaluation reads only the train split's categories and may pass ``check=("val",)``.)
    """
    train = CocoDetection(
        paths.train_ann, paths.train_images,
        build_transforms(True, hflip_prob=cfg.hflip, scale_range=tuple(cfg.scale_range)),
    )
    val = CocoDetection(
        paths.val_ann, paths.val_images, build_transforms(False),
        categories=train.coco_gt["categories"],
    )
    unknown = sorted(set(check) - {"train", "val"})
    if unknown:
        raise ValueError(f"load_datasets(check={check!r}): unknown split(s) {unknown}; expected "
                         "'train' and/or 'val'")
    problems = []
    for split in [d for name, d in (("train", train), ("val", val)) if name in check]:
        try:
            split.check_images()
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise ValueError("; and ".join(problems))
    logger.info("data: %d train images, %d val images, %d classes",
                len(train), len(val), train.num_classes - 1)
    return train, val


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
