"""A cache's teacher logits as training reads them: rows streamed in order onto the device, and the
SKD multiplier `--multiplier auto` derives from them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Iterator

import numpy as np
import torch

from skd.store.cache_store import Store, View
from skd.store.reader import RowReader

AUTO_MULTIPLIER_ROWS = 65536  # rows of view 0 whose mean logit std is `--multiplier auto`


def cached_logits(
    store: Store, view: View, start: int, stop: int, batch_size: int, device: torch.device
) -> Iterator[tuple[int, torch.Tensor]]:
    """(first position, float32 logits on `device`) per batch of rows [start, stop), read ahead and
    decoded on the device (a uint8 copy crosses the bus, not float32)."""
    pin = device.type == "cuda"
    for first, enc in RowReader(store, view, start, stop).batches(batch_size):
        parts = [None if a is None else torch.from_numpy(np.ascontiguousarray(a)) for a in enc]
        if pin:
            parts = [None if t is None else t.pin_memory() for t in parts]
        parts = [None if t is None else t.to(device, non_blocking=True) for t in parts]
        yield first, store.codec.decode_torch(*parts)


def mean_row_std(row_std: np.ndarray) -> float:
    """`--multiplier auto` from the per-row logit standard deviations of view 0 (SKD's advice for
    m)."""
    return float(np.asarray(row_std[:AUTO_MULTIPLIER_ROWS], np.float64).mean())


def auto_multiplier(stores: list[Store], weights: Sequence[float] = (1.0,)) -> float:
    """`--multiplier auto`: the mean per-row std of the first rows of view 0 of a cache, or of an
    ensemble's logits weighted by `weights` (one per cache: `skd.cache.ensemble_weights`)."""
    rows = min(stores[0].num_samples, AUTO_MULTIPLIER_ROWS)
    logits = sum(w * torch.from_numpy(s.read_logits(0, 0, rows)) for w, s in zip(weights, stores))
    return mean_row_std(logits.std(dim=1).numpy())
