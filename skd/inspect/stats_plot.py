"""`skd-cache stats --plot`: a cache's statistics as one figure that reads without the source."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from skd.errors import DeviceError, OptionError
from skd.inspect.stats import AREA_BUCKETS, PLOTTED_CLASSES, CacheStats, class_name


def check_plot_path(path: Path) -> None:
    """Refuse a plot file matplotlib cannot write before any statistics are computed."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise DeviceError("--plot needs matplotlib: pip install 'skd[plot]'") from None
    formats = FigureCanvasBase.get_supported_filetypes()
    if Path(path).suffix.lower().lstrip(".") not in formats:
        raise OptionError(
            f"--plot {path}: name a .png, .pdf or .svg file (matplotlib writes {', '.join(sorted(formats))})"
        )


def plot_stats(s: CacheStats, path: Path) -> Path:
    """One figure, written to `path`, that reads without the source: per-class top-1 as labelled
    bars, top-1 by crop area, and histograms of per-row logit std and max-probability, under a title
    naming the cache and its rows."""
    check_plot_path(path)
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state
    from matplotlib.ticker import PercentFormatter

    fig = Figure(figsize=(16, 10), layout="constrained")
    grid = fig.add_gridspec(3, 2, width_ratios=(1, 1.1))
    rows = "; ".join(f"{p.name}: {p.rows:,} rows" for p in s.splits)
    fig.suptitle(
        f"skd-cache stats of {Path(s.cache).name or 'the cache'} (teacher logits; {rows})",
        fontsize=14,
    )
    _plot_classes(fig.add_subplot(grid[:, 0]), s, PercentFormatter(1.0))
    for row, (attr, title, unit) in enumerate(
        [
            ("std", "logit std per row", "std over classes"),
            ("max_probs", "max probability per row, T=1", "max softmax(logits)"),
        ]
    ):
        ax = fig.add_subplot(grid[row, 1])
        for p in s.splits:
            values = getattr(p, attr)
            ax.hist(
                values[np.isfinite(values)], bins=50, histtype="step", density=True, label=p.name
            )
        ax.set(title=title, xlabel=unit, ylabel="density of rows")
        ax.legend()
    _plot_crop_areas(fig.add_subplot(grid[2, 1]), s, PercentFormatter(1.0))
    try:
        fig.savefig(path, dpi=100)
    except OSError as exc:
        raise DeviceError(f"cannot write the plot to {path}: {exc.strerror or exc}") from None
    return Path(path)


def _plot_classes(ax, s: CacheStats, percent) -> None:
    """Horizontal bars of per-class top-1 on val (else the first view), worst at the top, each
    labelled with the class name and its rows; beyond PLOTTED_CLASSES classes only the worst are
    shown."""
    p = next((p for p in s.splits if p.name == "val"), s.splits[0])
    present = np.flatnonzero(p.class_count)
    shown = present[np.lexsort((present, p.class_accuracy[present]))][:PLOTTED_CLASSES]
    which = (
        f"all {len(present)} classes"
        if len(shown) == len(present)
        else f"worst {len(shown)} of {len(present)} classes"
    )
    y = np.arange(len(shown))
    ax.barh(y, p.class_accuracy[shown], color="tab:blue")
    ax.set_yticks(
        y, [f"{class_name(s.classes, int(i))} ({p.class_count[i]:,} rows)" for i in shown]
    )
    ax.invert_yaxis()
    for yi, i in zip(y, shown):
        ax.annotate(
            f"{p.class_accuracy[i]:.0%}",
            (p.class_accuracy[i], yi),
            xytext=(3, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
        )
    ax.set(
        xlim=(0, 1.08),
        xlabel="teacher top-1 against the labels",
        title=f"teacher top-1 per class on {p.name}: {which}, worst first",
    )
    ax.xaxis.set_major_formatter(percent)


def _plot_crop_areas(ax, s: CacheStats, percent) -> None:
    """Grouped bars of teacher top-1 by crop-area bucket, one bar per view, labelled with the
    rows."""
    views = [p for p in s.splits if p.crop_areas is not None]
    x = np.arange(len(AREA_BUCKETS))
    ax.set(
        title="teacher top-1 by crop area of the recorded windows",
        ylabel="teacher top-1",
        ylim=(0, 1.15),
        xlabel=f"window area / image area (below 8% counted as {AREA_BUCKETS[0]})",
    )
    ax.set_xticks(x, AREA_BUCKETS)
    ax.yaxis.set_major_formatter(percent)
    if not views:
        ax.text(
            0.5,
            0.5,
            "no views streamed (--views)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
        return
    width = 0.8 / len(views)
    for j, p in enumerate(views):
        top1 = [b["top1"] or 0.0 for b in p.crop_areas]
        bars = ax.bar(x + (j - (len(views) - 1) / 2) * width, top1, width, label=p.name)
        if len(views) <= 4:
            ax.bar_label(
                bars,
                [
                    f"{t:.0%}\n{b['rows']:,} rows" if b["rows"] else "no rows"
                    for t, b in zip(top1, p.crop_areas)
                ],
                fontsize=7,
            )
    ax.legend()
