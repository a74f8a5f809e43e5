"""A view's recorded augmentation applied to a pipeline's views, in the plan's order (timm's): crop,
resize, flip, RandAugment ops, normalise, erase, then mix.

`RecordedOps` is what a loader applies to each item's 8-bit view after the flip (`pixel_ops` of
`skd.pipelines.make_loader`); `RecordedBatchOps` applies the rest to a loader's normalised batches
on their device: each row's erased boxes, then each pair of rows mixed. Every consumer (the build,
verify, skd-train and the API) reads a view through these two, so all see the same images.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from skd.plan.augment import apply_ops, erase
from skd.plan.mixing import mix_batch


@dataclass(frozen=True)
class RecordedOps:
    """Item i's recorded ops `op[i]` with arguments `magnitude[i]` on its 8-bit (3, S, S) view
    (picklable: the torchvision loader's worker processes call it)."""

    op: np.ndarray  # (M, L) indices into `names`
    magnitude: np.ndarray  # (M, L) the signed arguments applied
    names: tuple[str, ...]  # the plan's op list (plan.augment's ops)

    def __call__(self, index: int, image: torch.Tensor) -> torch.Tensor:
        return apply_ops(image, self.op[index], self.magnitude[index], self.names)


def _tensors(*arrays: np.ndarray) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)


class RecordedBatchOps:
    """A loader's batches with the recorded batch-level ops applied, row i of the loader being row i
    of the arrays: `erase` = (boxes, values) as fractions of the view at the batch's size, `mix` =
    (mix_lambda, mix_box) of each row.

    Mixed rows pair up by their index in the loader (2i with 2i + 1), so the rows must come in whole
    pairs and batches must hold an even number of them (`skd.replay.view_loader.check_shares`).
    """

    def __init__(self, loader, batch_size: int, *, erase=None, mix=None):
        self.loader, self.batch_size = loader, batch_size
        self.erase = None if erase is None else _tensors(*erase)
        self.mix = None if mix is None else _tensors(*mix)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for index, batch in enumerate(self.loader):
            first = index * self.batch_size
            rows = slice(first, first + len(batch.positions))
            images, device = batch.images, batch.images.device
            if self.erase is not None:
                boxes, values = self.erase
                images = erase(images, boxes[rows].to(device), values[rows].to(device))
            if self.mix is None:
                yield replace(batch, images=images)
                continue
            lam, box = self.mix
            images = mix_batch(images, lam[rows], box[rows], first)
            yield replace(batch, images=images, mix_lambda=lam[rows].to(device))
