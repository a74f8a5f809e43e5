"""Checking a cache against its data and teacher (`skd-cache verify`).

The data (file list and sizes, decoded image sizes) and the weights (sha256) are checked first, so a
mismatch is named by its cause. Then the recorded teacher is re-created and run on a random subset of
stored rows, replayed through the recorded windows, flips, loader and AMP, and its outputs are compared
with the stored logits after the layer norm the SKD loss applies. `integrity` also reads every chunk.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .errors import SkdError
from .index import image_size, quick_fingerprints, scan_split
from .loss import LAYER_NORM_EPS
from .replay import ReplaySource, cached_source, teacher_recipe, warn_other_loader
from .runtime import Dist, place, resolve_device
from .schema import check_relative_path
from .store import Store, StoreError
from .teachers import forward, load_teacher

TEMPERATURE, MULTIPLIER = 4.0, 2.0  # of the reported KL, as in DESIGN's codec table
TOLERANCE = 1e-2  # KL per row above which it differs: int8 rounding gives ~1e-5, other weights ~0.1 and more
NAMED = 5  # files, rows or chunks named in a message; the rest are counted


class VerifyError(SkdError):
    """A cache that cannot be verified as asked: one line saying what to pass."""


@dataclass
class Check:
    """One verdict: what was checked and found, and for a failure its cause in a few words."""

    name: str  # data, weights, logits, integrity
    ok: bool
    detail: str
    cause: str | None = None  # different data, different weights, corrupted shard, teacher outputs differ


@dataclass
class Comparison:
    """How the re-computed logits compare with the stored ones (differences after the layer norm, m=1)."""

    rows: int
    rows_per_split: dict
    max_abs_diff: float
    mean_abs_diff: float
    kl_mean: float  # KL(re-computed || stored) of softmax(layer_norm * 2 / 4), no T^2 factor
    kl_max: float
    top1_agreement: float
    differing_rows: int


@dataclass
class VerifyReport:
    """Every check's verdict; the cache matches when all passed."""

    cache: str
    checks: list[Check]
    comparison: Comparison | None

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def cause(self) -> str:
        return ", ".join(dict.fromkeys(c.cause for c in self.checks if not c.ok))

    def to_json(self) -> dict:
        return {
            "cache": self.cache,
            "ok": self.ok,
            "checks": [asdict(c) for c in self.checks],
            "comparison": asdict(self.comparison) if self.comparison else None,
        }


def report_lines(report: VerifyReport) -> list[str]:
    """One line per check: name, verdict, cause and what was found."""
    return [
        f"{c.name:<10} {'ok' if c.ok else 'FAILED':<7} {c.cause + ': ' if c.cause else ''}{c.detail}"
        for c in report.checks
    ]


def _named(items: list[str]) -> str:
    more = f" and {len(items) - NAMED} more" if len(items) > NAMED else ""
    return ", ".join(items[:NAMED]) + more


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


def split_label(view: int | None) -> str:
    return "val" if view is None else f"view {view}"


# ---------------------------------------------------------------------------------------------
# Data and weights


def recorded_paths(store: Store, split: str) -> list[str]:
    """The stored sample paths, unchecked: only the ones opened go through check_relative_path."""
    return [str(p) for p in store.group[f"{split}/path"][:]]


def check_data(store: Store, root: Path) -> Check:
    """Compare the dataset's file list and file sizes with the fingerprints the cache recorded."""
    if not (root / "train").is_dir():
        raise VerifyError(
            f"dataset {root} has no train/ folder: pass --data ROOT where cache {store.path}'s images live"
        )
    skipped = store.meta["dataset"].get("skipped", [])  # files a `--on-bad-image skip` build left out
    found = quick_fingerprints(root, store.has_val, skipped)
    recorded = (store.meta["dataset"]["fingerprint"], store.meta["dataset"].get("val_fingerprint"))
    left_out = {path for path, _ in skipped}
    problems = []
    for split, name, now, then in (("train", "samples", found[0], recorded[0]), ("val", "val", found[1], recorded[1])):
        if now == then or (split == "val" and not store.has_val):
            continue
        if now is None:
            problems.append(f"{root}/val is missing")
            continue
        before = recorded_paths(store, name)
        current = [p for p in scan_split(root, split, empty=[])[0] if p not in left_out]
        missing, extra = sorted(set(before) - set(current)), sorted(set(current) - set(before))
        if missing:
            problems.append(f"{len(missing)} of the cache's {split} files are missing under {root} ({_named(missing)})")
        if extra:
            problems.append(f"{root}/{split} has {len(extra)} files the cache does not know ({_named(extra)})")
        if not missing and not extra:
            problems.append(f"files under {root}/{split} changed size since the build (the same {len(before):,} names)")
    if problems:
        return Check("data", False, "; ".join(problems), "different data")
    return Check("data", True, f"{root}: file list and sizes match the cache's fingerprints")


def teacher_weights(store: Store, override: str | None) -> str | None:
    """The `weights` argument of load_teacher that re-creates the cache's teacher."""
    recorded = store.meta["teacher"]["weights"]
    if override is not None:
        return override
    if recorded == "none":
        raise VerifyError(
            f"cache {store.path} was built with --weights none (random weights that were not "
            "saved): its teacher cannot be re-created, so it cannot be verified"
        )
    if recorded in ("torchvision-default", "py"):
        return None
    if not Path(recorded).is_file():
        raise VerifyError(
            f"the teacher weights {recorded} recorded by cache {store.path} are not there: pass --weights FILE"
        )
    return recorded


def check_weights(store: Store, teacher) -> Check:
    """Compare the re-created teacher's weights (a sha256 of its tensors) with the one the cache recorded."""
    then = store.meta["teacher"].get("weights_sha256")
    now = teacher.weights_sha256
    if now != then:
        now = now or "no file"
        return Check(
            "weights",
            False,
            f"{teacher.weights} has sha256 {now[:16]}, cache {store.path} was built with {(then or 'no file')[:16]}",
            "different weights",
        )
    return Check(
        "weights",
        True,
        f"{teacher.name} from {teacher.weights}" + (f", sha256 {then[:16]} as recorded" if then else ""),
    )


# ---------------------------------------------------------------------------------------------
# Replaying rows


def complete_ranges(store: Store) -> list[tuple[int | None, int, int, int]]:
    """(view or None for val, shard, first row, end row) of every complete shard."""
    out = []
    for view, done in enumerate(store.complete()):
        out += [(view, int(j), *store.shard_bounds(int(j), store.num_samples)) for j in np.flatnonzero(done)]
    out += [(None, int(j), *store.shard_bounds(int(j), store.num_val)) for j in np.flatnonzero(store.val_complete())]
    return out


def sample_rows(store: Store, count: int, seed: int) -> dict:
    """{view or None: sorted positions}: `count` rows drawn without replacement from the complete shards."""
    ranges = complete_ranges(store)
    sizes = np.array([b - a for _, _, a, b in ranges], np.int64)
    if not sizes.sum():
        raise VerifyError(f"cache {store.path} has no complete shard to verify: run its `skd-cache build` command")
    picks = np.sort(np.random.default_rng(seed).choice(int(sizes.sum()), min(count, int(sizes.sum())), replace=False))
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    which = np.searchsorted(offsets, picks, side="right") - 1
    out: dict = {}
    for i, pick in zip(which, picks):
        view, _, start, _ = ranges[i]
        out.setdefault(view, []).append(start + pick - offsets[i])
    return {view: np.array(pos, np.int64) for view, pos in out.items()}


@dataclass
class Rows:
    """What a split's sampled positions replay: sample files and recorded windows, in position order."""

    positions: np.ndarray
    paths: list[str]
    sizes: np.ndarray
    boxes: np.ndarray
    flips: np.ndarray
    labels: np.ndarray

    def take(self, keep: list[int]) -> "Rows":
        return Rows(
            self.positions[keep],
            [self.paths[i] for i in keep],
            self.sizes[keep],
            self.boxes[keep],
            self.flips[keep],
            self.labels[keep],
        )


def plan_rows(store: Store, view: int | None, positions: np.ndarray) -> Rows:
    split = "val" if view is None else "samples"
    if view is None:
        ids, boxes, flips = positions, store.val_boxes()[positions], np.zeros(len(positions), np.uint8)
    else:
        order, box, flip = store.view_plan(view)
        ids, boxes, flips = order[positions].astype(np.int64), box[positions], flip[positions]
    g = store.group[split]
    paths = [str(p) for p in g["path"].get_orthogonal_selection(ids)]  # one read, not one per row
    for p in paths:
        check_relative_path(p, store.path)
    return Rows(
        positions,
        paths,
        g["size"].get_orthogonal_selection((ids, slice(None))),
        boxes,
        flips,
        g["label"].get_orthogonal_selection(ids).astype(np.int64),
    )


def size_problems(root: Path, rows: Rows) -> dict[int, str]:
    """{row index: problem} for sampled files that are missing or whose decoded size is not the recorded one."""
    problems = {}
    for i, (path, size) in enumerate(zip(rows.paths, rows.sizes)):
        try:
            now = image_size(root / path)
        except Exception as exc:  # missing or unreadable: this file's problem, reported with the others
            problems[i] = f"{path} cannot be read ({_first_line(exc)})"
            continue
        if tuple(now) != tuple(int(v) for v in size):
            problems[i] = f"{path} is now {now[0]}x{now[1]}, the cache recorded {size[0]}x{size[1]}"
    return problems


def run_teacher(
    model,
    source: ReplaySource,
    view: int | None,
    positions: np.ndarray,
    *,
    batch_size: int,
    workers: int,
    device: torch.device,
    amp: str,
    bar,
) -> torch.Tensor:
    """The teacher's float32 logits of the recorded views at `positions` of `view` (None: val), in order.

    A mixed view's row is its image mixed with its partner's (position p XOR 1): whole pairs are replayed.
    """
    wanted = np.asarray(positions)
    if view is not None and source.mix is not None:
        n = len(source.train.paths)
        positions = np.unique(np.concatenate([wanted & ~1, np.minimum(wanted | 1, n - 1)]))
        batch_size += batch_size % 2
    out = []
    for batch in source.loader(view, positions, batch_size=batch_size, workers=workers, device=device):
        out.append(forward(model, batch.images, device, amp).cpu())
        bar.update(int(np.isin(batch.positions.numpy(), wanted).sum()))
    logits = torch.cat(out) if out else torch.zeros(0)
    return logits[torch.from_numpy(np.searchsorted(positions, wanted))] if len(logits) else logits


def stored_rows(store: Store, view: int | None, positions: np.ndarray) -> tuple[torch.Tensor, dict[int, str]]:
    """Stored logits of the positions (NaN where unreadable) and {shard: error} of shards that fail to decode."""
    out = np.full((len(positions), store.num_classes), np.nan, np.float32)
    broken: dict[int, str] = {}
    for i, p in enumerate(positions):
        shard = int(p) // store.shard_rows
        if shard in broken:
            continue
        try:
            out[i] = store.read_logits(view, int(p), int(p) + 1)[0]
        except Exception as exc:  # zarr and numcodecs raise many kinds on damaged bytes
            broken[shard] = _first_line(exc)
    return torch.from_numpy(out), broken


def compare(new: torch.Tensor, stored: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-row |difference| of layer-normalised logits (max, mean), KL at T=4/m=2, top-1 agreement.

    In float64, so that a damaged stored value (1e36) still normalises; a row that does not gets KL inf.
    """
    a, b = (F.layer_norm(x.double(), x.shape[-1:], eps=LAYER_NORM_EPS) for x in (new, stored))
    diff = (a - b).abs()
    log_p = F.log_softmax(a * MULTIPLIER / TEMPERATURE, dim=1)
    log_q = F.log_softmax(b * MULTIPLIER / TEMPERATURE, dim=1)
    kl = (log_p.exp() * (log_p - log_q)).sum(1).clamp_min(0.0)  # rounding makes equal rows a hair negative
    kl = torch.where(torch.isfinite(kl) & torch.isfinite(b).all(1), kl, torch.inf)
    return {"max": diff.amax(1), "mean": diff.mean(1), "kl": kl, "agree": new.argmax(1) == stored.argmax(1)}


# ---------------------------------------------------------------------------------------------
# Integrity


def check_integrity(store: Store, progress: bool = False) -> Check:
    """Read every array, and every chunk of every complete shard; name the shards whose files are missing
    and the chunks that fail to decode or hold non-finite logits."""
    ranges = complete_ranges(store)
    chunk = int(store.meta.get("chunk_rows") or store.shard_rows)
    bad = [f"{name} ({_first_line(exc)})" for name, exc in unreadable_arrays(store)]
    for view, shard, start, stop in tqdm(ranges, desc="integrity", unit="shard", disable=not progress):
        missing = store.missing_shard_files(view, shard)
        if missing:
            names = ", ".join(str(f.relative_to(store.path)) for f in missing)
            bad.append(f"{split_label(view)} shard {shard} (missing {names})")
            continue
        for a in range(start, stop, chunk):
            b = min(stop, a + chunk)
            where = f"{split_label(view)} shard {shard} rows {a}-{b - 1}"
            try:
                logits = store.read_logits(view, a, b)
            except Exception as exc:  # zarr and numcodecs raise many kinds on damaged bytes
                bad.append(f"{where} ({_first_line(exc)})")
                continue
            if not np.isfinite(logits).all():
                bad.append(f"{where} (non-finite logits)")
    if bad:
        return Check("integrity", False, f"damaged or missing ({len(bad)}): {_named(bad)}", "corrupted shard")
    return Check("integrity", True, f"{len(ranges)} complete shards read, every chunk decodes to finite logits")


def unreadable_arrays(store: Store) -> list[tuple[str, Exception]]:
    """(name, error) of every array besides the logits (plan, samples, flags) that fails to read."""
    out = []
    for prefix in ("samples", "views", "val"):
        if prefix not in store.group:
            continue
        for name, array in store.group[prefix].arrays():
            if name in ("logits", "scale", "offset"):
                continue
            try:
                array[...]
            except Exception as exc:  # zarr and numcodecs raise many kinds on damaged bytes
                out.append((f"{prefix}/{name}", exc))
    return out


# ---------------------------------------------------------------------------------------------
# The whole check


class ClassCountMismatch(Exception):
    """The re-created teacher gives another number of classes than the cache holds."""


@dataclass
class Replay:
    """One split's compared rows: figures per row, the rows over tolerance and the shards that fail to decode."""

    figures: dict
    differing: list[str]
    broken: list[str]


def replay(
    store: Store, view: int | None, rows: Rows, model, source: ReplaySource, tolerance: float, bar, **options
) -> Replay:
    """Run the teacher on the rows' recorded views and compare with the stored rows."""
    new = run_teacher(model, source, view, rows.positions, bar=bar, **options)
    if new.shape[1] != store.num_classes:
        raise ClassCountMismatch(new.shape[1])
    stored, broken = stored_rows(store, view, rows.positions)
    keep = ~np.isin(rows.positions // store.shard_rows, list(broken))
    figures = compare(new[torch.from_numpy(keep)], stored[torch.from_numpy(keep)])
    label = split_label(view)
    over = np.flatnonzero(keep)[(figures["kl"] > tolerance).numpy()]
    return Replay(
        figures,
        [
            f"{label} shard {rows.positions[i] // store.shard_rows} row {rows.positions[i]} ({rows.paths[i]})"
            for i in over
        ],
        [f"{label} shard {shard}: {error}" for shard, error in broken.items()],
    )


def verify_cache(
    store: Store,
    *,
    data: Path | None = None,
    weights: str | None = None,
    samples: int = 256,
    loader: str | None = None,
    device: str = "cpu",
    batch_size: int = 64,
    workers: int = 2,
    seed: int = 0,
    tolerance: float = TOLERANCE,
    integrity: bool = False,
    progress: bool = False,
) -> VerifyReport:
    """Check the data, the weights and `samples` random stored rows of the cache (and every chunk with
    `integrity`); the report says which check failed and why."""
    meta = store.meta
    root = Path(data or meta["dataset"]["root"])
    dev = resolve_device(device, Dist())
    data_check = check_data(store, root)
    teacher = load_teacher(meta["teacher"]["name"], teacher_weights(store, weights))
    weights_check = check_weights(store, teacher)
    integrity_check = check_integrity(store, progress) if integrity else None
    try:
        plans = {view: plan_rows(store, view, pos) for view, pos in sample_rows(store, samples, seed).items()}
        warn_other_loader(loader, store)
        source = cached_source(store, recipe=teacher_recipe(store), root=root, loader=loader)
    except StoreError:
        if integrity_check is None or integrity_check.ok:
            raise
        return VerifyReport(str(store.path), [data_check, weights_check, integrity_check], None)
    problems = {view: size_problems(root, rows) for view, rows in plans.items()}
    named = sorted({p for found in problems.values() for p in found.values()})
    if named:
        note = f"sampled files that changed ({len(named)}): {_named(named)}"
        data_check = Check(
            "data", False, f"{data_check.detail}; {note}" if not data_check.ok else note, "different data"
        )
    options = dict(batch_size=batch_size, workers=workers, device=dev, amp=meta["teacher"]["amp"])
    model = place(teacher.model, dev)
    replays, total = {}, sum(len(r.positions) - len(problems[v]) for v, r in plans.items())
    with tqdm(total=total, desc="verify", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        try:
            for view, rows in plans.items():
                keep = [i for i in range(len(rows.positions)) if i not in problems[view]]
                if keep:
                    replays[split_label(view)] = replay(
                        store, view, rows.take(keep), model, source, tolerance, bar, **options
                    )
        except ClassCountMismatch as exc:
            weights_check = Check(
                "weights",
                False,
                f"the re-created {teacher.name} gives {exc.args[0]} classes, "
                f"cache {store.path} holds {store.num_classes}",
                "different weights",
            )
            replays = {}
    checks = [data_check, weights_check]
    comparison = summarize_comparison(replays, tolerance)
    if replays:  # none: no sampled row could be replayed, and the checks above say why
        checks.append(logits_check(comparison, replays, checks, tolerance))
    if integrity_check is not None:
        checks.append(integrity_check)
    return VerifyReport(str(store.path), checks, comparison)


def summarize_comparison(replays: dict[str, Replay], tolerance: float) -> Comparison | None:
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


def logits_check(c: Comparison | None, replays: dict[str, Replay], checks: list[Check], tolerance: float) -> Check:
    """The verdict on the compared rows: shards that fail to decode, then rows whose KL exceeds `tolerance`."""
    broken = [b for r in replays.values() for b in r.broken]
    differing = [d for r in replays.values() for d in r.differing]
    if broken or c is None:  # c is None only when every sampled row sits in a broken shard
        return Check(
            "logits", False, f"shards that cannot be decoded ({len(broken)}): {_named(broken)}", "corrupted shard"
        )
    figures = (
        f"{c.rows} rows ({', '.join(f'{k}: {v}' for k, v in c.rows_per_split.items())}): layer-normalised "
        f"|difference| max {c.max_abs_diff:.2e}, mean {c.mean_abs_diff:.2e}; KL(T={TEMPERATURE:g}, "
        f"m={MULTIPLIER:g}) mean {c.kl_mean:.2e}, max {c.kl_max:.2e}; top-1 agreement {c.top1_agreement:.2%}"
    )
    if not differing:
        return Check("logits", True, figures)
    if all(k.ok for k in checks):
        hint = (
            "data and weights match, so the shards holding them are corrupted, or this loader, AMP or "
            "software differs from the build's"
        )
    else:
        hint = "see the other failed checks"
    return Check(
        "logits",
        False,
        f"{len(differing)} of {c.rows} rows differ (KL > {tolerance:g}): {_named(differing)}; {hint}. {figures}",
        "teacher outputs differ",
    )
