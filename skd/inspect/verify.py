"""Checking a cache against its data and teacher (`skd-cache verify`).

The data (file list and sizes, decoded image sizes) and the weights (sha256) are checked first, so a
mismatch is named by its cause (skd.inspect.verify_checks). Then the recorded teacher is re-created
and run on a random subset of stored rows, replayed through the recorded windows, flips, loader and
AMP, and its outputs are compared with the stored logits after the layer norm the SKD loss applies
(skd.inspect.verify_rows). `integrity` also reads every chunk.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from skd.errors import ModelError
from skd.inspect.verify_checks import (
    Check,
    check_data,
    check_integrity,
    check_weights,
    named,
    size_problems,
    teacher_weights,
    with_changed_files,
)
from skd.inspect.verify_rows import (
    MULTIPLIER,
    TEMPERATURE,
    Comparison,
    Replay,
    plan_rows,
    replay_split,
    sample_rows,
    summarize_comparison,
)
from skd.models.runtime import Dist, place, resolve_device
from skd.models.teachers import load_teacher
from skd.replay.checks import warn_other_loader
from skd.replay.sources import cached_source, teacher_recipe
from skd.store.cache_store import Store, StoreError, part_name

# KL per row above which it differs: int8 rounding gives ~1e-5, other weights ~0.1 and more
TOLERANCE = 1e-2


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


def verify_cache(
    store: Store,
    *,
    data: Path | None = None,
    weights: str | None = None,
    samples: int = 256,
    loader: str | None = None,
    device: str = "auto",
    batch_size: int = 64,
    workers: int = 2,
    seed: int = 0,
    tolerance: float = TOLERANCE,
    integrity: bool = False,
    progress: bool = False,
) -> VerifyReport:
    """Check the data, the weights and `samples` random stored rows of the cache (and every chunk
    with `integrity`); the report says which check failed and why."""
    meta = store.meta
    root = Path(data or meta["dataset"]["root"])
    dev = resolve_device(device, Dist())
    data_check = check_data(store, root)
    teacher = load_teacher(meta["teacher"]["name"], teacher_weights(store, weights))
    weights_check = check_weights(store, teacher)
    integrity_check = check_integrity(store, progress) if integrity else None
    try:
        plans = {
            view: plan_rows(store, view, pos)
            for view, pos in sample_rows(store, samples, seed).items()
        }
        warn_other_loader(loader, store)
        source = cached_source(store, recipe=teacher_recipe(store), root=root, loader=loader)
    except StoreError:
        if integrity_check is None or integrity_check.ok:
            raise
        return VerifyReport(str(store.path), [data_check, weights_check, integrity_check], None)
    problems = {
        view: size_problems(root, rows.paths, rows.sizes, rows.tails)
        for view, rows in plans.items()
    }
    data_check = with_changed_files(
        data_check, sorted({p for found in problems.values() for p in found.values()})
    )
    options = dict(batch_size=batch_size, workers=workers, device=dev, amp=meta["teacher"]["amp"])
    model = place(teacher.model, dev)
    replays, total = {}, sum(len(r.positions) - len(problems[v]) for v, r in plans.items())
    with tqdm(
        total=total, desc="verify", unit="img", disable=not progress, dynamic_ncols=True
    ) as bar:
        try:
            for view, rows in plans.items():
                keep = [i for i in range(len(rows.positions)) if i not in problems[view]]
                if keep:
                    replays[part_name(view)] = replay_split(
                        store, view, rows.take(keep), model, source, tolerance, bar, **options
                    )
        except ModelError as exc:  # the teacher gives another number of classes
            weights_check = Check("weights", False, str(exc), "different weights")
            replays = {}
    checks = [data_check, weights_check]
    comparison = summarize_comparison(replays, tolerance)
    if replays:  # none: no sampled row could be replayed, and the checks above say why
        checks.append(logits_check(comparison, replays, checks, tolerance))
    if integrity_check is not None:
        checks.append(integrity_check)
    return VerifyReport(str(store.path), checks, comparison)


def logits_check(
    c: Comparison | None, replays: dict[str, Replay], checks: list[Check], tolerance: float
) -> Check:
    """The verdict on the compared rows: shards that fail to decode, then rows whose KL exceeds
    `tolerance`."""
    broken = [b for r in replays.values() for b in r.broken]
    differing = [d for r in replays.values() for d in r.differing]
    if broken or c is None:  # c is None only when every sampled row sits in a broken shard
        return Check(
            "logits",
            False,
            f"shards that cannot be decoded ({len(broken)}): {named(broken)}",
            "corrupted shard",
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
        f"{len(differing)} of {c.rows} rows differ (KL > {tolerance:g}): {named(differing)}; {hint}. {figures}",
        "teacher outputs differ",
    )
