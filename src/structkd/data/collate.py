"""Batching detection samples for a ``DataLoader``."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def collate_fn(batch: Sequence[tuple[Tensor, dict]]) -> tuple[list[Tensor], list[dict]]:
    """Batch detection samples as lists (images differ in size; the detector batches them)."""
    images = [sample[0] for sample in batch]
    targets = [sample[1] for sample in batch]
    return images, targets
