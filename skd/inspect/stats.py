"""What a cache's teacher logits look like (`skd-cache stats`): accuracy, scale, confidence,
calibration.

Each chosen view, and val, is streamed once into per-row figures (skd.inspect.stats_rows); this
module reduces them to each split's figures and writes them as text lines (skd.inspect.stats_plot
draws them as one figure).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from skd.errors import CacheError, OptionError
from skd.inspect.stats_rows import RowStats, augment_accuracy, stream_rows
from skd.plan.mixing import mix_summary, summary_line
from skd.replay.cached_logits import mean_row_std
from skd.store.cache_store import VAL, Store, part_name
from skd.store.codec_table import fidelity_line

ECE_BINS = 15
SHOWN = 10  # worst classes and most confused pairs listed
# per-class bars in the plot: all classes up to this many, else the worst this many
PLOTTED_CLASSES = 30
# crop-area buckets [lower edge, next edge): below 8% counts as 8-25%
AREA_EDGES = (0.25, 0.50, 0.75)
AREA_BUCKETS = ("8-25%", "25-50%", "50-75%", "75-100%")


def expected_calibration_error(
    confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS
) -> float:
    """ECE over equal-width confidence bins (lo, hi]: sum of |accuracy - confidence| weighted by bin
    size."""
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
    class_count: np.ndarray = field(repr=False)  # rows of each class
    # views only: top-1 and max-probability by crop-area bucket
    crop_areas: list[dict] | None = None
    mixing: dict | None = None  # views only: shares of MixUp, CutMix and unmixed rows, mean lambda
    # views only: top-1 on the rows each recorded op touched, worst first
    augment: list[dict] | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not isinstance(v, np.ndarray)}


def crop_area_fraction(box: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """(N,) float64 window area / image area: `box` rows (y, x, h, w), `sizes` rows (height, width)
    of each row's image (a zero-sized image, only in a damaged cache, counts as one pixel)."""
    box, sizes = box.astype(np.float64), sizes.astype(np.float64)
    return box[:, 2] * box[:, 3] / np.maximum(sizes[:, 0] * sizes[:, 1], 1.0)


def crop_area_buckets(area: np.ndarray, correct: np.ndarray, max_prob: np.ndarray) -> list[dict]:
    """Teacher top-1 and mean max-probability of the rows in each AREA_BUCKETS bucket (None where
    empty).

    Small crops show less of the object: the teacher's accuracy there says how much its targets can
    teach.
    """
    which = np.digitize(area, AREA_EDGES)
    out = []
    for i, bucket in enumerate(AREA_BUCKETS):
        inside = which == i
        n = int(inside.sum())
        out.append(
            {
                "bucket": bucket,
                "rows": n,
                "top1": float(correct[inside].mean()) if n else None,
                "max_prob": float(max_prob[inside].mean()) if n else None,
            }
        )
    return out


def split_summary(
    name: str,
    rows: RowStats,
    labels: np.ndarray,
    classes: list[str],
    *,
    ece: bool,
    area: np.ndarray | None = None,
) -> SplitStats:
    """Reduce one split's RowStats to the reported figures; `area` (views): each row's crop-area
    fraction."""
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
        name=name,
        rows=len(labels),
        top1=float(correct.mean()),
        top5=float((rows.above < 5).mean()),
        std_mean=float(rows.std.mean()),
        std_median=float(median),
        std_p5=float(p5),
        std_p95=float(p95),
        max_prob=float(rows.max_prob.mean()),
        entropy=float(rows.entropy.mean()),
        target_max_prob=float(rows.target_max_prob.mean()),
        target_entropy=float(rows.target_entropy.mean()),
        ece=expected_calibration_error(rows.max_prob, correct) if ece else None,
        worst_classes=[
            {
                "class": class_name(classes, int(i)),
                "accuracy": float(accuracy[i]),
                "samples": int(count[i]),
            }
            for i in worst
        ],
        confused_pairs=[
            {
                "true": class_name(classes, int(i // width)),
                "predicted": class_name(classes, int(i % width)),
                "count": int(pairs[i]),
                "fraction_of_true": float(pairs[i] / count[i // width]),
            }
            for i in top
        ],
        std=rows.std.astype(np.float32),
        max_probs=rows.max_prob.astype(np.float32),
        class_accuracy=accuracy,
        class_count=count,
        crop_areas=None if area is None else crop_area_buckets(area, correct, rows.max_prob),
    )


def consistency(preds_by_sample: list[np.ndarray]) -> float | None:
    """Fraction of samples whose top-1 class is the same in every view (None for fewer than two
    views)."""
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
    cache: str = ""  # the store's path
    classes: list[str] = field(default_factory=list, repr=False)  # names for the plot, not the JSON

    def to_json(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("splits", "classes")}
        out["splits"] = [s.to_json() for s in self.splits]
        return out


def stored_labels(store: Store, split: str) -> np.ndarray:
    """Class index of each sample of `samples` or `val` (Store.split also checks every path: 15 us
    each)."""
    return store.group[f"{split}/label"][:].astype(np.int64)


def choose_views(store: Store, views: list[int] | None) -> list[int]:
    """The views to stream (None: all), checked against the cache: each must exist and be
    complete."""
    chosen = list(range(store.num_views)) if views is None else list(dict.fromkeys(views))
    bad = [k for k in chosen if not 0 <= k < store.num_views]
    if bad:
        raise OptionError(
            f"cache {store.path} has views 0-{store.num_views - 1}, not {', '.join(map(str, bad))}"
        )
    complete = store.complete()
    unfinished = [k for k in chosen if not complete[k].all()]
    if unfinished:
        raise CacheError(
            f"views {', '.join(map(str, unfinished))} of cache {store.path} are unfinished: rerun its "
            "`skd-cache build` command, or pick complete views with --views (see `skd-cache info`)"
        )
    return chosen


def logit_stats(
    store: Store,
    views: list[int] | None = (0,),
    *,
    val: bool = True,
    temperature: float = 4.0,
    multiplier: float = 2.0,
    progress: bool = False,
) -> CacheStats:
    """Stream the chosen views (None: all) and, with `val`, val/ once each; summarise the teacher's
    logits."""
    if temperature <= 0 or multiplier <= 0:
        raise OptionError(
            f"temperature and multiplier must be positive, got {temperature} and {multiplier}"
        )
    chosen = choose_views(store, None if views is None else list(views))
    classes = list(store.meta["dataset"].get("classes", []))
    kwargs = dict(temperature=temperature, multiplier=multiplier, progress=progress)
    splits, preds, auto = [], [], None
    sizes = store.group["samples/size"][:] if chosen else None  # (N, 2) height, width by sample id
    for k in chosen:
        order, box, _ = store.view_plan(k)
        order = order.astype(np.int64)
        labels = stored_labels(store, "samples")[order]
        rows = stream_rows(store, k, labels, desc=part_name(k), **kwargs)
        area = crop_area_fraction(box, sizes[order])
        splits.append(split_summary(part_name(k), rows, labels, classes, ece=False, area=area))
        splits[-1].mixing = mix_summary(*store.view_mix(k))
        splits[-1].augment = augment_accuracy(
            store.view_augment(k), store.augment_params.ops, rows.pred == labels
        )
        by_sample = np.empty_like(rows.pred)
        by_sample[order] = rows.pred
        preds.append(by_sample)
        if k == 0:
            auto = mean_row_std(rows.std)
    use_val = val and store.has_val
    if use_val and not store.val_complete().all():
        raise CacheError(
            f"val/ of cache {store.path} is unfinished: rerun its `skd-cache build` command, or pass --no-val"
        )
    if use_val:
        labels = stored_labels(store, "val")
        rows = stream_rows(store, VAL, labels, desc=part_name(VAL), **kwargs)
        splits.append(split_summary(part_name(VAL), rows, labels, classes, ece=True))
    if not splits:
        raise OptionError(
            f"nothing to do: choose --views (cache {store.path} has {store.num_views})"
        )
    return CacheStats(
        splits=splits,
        temperature=temperature,
        multiplier=multiplier,
        auto_multiplier=auto,
        consistency=consistency(preds),
        consistency_views=chosen if len(chosen) > 1 else [],
        storage={
            **store.storage(),
            "codec": store.codec.name,
            "codec_fidelity": store.meta.get("codec_fidelity"),
        },
        cache=str(store.path),
        classes=classes,
    )


def op_figure(row: dict) -> str:
    return f"{row['op']} {row['top1']:.1%} ({row['rows']:,})"


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
            "  worst classes: "
            + ", ".join(
                f"{w['class']} {w['accuracy']:.0%} of {w['samples']}" for w in p.worst_classes
            ),
            "  most confused: "
            + (
                ", ".join(f"{c['true']}->{c['predicted']} {c['count']}" for c in p.confused_pairs)
                or "none"
            ),
        ]
        if p.crop_areas is not None:
            lines.append(
                "  by crop area: "
                + ", ".join(
                    f"{b['bucket']} top-1 {b['top1']:.1%} (p {b['max_prob']:.2f}, {b['rows']:,} rows)"
                    if b["rows"]
                    else f"{b['bucket']} no rows"
                    for b in p.crop_areas
                )
            )
        if p.mixing is not None:
            lines.append(
                f"  mixing: {summary_line(p.mixing)} (the teacher's logits are of the mixed images)"
            )
        if p.augment:
            shown = [a for a in p.augment if a["rows"]]
            lines.append(
                "  top-1 by recorded op, worst first: " + ", ".join(op_figure(a) for a in shown)
            )
    if s.auto_multiplier is not None:
        lines.append(f"suggested SKD multiplier (--multiplier auto): {s.auto_multiplier:.3f}")
    if s.consistency is not None:
        lines.append(
            f"consistency: {s.consistency:.2%} of samples have the same teacher top-1 in views "
            f"{', '.join(map(str, s.consistency_views))}"
        )
    st = s.storage
    if st["bytes_per_row"]:
        lines.append(
            f"storage: {st['bytes_per_row']:,.0f} B per row, compression {st['ratio_vs_fp32']:.2f}x vs "
            f"float32 rows, {st['ratio_vs_fp16']:.2f}x vs float16"
        )
        lines.append(f"codec: {st['codec']}, {fidelity_line(st['codec_fidelity'])}")
    return lines
