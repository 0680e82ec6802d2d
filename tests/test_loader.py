"""The training loader's batches depend on (seed, epoch) only: a resumed run's fresh loader,
started at epoch e, yields what the uninterrupted run's loader yields in epoch e, whatever the
worker count, persistent workers included."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from structkd.engine.data import make_loader


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
