"""Stored rows replayed through the recorded teacher (`skd-cache verify`'s logits check).

A random subset of rows of the complete shards is drawn, the teacher is run on their recorded views
(windows, flips, mixing, loader and AMP as the build used them), and its outputs are compared with
the stored logits after the layer norm the SKD loss applies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from skd.errors import CacheError, ModelError
from skd.inspect.verify_checks import first_line
from skd.loss import skd_kl, spherical_normalize
from skd.models.teachers import forward
from skd.replay.sources import ReplaySource
from skd.store.cache_store import VAL, Store, View, part_name
from skd.store.schema import check_relative_path

TEMPERATURE, MULTIPLIER = 4.0, 2.0  # of the reported KL, as in DESIGN's codec table


@dataclass
class Comparison:
    """How the re-computed logits compare with the stored ones (differences after the layer norm,
    m=1)."""

    rows: int
    rows_per_split: dict
    max_abs_diff: float
    mean_abs_diff: float
    kl_mean: float  # KL(re-computed || stored) of softmax(layer_norm * 2 / 4), no T^2 factor
    kl_max: float
    top1_agreement: float
    differing_rows: int


def sample_rows(store: Store, count: int, seed: int) -> dict:
    """{view or VAL: sorted positions}: `count` rows drawn without replacement from the complete
    shards."""
    ranges = store.complete_ranges()
    sizes = np.array([b - a for _, _, a, b in ranges], np.int64)
    if not sizes.sum():
        raise CacheError(
            f"cache {store.path} has no complete shard to verify: run its `skd-cache build` command"
        )
    picks = np.sort(
        np.random.default_rng(seed).choice(
            int(sizes.sum()), min(count, int(sizes.sum())), replace=False
        )
    )
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    which = np.searchsorted(offsets, picks, side="right") - 1
    out: dict = {}
    for i, pick in zip(which, picks):
        view, _, start, _ = ranges[i]
        out.setdefault(view, []).append(start + pick - offsets[i])
    return {view: np.array(pos, np.int64) for view, pos in out.items()}


@dataclass
class SampledRows:
    """Sampled positions of one view (or val), in order, with the sample file and the recorded image
    size (height, width) of each: what the data check opens and a differing row is named by."""

    positions: np.ndarray
    paths: list[str]
    sizes: np.ndarray
    # the files' recorded tail digests (skd.data.index.tail_digest), where recorded
    tails: np.ndarray | None = None

    def take(self, keep: list[int]) -> "SampledRows":
        tails = None if self.tails is None else self.tails[keep]
        return SampledRows(
            self.positions[keep], [self.paths[i] for i in keep], self.sizes[keep], tails
        )


def plan_rows(store: Store, view: View, positions: np.ndarray) -> SampledRows:
    """The sample behind each position of `view` (a view, or VAL) as recorded, its path checked."""
    if view == VAL:
        split, ids = "val", positions
    else:
        split, ids = "samples", store.view_plan(view)[0][positions].astype(np.int64)
    group = store.group[split]
    # one read, not one per row
    paths = [str(p) for p in group["path"].get_orthogonal_selection(ids)]
    for p in paths:
        check_relative_path(p, store.path)
    tails = group["tail"].get_orthogonal_selection(ids) if "tail" in group else None
    return SampledRows(
        positions, paths, group["size"].get_orthogonal_selection((ids, slice(None))), tails
    )


def replay_teacher(
    model,
    source: ReplaySource,
    view: View,
    positions: np.ndarray,
    *,
    batch_size: int,
    workers: int,
    device: torch.device,
    amp: str,
    bar,
) -> torch.Tensor:
    """The teacher's float32 logits of the recorded views at `positions` of `view` (a view, or VAL),
    in order.

    A mixed view's row is its image mixed with its partner's (position p XOR 1): whole pairs are
    replayed.
    """
    wanted = np.asarray(positions)
    if view != VAL and source.mix is not None:
        n = len(source.train.paths)
        positions = np.unique(np.concatenate([wanted & ~1, np.minimum(wanted | 1, n - 1)]))
        batch_size += batch_size % 2
    out = []
    for batch in source.loader(
        view, positions, batch_size=batch_size, workers=workers, device=device
    ):
        out.append(forward(model, batch.images, device, amp).cpu())
        bar.update(int(np.isin(batch.positions.numpy(), wanted).sum()))
    logits = torch.cat(out) if out else torch.zeros(0)
    return logits[torch.from_numpy(np.searchsorted(positions, wanted))] if len(logits) else logits


def stored_rows(
    store: Store, view: View, positions: np.ndarray
) -> tuple[torch.Tensor, dict[int, str]]:
    """Stored logits of the positions (NaN where unreadable) and {shard: error} of shards that fail
    to decode."""
    out = np.full((len(positions), store.num_classes), np.nan, np.float32)
    broken: dict[int, str] = {}
    for i, p in enumerate(positions):
        shard = int(p) // store.shard_rows
        if shard in broken:
            continue
        try:
            out[i] = store.read_logits(view, int(p), int(p) + 1)[0]
        except Exception as exc:  # zarr and numcodecs raise many kinds on damaged bytes
            broken[shard] = first_line(exc)
    return torch.from_numpy(out), broken


def compare_logits(new: torch.Tensor, stored: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-row |difference| of layer-normalised logits (max, mean), KL at T=4/m=2, top-1 agreement.

    In float64, so that a damaged stored value (1e36) still normalises; a row that does not gets KL
    inf.
    """
    a, b = (spherical_normalize(x, 1.0, torch.float64) for x in (new, stored))
    diff = (a - b).abs()
    kl = skd_kl(new, stored, multiplier=MULTIPLIER, temperature=TEMPERATURE, dtype=torch.float64)
    kl = torch.where(torch.isfinite(kl) & torch.isfinite(b).all(1), kl, torch.inf)
    return {
        "max": diff.amax(1),
        "mean": diff.mean(1),
        "kl": kl,
        "agree": new.argmax(1) == stored.argmax(1),
    }


@dataclass
class Replay:
    """One split's compared rows: figures per row, the rows over tolerance and the shards that fail
    to decode."""

    figures: dict
    differing: list[str]
    broken: list[str]


def replay_split(
    store: Store,
    view: View,
    rows: SampledRows,
    model,
    source: ReplaySource,
    tolerance: float,
    bar,
    **options,
) -> Replay:
    """Run the teacher on the rows' recorded views and compare with the stored rows."""
    new = replay_teacher(model, source, view, rows.positions, bar=bar, **options)
    if new.shape[1] != store.num_classes:
        raise ModelError(
            f"the re-created teacher gives {new.shape[1]} classes, cache {store.path} holds "
            f"{store.num_classes}"
        )
    stored, broken = stored_rows(store, view, rows.positions)
    keep = ~np.isin(rows.positions // store.shard_rows, list(broken))
    figures = compare_logits(new[torch.from_numpy(keep)], stored[torch.from_numpy(keep)])
    label = part_name(view)
    over = np.flatnonzero(keep)[(figures["kl"] > tolerance).numpy()]
    return Replay(
        figures,
        [
            f"{label} shard {rows.positions[i] // store.shard_rows} row {rows.positions[i]} ({rows.paths[i]})"
            for i in over
        ],
        [f"{label} shard {shard}: {error}" for shard, error in broken.items()],
    )


def summarize_comparison(replays: dict[str, Replay], tolerance: float) -> Comparison | None:
    """The figures of every replayed split together (None when no row was compared)."""
    figures = [r.figures for r in replays.values() if len(r.figures["kl"])]
    if not figures:
        return None
    cat = {k: torch.cat([f[k] for f in figures]) for k in figures[0]}
    finite = torch.isfinite(cat["kl"])
    kl = cat["kl"][finite] if finite.any() else torch.full((1,), float("inf"))
    return Comparison(
        rows=len(cat["kl"]),
        rows_per_split={k: len(r.figures["kl"]) for k, r in replays.items()},
        max_abs_diff=float(cat["max"].max()),
        mean_abs_diff=float(cat["mean"].mean()),
        kl_mean=float(kl.mean()),
        kl_max=float(kl.max()),
        top1_agreement=float(cat["agree"].float().mean()),
        differing_rows=int((cat["kl"] > tolerance).sum()),
    )
