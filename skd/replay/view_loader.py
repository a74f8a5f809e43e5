"""One rank's part of a view as a training loop consumes it: batches of (images, labels, logits) in
plan order.

The images are the recorded windows decoded at the student's recipe (mixed as recorded, with soft
labels then), the logits the cache's matching rows (of several caches, their `ensemble_target`), all
on the training device. `skd-train` and `skd.Cache.loader` both read views through `ViewLoader`.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
from tqdm import tqdm

from skd.errors import OptionError
from skd.loss import ensemble_target
from skd.models.runtime import images_to
from skd.pipelines import Recipe
from skd.plan.mixing import soft_labels
from skd.replay.cached_logits import cached_logits
from skd.replay.sources import ReplaySource
from skd.store.cache_store import Store


class TrainBatch(NamedTuple):
    """A batch for the student: unpacks as `images, labels, logits`."""

    images: torch.Tensor  # (B, 3, S, S) float32, normalised (channels_last on CUDA)
    # (B,) int64 class indices, or (B, C) float32 class probabilities of a mixed view
    labels: torch.Tensor
    logits: torch.Tensor | None  # (B, C) float32 teacher logits (None: read without logits)


def rank_range(
    n: int, rank: int, world: int, local_batch: int, mixed: bool = False
) -> tuple[int, int]:
    """This rank's contiguous part [start, stop) of a view's n positions; equal parts, so all ranks
    take equal steps (as DDP needs).

    The parts are disjoint and cover the view but for n mod world positions at its end, and one
    position of a part that would end in a batch of one image (BatchNorm cannot train on one); each
    view's order differs, so these are different samples in each view. With mixing, parts hold whole
    pairs (an even count from an even position).
    """
    per = n // world
    if mixed and world > 1:
        per -= per % 2
    used = per - 1 if per > 1 and per % local_batch == 1 else per
    return rank * per, rank * per + used


def view_of_epoch(epoch: int, num_views: int) -> int:
    """The view an epoch trains on: epochs cycle through the views, epoch K reading view 0 again."""
    return epoch % num_views


def check_shares(
    samples: int, world: int, batch_size: int, mixed: bool, option: str = "batch_size"
) -> None:
    """OptionError unless every process gets samples and images in each batch, and, for mixed views,
    whole pairs (positions 2i and 2i + 1 share a batch): at least one pair each and an even number
    of images a batch. `batch_size` is per process; `option` names it as the caller took it."""
    if samples < world:
        raise OptionError(
            f"{samples} training samples cannot be shared by {world} processes: use at most {samples}"
        )
    if batch_size < 1:
        raise OptionError(
            f"{option}: each of {world} processes gets {batch_size} images a batch: "
            "give each process at least one"
        )
    if mixed and world > 1 and samples // world < 2:
        raise OptionError(
            f"{samples} training samples give each of {world} processes {samples // world}: mixed "
            "views pair positions 2i and 2i + 1, so each process needs at least one pair: use at "
            f"most {samples // 2} processes"
        )
    if mixed and batch_size % 2:
        raise OptionError(
            f"{option}: each of {world} processes gets {batch_size} images a batch; mixed views pair "
            "positions 2i and 2i + 1 in one batch, so each process needs an even number of images: "
            "pass an even batch size"
        )


class ViewLoader:
    """Batches of positions [start, stop) of `view`: `TrainBatch(images, labels, logits)` on
    `device`.

    `stores`: the caches whose rows are the logits (several: combined by `ensemble_target(kd, ...,
    weights)`); none: logits are None. At most `steps` batches. Iterating again replays the same
    batches. Decoding workers and logit readers stop when the loop ends, also when it stops early.
    """

    def __init__(
        self,
        source: ReplaySource,
        view: int,
        start: int,
        stop: int,
        *,
        batch_size: int,
        device: torch.device,
        workers: int,
        recipe: Recipe | None = None,
        stores: Sequence[Store] = (),
        weights: Sequence[float] = (),
        kd: str = "skd",
        steps: int | None = None,
        progress: bool = False,
    ):
        self.source, self.view, self.start, self.stop = source, view, start, stop
        self.batch_size, self.device, self.workers, self.recipe = (
            batch_size,
            device,
            workers,
            recipe,
        )
        self.stores, self.weights, self.kd = list(stores), list(weights), kd
        batches = -(-(stop - start) // batch_size)
        self.steps = batches if steps is None else min(batches, steps)
        self.progress = progress

    def __len__(self) -> int:
        return self.steps

    @property
    def images(self) -> int:
        """How many images the batches hold."""
        return min(self.steps * self.batch_size, self.stop - self.start)

    def __iter__(self) -> Iterator[TrainBatch]:
        positions = np.arange(self.start, self.stop)
        loader = self.source.loader(
            self.view,
            positions,
            batch_size=self.batch_size,
            workers=self.workers,
            device=self.device,
            recipe=self.recipe,
        )
        readers = [
            cached_logits(store, self.view, self.start, self.stop, self.batch_size, self.device)
            for store in self.stores
        ]
        bar = tqdm(
            total=self.images, desc=f"view {self.view}", unit="img", disable=not self.progress
        )
        batches = iter(loader)
        try:
            for _, batch in zip(range(self.steps), batches):
                labels = batch.labels.to(self.device, non_blocking=True)
                if batch.mix_lambda is not None:
                    labels = soft_labels(labels, batch.mix_lambda, self.source.num_classes)
                yield TrainBatch(
                    images_to(batch.images, self.device),
                    labels,
                    self._logits(readers, batch.positions),
                )
                bar.update(len(labels))
        finally:  # also when the loop stops early: no reader thread or decoding worker outlives it
            bar.close()
            for reader in readers:
                reader.close()
            # a generator: closing it releases the decoding workers now
            if hasattr(batches, "close"):
                batches.close()

    def _logits(self, readers: list[Iterator], positions: torch.Tensor) -> torch.Tensor | None:
        """The next cached rows of each cache, checked to be those of `positions`, as one target."""
        if not readers:
            return None
        parts = []
        for reader in readers:
            first, logits = next(reader)
            if first != int(positions[0]) or len(logits) != len(positions):
                raise RuntimeError(
                    f"logits at position {first} do not match images at {int(positions[0])}"
                )
            parts.append(logits)
        return parts[0] if len(parts) == 1 else ensemble_target(self.kd, parts, self.weights)
