"""The student on the validation split after each epoch: top-1, top-5 and top-1 agreement with the
cached teacher, each rank on its part of the split."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from skd.config import TrainConfig
from skd.loss import ensemble_target
from skd.models.runtime import Dist, autocast, images_to
from skd.replay.cached_logits import cached_logits
from skd.replay.sources import ReplaySource
from skd.store.cache_store import VAL, Store


def val_range(n: int, d: Dist) -> tuple[int, int]:
    """This rank's part of the validation split (the last part may be shorter)."""
    per = -(-n // d.world)
    return min(n, d.rank * per), min(n, (d.rank + 1) * per)


def cached_val_top1(
    stores: list[Store], weights: list[float], kd: str, start: int, stop: int, device: torch.device
) -> torch.Tensor | None:
    """The cached teacher's (an ensemble's) top-1 class of validation rows [start, stop), read once
    per run."""
    if not stores or not all(store.has_val for store in stores):
        return None
    readers = [cached_logits(store, VAL, start, stop, 4096, device) for store in stores]
    tops = [
        (
            parts[0][1] if len(parts) == 1 else ensemble_target(kd, [p[1] for p in parts], weights)
        ).argmax(1)
        for parts in zip(*readers)
    ]
    return torch.cat(tops) if tops else torch.zeros(0, dtype=torch.int64, device=device)


@torch.no_grad()
def evaluate(
    student: nn.Module,
    source: ReplaySource,
    teacher_top1: torch.Tensor | None,
    cfg: TrainConfig,
    d: Dist,
    device: torch.device,
) -> dict:
    """Top-1/top-5 on the validation split (centre windows) and top-1 agreement with the cached
    teacher."""
    student.eval()
    start, stop = val_range(len(source.val.paths), d)
    loader = source.loader(
        VAL,
        np.arange(start, stop),
        batch_size=max(1, cfg.batch_size // d.world),
        workers=cfg.workers,
        device=device,
    )
    counts = torch.zeros(4, dtype=torch.float64, device=device)  # top1, top5, agree, n
    for batch in loader if stop > start else []:
        images, target = images_to(batch.images, device), batch.labels.to(device)
        with autocast(device, cfg.amp):
            logits = student(images).float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        counts[0] += (top5[:, 0] == target).sum()
        counts[1] += (top5 == target[:, None]).any(dim=1).sum()
        if teacher_top1 is not None:
            counts[2] += (teacher_top1[batch.positions.to(device) - start] == top5[:, 0]).sum()
        counts[3] += len(target)
    d.all_reduce(counts)
    student.train()
    result = {"val_top1": float(counts[0] / counts[3]), "val_top5": float(counts[1] / counts[3])}
    if teacher_top1 is not None:
        result["val_teacher_agreement"] = float(counts[2] / counts[3])
    return result
