"""A view's recorded RandAugment ops and random erasing, applied as the plan recorded them.

`RecordedOps` is what a loader applies to each item's 8-bit view after the flip (`pixel_ops` of
`skd.pipelines.make_loader`); `ErasedLoader` erases the recorded boxes of a loader's normalised
batches on their device. The plan's order of operations (timm's): crop, resize, flip, ops,
normalise, erase, then mix.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from skd.plan.augment import apply_ops, erase


@dataclass(frozen=True)
class RecordedOps:
    """Item i's recorded ops `op[i]` with arguments `magnitude[i]` on its 8-bit (3, S, S) view
    (picklable: the torchvision loader's worker processes call it)."""

    op: np.ndarray  # (M, L) indices into `names`
    magnitude: np.ndarray  # (M, L) the signed arguments applied
    names: tuple[str, ...]  # the plan's op list (plan.augment's ops)

    def __call__(self, index: int, image: torch.Tensor) -> torch.Tensor:
        return apply_ops(image, self.op[index], self.magnitude[index], self.names)


class ErasedLoader:
    """A loader's batches with each row's recorded boxes erased (fractions of the view, at the
    batch's size)."""

    def __init__(self, loader, boxes: np.ndarray, values: np.ndarray, batch_size: int):
        self.loader, self.batch_size = loader, batch_size
        self.boxes = torch.from_numpy(np.ascontiguousarray(boxes))
        self.values = torch.from_numpy(np.ascontiguousarray(values))

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for index, batch in enumerate(self.loader):
            rows = slice(index * self.batch_size, index * self.batch_size + len(batch.positions))
            device = batch.images.device
            images = erase(batch.images, self.boxes[rows].to(device), self.values[rows].to(device))
            yield replace(batch, images=images)
