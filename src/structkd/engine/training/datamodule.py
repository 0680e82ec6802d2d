"""``DetectionDataModule``: train and validation loaders for Lightning, exact on resume and DDP.

Usable with any ``lightning.Trainer``: its samplers are ``DistributedSampler`` subclasses, so
Lightning keeps them under DDP (each rank gets its share), and a resumed run's loader starts in
the right epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset

from ..options import Loader
from .data_order import limit, make_loader
from .evalinfo import EvalInfo, eval_info_for

__all__ = ["DetectionDataModule"]


class DetectionDataModule(L.LightningDataModule):
    """Loaders over ``train`` and ``val`` datasets of ``(image, target)`` pairs.

    Args:
        train, val: datasets as torchvision's detection references use them (``target``:
            ``boxes`` XYXY, ``labels`` 1..K, ``image_id``); augment inside them.
        loader: batch sizes, workers, ``limit_*`` (:class:`~structkd.engine.Loader`).
        seed: the data order and every sample's augmentation depend on (seed, epoch) only.
        class_names: names by label (0 = background) for the per-class table; a structkd
            ``CocoDetection`` brings its own.
        num_classes: the classes the model predicts, background included: a training label
            outside 1..num_classes-1 is refused, naming the label and its image (torchvision's
            losses would fail with an IndexError, or train nothing); None checks nothing.
    """

    def __init__(self, train: Dataset, val: Dataset | None = None, loader: Loader | None = None,
                 *, seed: int = 0, class_names: Sequence[str] | None = None,
                 num_classes: int | None = None) -> None:
        super().__init__()
        self.train_dataset, self.val_dataset = train, val
        self.loader = loader or Loader()
        self.seed = seed
        self.class_names = list(class_names) if class_names is not None else None
        self.num_classes = num_classes
        self._eval_info: EvalInfo | None = None

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Check a training batch's labels on the host, before it goes to the device."""
        t = self.trainer
        if self.num_classes is not None and t is not None and t.training:
            k = self.num_classes - 1
            for target in batch[1]:
                labels = target["labels"]
                bad = labels[(labels < 1) | (labels > k)]
                if bad.numel():
                    raise ValueError(f"label {int(bad[0])} of image {target.get('image_id')} "
                                     f"is outside 1..{k}: the student predicts {k} object "
                                     "classes (give it the data's class count)")
        return batch

    def _replicas(self) -> tuple[int, int]:
        t = self.trainer
        return (t.world_size, t.global_rank) if t is not None else (1, 0)

    def eval_info(self) -> EvalInfo | None:
        """The validation set's ground truth and label map (read once), or None without one."""
        if self.val_dataset is None:
            return None
        if self._eval_info is None:
            self._eval_info = eval_info_for(self.val_dataset, self.class_names)
        return self._eval_info

    def train_dataloader(self) -> DataLoader:
        o = self.loader
        n, rank = self._replicas()
        # Called once the checkpoint (if any) is restored. A checkpoint written at the end of
        # epoch e counts e + 1 epochs processed but only e completed: the loader must start in
        # epoch e + 1 (with workers the first batches are fetched before ``set_epoch`` runs).
        t = self.trainer
        epoch = t.fit_loop.epoch_progress.current.processed if t is not None else 0
        return make_loader(limit(self.train_dataset, o.limit_train), batch_size=o.batch_size,
                           num_workers=o.num_workers, shuffle=True, seed=self.seed,
                           num_replicas=n, rank=rank, persistent_workers=o.persistent_workers,
                           epoch=epoch)

    def val_dataloader(self) -> DataLoader | list:
        o = self.loader
        n, rank = self._replicas()
        if self.val_dataset is None:
            return []
        return make_loader(limit(self.val_dataset, o.limit_val), batch_size=o.val_batch_size,
                           num_workers=o.num_workers, shuffle=False, seed=0, num_replicas=n,
                           rank=rank, persistent_workers=o.persistent_workers)
