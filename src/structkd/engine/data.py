"""Datasets and loaders for training runs: deterministic per (seed, epoch), so resume is exact.

Shuffling comes from a sampler whose permutation depends only on the seed and the epoch, and
each sample's augmentation RNG is seeded from (seed, epoch, index): the batches of epoch ``e``
are the same whether the run was interrupted or not, and whatever the number of workers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from ..config import DataConfig
from ..data import CocoDetection, build_transforms, collate_fn, make_synthetic_coco

logger = logging.getLogger("structkd.engine")


@dataclass
class DataPaths:
    train_ann: Path
    train_images: Path
    val_ann: Path
    val_images: Path


def resolve_data(cfg: DataConfig) -> DataPaths:
    """The annotation/image paths of a config, generating the built-in dataset if none given."""
    if cfg.train_ann is None:
        root = Path(cfg.synthetic_root).expanduser()
        p = make_synthetic_coco(
            root, num_train=cfg.synthetic_train, num_val=cfg.synthetic_val,
            image_size=cfg.synthetic_size, seed=cfg.synthetic_seed,
        )
        return DataPaths(p.train_ann, p.train_images, p.val_ann, p.val_images)
    missing = [k for k in ("train_images", "val_ann", "val_images") if getattr(cfg, k) is None]
    if missing:
        raise ValueError(f"data.train_ann is set but {['data.' + k for k in missing]} are not")
    return DataPaths(
        Path(cfg.train_ann), Path(cfg.train_images), Path(cfg.val_ann), Path(cfg.val_images)
    )


class EpochSeeded(Dataset):
    """Wraps a dataset so each item's random augmentation is seeded by (seed, epoch, index)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, index)) & 0x7FFF_FFFF_FFFF)
            return self.dataset[index]


class EpochSampler(Sampler[int]):
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
        if isinstance(self.dataset, EpochSeeded):
            self.dataset.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        total = self.num_samples * self.num_replicas
        order += order[: total - n]
        return iter(order[self.rank : total : self.num_replicas])


def load_datasets(cfg: DataConfig, paths: DataPaths) -> tuple[CocoDetection, CocoDetection]:
    """Train and val COCO datasets sharing the train split's category mapping."""
    train = CocoDetection(
        paths.train_ann, paths.train_images,
        build_transforms(True, hflip_prob=cfg.hflip, scale_range=tuple(cfg.scale_range)),
    )
    val = CocoDetection(
        paths.val_ann, paths.val_images, build_transforms(False),
        categories=train.coco_gt["categories"],
    )
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
    num_replicas: int = 1, rank: int = 0,
) -> DataLoader:
    ds = EpochSeeded(dataset, seed) if shuffle else dataset
    sampler = EpochSampler(ds, seed=seed, shuffle=shuffle, num_replicas=num_replicas, rank=rank)
    return DataLoader(
        ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
        collate_fn=collate_fn, persistent_workers=False, pin_memory=False,
    )
