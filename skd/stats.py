"""What a cache's teacher logits look like (`skd-cache stats`): accuracy, scale, confidence, calibration.

Statistics stream each chosen view once through RowReader and never decode a row: argmax, ranks and
the layer norm ignore the int8 codec's per-row affine (positive scale, any offset), the standard
deviation and the softmax need only the row's scale, so one float32 copy of the stored values is the
only full-size conversion (>= 50k rows/s at 1000 classes, see benchmarks/stats_throughput.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .codecs import Encoded
from .errors import SkdError
from .loss import LAYER_NORM_EPS
from .reader import RowReader
from .replay import mean_row_std
from .store import Store

ECE_BINS = 15
SHOWN = 10  # worst classes and most confused pairs listed
BATCH_ROWS = 256  # rows per kernel step: the float32 work buffers (1 MiB at 1000 classes) stay in cache
MIN_EXPONENT = -80.0  # exp() of anything lower is 0 for the sums here; below -87 it is slow (denormals)


class StatsError(SkdError):
    """Statistics cannot be computed as asked: one line saying what to change."""


# ---------------------------------------------------------------------------------------------
# Per-row statistics of stored rows

@dataclass
class RowStats:
    """Per-row figures of a run of stored rows (all arrays (n,))."""

    pred: np.ndarray  # teacher top-1 class
    above: np.ndarray  # classes scoring strictly higher than the label (top-5 correct: above < 5)
    std: np.ndarray  # standard deviation over classes (unbiased, as torch.std)
    max_prob: np.ndarray  # max of softmax(logits)
    entropy: np.ndarray  # of softmax(logits), nats
    target_max_prob: np.ndarray  # max of the SKD target softmax(layer_norm(logits) * m / T)
    target_entropy: np.ndarray

    @classmethod
    def empty(cls, n: int) -> "RowStats":
        return cls(np.zeros(n, np.int64), np.zeros(n, np.int64),
                   *(np.zeros(n, np.float64) for _ in range(5)))

    def put(self, start: int, part: "RowStats") -> None:
        for name in self.__dataclass_fields__:
            getattr(self, name)[start:start + len(part.pred)] = getattr(part, name)


def _softmax_figures(d: np.ndarray, lowest: np.ndarray, k: np.ndarray, work: np.ndarray):
    """Max probability and entropy of softmax(k * d) per row, where d = stored - row max (<= 0, lowest: row min)."""
    e = np.multiply(d, k[:, None].astype(np.float32), out=work)
    if (lowest * k).min(initial=0.0) < MIN_EXPONENT:
        np.maximum(e, MIN_EXPONENT, out=e)
    np.exp(e, out=e)
    z = e.sum(1).astype(np.float64)
    dot = np.einsum("ij,ij->i", e, d).astype(np.float64) * k
    return 1.0 / z, np.log(z) - dot / z


def row_stats(rows: Encoded, labels: np.ndarray, *, temperature: float, multiplier: float,
              work: tuple[np.ndarray, np.ndarray]) -> RowStats:
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
    above = np.where(known, np.count_nonzero(x > label_score[:, None], axis=1), np.iinfo(np.int64).max)
    d = np.subtract(x, x[r, pred][:, None], out=x)
    lowest = d.min(1).astype(np.float64)
    mean = d.sum(1).astype(np.float64) / c  # float32 sums: float64 ones would cost a third of the throughput
    var = np.maximum(np.einsum("ij,ij->i", d, d).astype(np.float64) / c - mean**2, 0.0)  # biased, stored units
    std = np.sqrt(var * c / max(c - 1, 1)) * scale
    max_prob, entropy = _softmax_figures(d, lowest, scale, work[1][:n])
    ln_k = (multiplier / temperature) * scale / np.sqrt(scale**2 * var + LAYER_NORM_EPS)
    target_max_prob, target_entropy = _softmax_figures(d, lowest, ln_k, work[1][:n])
    return RowStats(pred, above, std, max_prob, entropy, target_max_prob, target_entropy)


def stream_rows(store: Store, view: int | None, labels: np.ndarray, *, temperature: float, multiplier: float,
                progress: bool = False, desc: str = "") -> RowStats:
    """RowStats of every row of view `view` (None: val), streamed once in order with RowReader."""
    n = len(labels)
    out = RowStats.empty(n)
    work = tuple(np.empty((BATCH_ROWS, store.num_classes), np.float32) for _ in range(2))
    with tqdm(total=n, desc=desc, unit="row", disable=not progress, dynamic_ncols=True) as bar:
        for first, block in RowReader(store, view, 0, n).blocks():
            for a in range(0, len(block.logits), BATCH_ROWS):
                part = Encoded(*(None if v is None else v[a:a + BATCH_ROWS] for v in block))
                b = first + a
                out.put(b, row_stats(part, labels[b:b + len(part.logits)], temperature=temperature,
                                     multiplier=multiplier, work=work))
                bar.update(len(part.logits))
    return out


# ---------------------------------------------------------------------------------------------
# Summaries

def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE over equal-width confidence bins (lo, hi]: sum of |accuracy - confidence| weighted by bin size."""
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    gap = np.bincount(which, weights=correct.astype(np.float64) - confidence, minlength=bins)
    return float(np.abs(gap).sum() / max(1, len(confidence)))


def class_name(classes: list[str], i: int) -> str:
    return classes[i] if 0 <= i < len(classes) else f"#{i}"


@dataclass
class SplitStats:
    """Statistics of the teacher's logits on one view or on val; the arrays feed the plot."""

    name: str  # "view 3" or "val"
    rows: int
    top1: float
    top5: float
    std_mean: float
    std_median: float
    std_p5: float
    std_p95: float
    max_prob: float
    entropy: float
    target_max_prob: float
    target_entropy: float
    ece: float | None  # val only: the views are augmented training crops
    worst_classes: list[dict]
    confused_pairs: list[dict]
    std: np.ndarray = field(repr=False)
    max_probs: np.ndarray = field(repr=False)
    class_accuracy: np.ndarray = field(repr=False)  # NaN for classes without samples

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not isinstance(v, np.ndarray)}


def summarize(name: str, rows: RowStats, labels: np.ndarray, classes: list[str], *, ece: bool) -> SplitStats:
    """Reduce one split's RowStats to the reported figures."""
    correct = rows.pred == labels
    n_classes = max(len(classes), int(labels.max(initial=-1)) + 1)
    count = np.bincount(labels, minlength=n_classes)
    hits = np.bincount(labels[correct], minlength=n_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(count > 0, hits / count, np.nan)
    present = np.flatnonzero(count)
    worst = present[np.lexsort((present, accuracy[present]))][:SHOWN]
    wrong = ~correct
    width = max(n_classes, int(rows.pred.max(initial=-1)) + 1)
    pairs = np.bincount(labels[wrong] * width + rows.pred[wrong], minlength=n_classes * width)
    top = np.flatnonzero(pairs)
    top = top[np.lexsort((top, -pairs[top]))][:SHOWN]
    p5, median, p95 = np.percentile(rows.std, [5, 50, 95]) if len(rows.std) else (np.nan,) * 3
    return SplitStats(
        name=name, rows=len(labels), top1=float(correct.mean()), top5=float((rows.above < 5).mean()),
        std_mean=float(rows.std.mean()), std_median=float(median), std_p5=float(p5), std_p95=float(p95),
        max_prob=float(rows.max_prob.mean()), entropy=float(rows.entropy.mean()),
        target_max_prob=float(rows.target_max_prob.mean()), target_entropy=float(rows.target_entropy.mean()),
        ece=expected_calibration_error(rows.max_prob, correct) if ece else None,
        worst_classes=[{"class": class_name(classes, int(i)), "accuracy": float(accuracy[i]),
                        "samples": int(count[i])} for i in worst],
        confused_pairs=[{"true": class_name(classes, int(i // width)), "predicted": class_name(classes, int(i % width)),
                         "count": int(pairs[i]), "fraction_of_true": float(pairs[i] / count[i // width])} for i in top],
        std=rows.std.astype(np.float32), max_probs=rows.max_prob.astype(np.float32), class_accuracy=accuracy)


def consistency(preds_by_sample: list[np.ndarray]) -> float | None:
    """Fraction of samples whose top-1 class is the same in every view (None for fewer than two views)."""
    if len(preds_by_sample) < 2:
        return None
    first = preds_by_sample[0]
    return float(np.all([p == first for p in preds_by_sample[1:]], axis=0).mean())


@dataclass
class CacheStats:
    """What `skd-cache stats` reports."""

    splits: list[SplitStats]
    temperature: float
    multiplier: float
    auto_multiplier: float | None  # what `skd-train --multiplier auto` uses; needs view 0
    consistency: float | None
    consistency_views: list[int]
    storage: dict

    def to_json(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "splits"}
        out["splits"] = [s.to_json() for s in self.splits]
        return out


def stored_labels(store: Store, split: str) -> np.ndarray:
    """Class index of each sample of `samples` or `val` (Store.split also checks every path: 15 us each)."""
    return store.group[f"{split}/label"][:].astype(np.int64)


def choose_views(store: Store, views: list[int] | None) -> list[int]:
    """The views to stream (None: all), checked against the cache: each must exist and be complete."""
    chosen = list(range(store.num_views)) if views is None else list(dict.fromkeys(views))
    bad = [k for k in chosen if not 0 <= k < store.num_views]
    if bad:
        raise StatsError(f"cache {store.path} has views 0-{store.num_views - 1}, not {', '.join(map(str, bad))}")
    complete = store.complete()
    unfinished = [k for k in chosen if not complete[k].all()]
    if unfinished:
        raise StatsError(f"views {', '.join(map(str, unfinished))} of cache {store.path} are unfinished: rerun its "
                         "`skd-cache build` command, or pick complete views with --views (see `skd-cache info`)")
    return chosen


def logit_stats(store: Store, views: list[int] | None = (0,), *, val: bool = True, temperature: float = 4.0,
                multiplier: float = 2.0, progress: bool = False) -> CacheStats:
    """Stream the chosen views (None: all) and, with `val`, val/ once each; summarise the teacher's logits."""
    if temperature <= 0 or multiplier <= 0:
        raise StatsError(f"temperature and multiplier must be positive, got {temperature} and {multiplier}")
    chosen = choose_views(store, None if views is None else list(views))
    classes = list(store.meta["dataset"].get("classes", []))
    kwargs = dict(temperature=temperature, multiplier=multiplier, progress=progress)
    splits, preds, auto = [], [], None
    for k in chosen:
        order = store.view_plan(k)[0].astype(np.int64)
        labels = stored_labels(store, "samples")[order]
        rows = stream_rows(store, k, labels, desc=f"view {k}", **kwargs)
        splits.append(summarize(f"view {k}", rows, labels, classes, ece=False))
        by_sample = np.empty_like(rows.pred)
        by_sample[order] = rows.pred
        preds.append(by_sample)
        if k == 0:
            auto = mean_row_std(rows.std)
    use_val = val and store.has_val
    if use_val and not store.val_complete().all():
        raise StatsError(f"val/ of cache {store.path} is unfinished: rerun its `skd-cache build` command, "
                         "or pass --no-val")
    if use_val:
        labels = stored_labels(store, "val")
        rows = stream_rows(store, None, labels, desc="val", **kwargs)
        splits.append(summarize("val", rows, labels, classes, ece=True))
    if not splits:
        raise StatsError(f"nothing to do: choose --views (cache {store.path} has {store.num_views})")
    return CacheStats(splits=splits, temperature=temperature, multiplier=multiplier, auto_multiplier=auto,
                      consistency=consistency(preds), consistency_views=chosen if len(chosen) > 1 else [],
                      storage=store.storage())


def stats_lines(s: CacheStats) -> list[str]:
    """`logit_stats`'s answer as text lines."""
    lines = []
    for p in s.splits:
        lines += [
            f"{p.name}: {p.rows:,} rows",
            f"  teacher top-1 {p.top1:.2%}, top-5 {p.top5:.2%} (against the labels)",
            f"  logit std per sample: mean {p.std_mean:.3f}, median {p.std_median:.3f}, "
            f"p5 {p.std_p5:.3f}, p95 {p.std_p95:.3f}",
            f"  softmax(logits): mean max-probability {p.max_prob:.3f}, entropy {p.entropy:.3f} nats"
            + (f", ECE ({ECE_BINS} bins) {p.ece:.4f}" if p.ece is not None else ""),
            f"  SKD target (T={s.temperature:g}, m={s.multiplier:g}): mean max-probability "
            f"{p.target_max_prob:.3f}, entropy {p.target_entropy:.3f} nats",
            "  worst classes: " + ", ".join(f"{w['class']} {w['accuracy']:.0%} of {w['samples']}"
                                            for w in p.worst_classes),
            "  most confused: " + (", ".join(f"{c['true']}->{c['predicted']} {c['count']}" for c in p.confused_pairs)
                                   or "none"),
        ]
    if s.auto_multiplier is not None:
        lines.append(f"suggested SKD multiplier (--multiplier auto): {s.auto_multiplier:.3f}")
    if s.consistency is not None:
        lines.append(f"consistency: {s.consistency:.2%} of samples have the same teacher top-1 in views "
                     f"{', '.join(map(str, s.consistency_views))}")
    st = s.storage
    if st["bytes_per_row"]:
        lines.append(f"storage: {st['bytes_per_row']:,.0f} B per row, compression {st['ratio_vs_fp32']:.2f}x vs "
                     f"float32 rows, {st['ratio_vs_fp16']:.2f}x vs float16")
    return lines


def check_plot_path(path: Path) -> None:
    """Refuse a plot file matplotlib cannot write before any statistics are computed."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise StatsError("--plot needs matplotlib: pip install 'skd[plot]'") from None
    formats = FigureCanvasBase.get_supported_filetypes()
    if Path(path).suffix.lower().lstrip(".") not in formats:
        raise StatsError(f"--plot {path}: name a .png, .pdf or .svg file (matplotlib writes "
                         f"{', '.join(sorted(formats))})")


def plot_stats(s: CacheStats, path: Path) -> Path:
    """Histograms of per-sample std, max-probability and per-class accuracy, one figure, written to `path`."""
    check_plot_path(path)
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state
    fig = Figure(figsize=(15, 4.5), layout="constrained")
    axes = fig.subplots(1, 3)
    panels = [("std", "logit std per sample"), ("max_probs", "max probability, T=1"),
              ("class_accuracy", "teacher top-1 accuracy per class")]
    for ax, (attr, title) in zip(axes, panels):
        for p in s.splits:
            values = getattr(p, attr)
            values = values[np.isfinite(values)]
            ax.hist(values, bins=50, histtype="step", density=True, label=p.name)
        ax.set_title(title)
        ax.set_ylabel("density")
    axes[0].legend()
    try:
        fig.savefig(path, dpi=100)
    except OSError as exc:
        raise StatsError(f"cannot write the plot to {path}: {exc.strerror or exc}") from None
    return Path(path)
