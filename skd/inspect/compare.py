"""Teachers compared on identical views (`skd-cache stats A B ...`): caches built on one plan.

Each cache's rows are streamed once, in lockstep: per teacher top-1 on the validation split,
pairwise top-1 agreement and mean KL between teachers on the same views (after the layer norm the
SKD loss applies), and the top-1 of their equal-weight ensemble (the mean of the layer-normalised
logits).
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import torch
from tqdm import tqdm

from skd.loss import kl_per_row, skd_log_target, spherical_normalize
from skd.replay.checks import check_ensemble
from skd.store.cache_store import VAL, Store, View, part_name
from skd.store.reader import RowReader

TEMPERATURE, MULTIPLIER = 4.0, 2.0  # of the reported KL, as the codec table and verify


def _stream(stores: list[Store], view: View):
    """Decoded float32 blocks of every cache's rows of `view` (a view, or VAL), in lockstep."""
    readers = [RowReader(store, view, 0, stores[0].part_rows(view)).blocks() for store in stores]
    for parts in zip(*readers):
        yield [store.codec.decode(block) for store, (_, block) in zip(stores, parts)]


def split_figures(
    stores: list[Store], view: View, labels: np.ndarray | None, progress: bool
) -> dict:
    """Pairwise agreement and KL of one split; with `labels`, each teacher's and the ensemble's
    top-1."""
    k = len(stores)
    agree, kl = np.zeros((k, k)), np.zeros((k, k))
    hits, ensemble_hits, seen = np.zeros(k), 0, 0
    total = stores[0].part_rows(view)
    with tqdm(total=total, desc=part_name(view), unit="row", disable=not progress) as bar:
        for blocks in _stream(stores, view):
            preds = [b.argmax(1) for b in blocks]
            logs = [
                skd_log_target(torch.from_numpy(b), MULTIPLIER, TEMPERATURE, torch.float64)
                for b in blocks
            ]
            for i, j in combinations(range(k), 2):
                agree[i, j] += (preds[i] == preds[j]).sum()
                kl[i, j] += float(kl_per_row(logs[i], logs[j]).clamp_min(0).sum())
            if labels is not None:
                y = labels[seen : seen + len(blocks[0])]
                hits += [(p == y).sum() for p in preds]
                mean = sum(spherical_normalize(torch.from_numpy(b), 1.0) for b in blocks) / k
                ensemble_hits += int((mean.argmax(1).numpy() == y).sum())
            seen += len(blocks[0])
            bar.update(len(blocks[0]))
    names = [str(store.path) for store in stores]
    out = {
        "rows": seen,
        "pairs": [
            {
                "a": names[i],
                "b": names[j],
                "top1_agreement": agree[i, j] / max(seen, 1),
                "mean_kl": kl[i, j] / max(seen, 1),
            }
            for i, j in combinations(range(k), 2)
        ],
    }
    if labels is not None:
        out["top1"] = {name: float(h / max(seen, 1)) for name, h in zip(names, hits)}
        out["ensemble_top1"] = ensemble_hits / max(seen, 1)
    return out


def compare_teachers(
    stores: list[Store], views: list[int] | None = (0,), *, progress: bool = False
) -> dict:
    """The comparison `skd-cache stats A B ...` reports, as plain JSON-able values."""
    check_ensemble(stores)
    chosen = list(range(stores[0].num_views)) if views is None else list(views)
    report = {
        "caches": [str(store.path) for store in stores],
        "temperature": TEMPERATURE,
        "multiplier": MULTIPLIER,
        "views": {},
    }
    for view in chosen:
        report["views"][str(view)] = split_figures(stores, view, None, progress)
    if all(store.has_val for store in stores):
        report["val"] = split_figures(stores, VAL, stores[0].split("val").labels, progress)
    return report


def compare_lines(report: dict) -> list[str]:
    """`compare_teachers`'s answer as text lines."""
    lines = [f"teachers on one plan: {', '.join(report['caches'])}"]
    splits = [(f"view {v}", figures) for v, figures in report["views"].items()]
    if "val" in report:
        val = report["val"]
        lines += [f"  val top-1 {top1:.2%}  {name}" for name, top1 in val["top1"].items()]
        lines.append(
            f"  val top-1 {val['ensemble_top1']:.2%}  ensemble (mean of layer-normalised logits)"
        )
        splits.append(("val", val))
    for name, figures in splits:
        for pair in figures["pairs"]:
            lines.append(
                f"  {name}: {pair['a']} vs {pair['b']}: top-1 agreement {pair['top1_agreement']:.2%}, "
                f"mean KL (T={report['temperature']:g}, m={report['multiplier']:g}) {pair['mean_kl']:.4f}"
            )
    return lines
