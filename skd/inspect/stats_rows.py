"""Per-row statistics of a cache's stored teacher logits, streamed once without decoding a row.

Argmax, ranks and the layer norm ignore the int8 codec's per-row affine (positive scale, any
offset); the standard deviation and the softmax need only the row's scale. So one float32 copy of
the stored values is the only full-size conversion (>= 50k rows/s at 1000 classes, see
benchmarks/stats_throughput.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from skd.loss import LAYER_NORM_EPS
from skd.store.cache_store import Store, View
from skd.store.codecs import Encoded
from skd.store.reader import RowReader

# rows per kernel step: the float32 work buffers (1 MiB at 1000 classes) stay in cache
BATCH_ROWS = 256
# exp() of anything lower is 0 for the sums here; below -87 it is slow (denormals)
MIN_EXPONENT = -80.0


@dataclass
class RowStats:
    """Per-row figures of a run of stored rows (all arrays (n,))."""

    pred: np.ndarray  # teacher top-1 class
    above: np.ndarray  # classes scoring strictly higher than the label (top-5 correct: above < 5)
    std: np.ndarray  # standard deviation over classes (unbiased, as torch.std)
    max_prob: np.ndarray  # max of softmax(logits)
    entropy: np.ndarray  # of softmax(logits), nats
    target_max_prob: np.ndarray  # max of the SKD target, exp(skd.loss.skd_log_target(logits, m, T))
    target_entropy: np.ndarray

    @classmethod
    def empty(cls, n: int) -> "RowStats":
        return cls(
            np.zeros(n, np.int64),
            np.zeros(n, np.int64),
            *(np.zeros(n, np.float64) for _ in range(5)),
        )

    def put(self, start: int, part: "RowStats") -> None:
        for name in self.__dataclass_fields__:
            getattr(self, name)[start : start + len(part.pred)] = getattr(part, name)


def _softmax_figures(d: np.ndarray, lowest: np.ndarray, k: np.ndarray, work: np.ndarray):
    """Max probability and entropy of softmax(k * d) per row, where d = stored - row max (<= 0,
    lowest: row min)."""
    e = np.multiply(d, k[:, None].astype(np.float32), out=work)
    if (lowest * k).min(initial=0.0) < MIN_EXPONENT:
        np.maximum(e, MIN_EXPONENT, out=e)
    np.exp(e, out=e)
    z = e.sum(1).astype(np.float64)
    dot = np.einsum("ij,ij->i", e, d).astype(np.float64) * k
    return 1.0 / z, np.log(z) - dot / z


def row_stats(
    rows: Encoded,
    labels: np.ndarray,
    *,
    temperature: float,
    multiplier: float,
    work: tuple[np.ndarray, np.ndarray],
) -> RowStats:
    """Per-row figures of stored rows (any codec) whose true classes are `labels`.

    `work` is two float32 buffers of at least (len(labels), C), reused between calls: fresh
    multi-MiB arrays cost page faults that would halve the throughput.
    """
    n, c = rows.logits.shape
    r = np.arange(n)
    scale = np.ones(n, np.float64) if rows.scale is None else rows.scale.astype(np.float64)
    x = work[0][:n]
    np.copyto(x, rows.logits, casting="unsafe")
    pred = x.argmax(1)
    known = labels < c  # a dataset class the teacher does not have is never predicted
    label_score = x[r, np.where(known, labels, 0)]
    above = np.where(
        known, np.count_nonzero(x > label_score[:, None], axis=1), np.iinfo(np.int64).max
    )
    d = np.subtract(x, x[r, pred][:, None], out=x)
    lowest = d.min(1).astype(np.float64)
    # float32 sums: float64 ones would cost a third of the throughput
    mean = d.sum(1).astype(np.float64) / c
    # biased, stored units
    var = np.maximum(np.einsum("ij,ij->i", d, d).astype(np.float64) / c - mean**2, 0.0)
    std = np.sqrt(var * c / max(c - 1, 1)) * scale
    max_prob, entropy = _softmax_figures(d, lowest, scale, work[1][:n])
    ln_k = (multiplier / temperature) * scale / np.sqrt(scale**2 * var + LAYER_NORM_EPS)
    target_max_prob, target_entropy = _softmax_figures(d, lowest, ln_k, work[1][:n])
    return RowStats(pred, above, std, max_prob, entropy, target_max_prob, target_entropy)


def stream_rows(
    store: Store,
    view: View,
    labels: np.ndarray,
    *,
    temperature: float,
    multiplier: float,
    progress: bool = False,
    desc: str = "",
) -> RowStats:
    """RowStats of every row of `view` (a view, or VAL), streamed once in order with RowReader."""
    n = len(labels)
    out = RowStats.empty(n)
    work = tuple(np.empty((BATCH_ROWS, store.num_classes), np.float32) for _ in range(2))
    with tqdm(total=n, desc=desc, unit="row", disable=not progress, dynamic_ncols=True) as bar:
        for first, block in RowReader(store, view, 0, n).blocks():
            # the classes not stored take part in every figure: whole rows first
            if store.codec.top:
                block = Encoded(store.codec.decode(block))
            for a in range(0, len(block.logits), BATCH_ROWS):
                part = Encoded(*(None if v is None else v[a : a + BATCH_ROWS] for v in block))
                b = first + a
                out.put(
                    b,
                    row_stats(
                        part,
                        labels[b : b + len(part.logits)],
                        temperature=temperature,
                        multiplier=multiplier,
                        work=work,
                    ),
                )
                bar.update(len(part.logits))
    return out


def augment_accuracy(
    recorded: dict | None, names: tuple[str, ...], correct: np.ndarray
) -> list[dict] | None:
    """The teacher's top-1 on the rows each recorded RandAugment op touched (in any layer), on the
    rows no op touched, and on erased and untouched rows, worst first: which of the recorded ops
    hurt the teacher most."""
    if recorded is None:
        return None
    groups = {}
    if "aug_op" in recorded:
        op = recorded["aug_op"]
        groups.update(
            {name: (op == index).any(axis=1) for index, name in enumerate(names) if index}
        )
        groups["no op"] = (op == 0).all(axis=1)
    if "erase_box" in recorded:
        erased = recorded["erase_box"].any(axis=(1, 2))
        groups.update({"erased": erased, "not erased": ~erased})
    rows = [
        {
            "op": name,
            "rows": int(mask.sum()),
            "top1": float(correct[mask].mean()) if mask.any() else None,
        }
        for name, mask in groups.items()
    ]
    return sorted(rows, key=lambda row: (row["top1"] is None, row["top1"] or 0.0))
