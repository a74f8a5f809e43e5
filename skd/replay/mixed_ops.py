"""A loader's batches mixed as the plan recorded: each pair of rows blended or pasted on the
batches' device."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from skd.plan.mixing import mix_batch


class MixedLoader:
    """A loader's batches with each pair of rows mixed as the plan recorded (on the batches'
    device).

    Rows pair up by their index in the loader (2i with 2i + 1), so the positions must come in whole
    pairs and `batch_size` must be even: the caller's positions are consecutive from an even one, or
    pairs.
    """

    def __init__(self, loader, lam: np.ndarray, box: np.ndarray, batch_size: int):
        if batch_size % 2:
            raise ValueError(
                f"mixing needs an even batch size (pairs share a batch), got {batch_size}"
            )
        self.loader, self.batch_size = loader, batch_size
        self.lam, self.box = (
            torch.from_numpy(np.ascontiguousarray(lam)),
            torch.from_numpy(np.ascontiguousarray(box)),
        )

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for index, batch in enumerate(self.loader):
            first = index * self.batch_size
            rows = slice(first, first + len(batch.positions))
            images = mix_batch(batch.images, self.lam[rows], self.box[rows], first)
            yield replace(batch, images=images, mix_lambda=self.lam[rows].to(images.device))
