"""The checks of `skd-cache verify` that run no teacher: data, weights and integrity.

The data check compares the dataset's file list and sizes (and the decoded sizes of the sampled
files) with what the cache recorded; the weights check compares the re-created teacher's sha256; the
integrity check reads every array and every chunk of every complete shard. Each names what it found,
so a mismatch is reported by its cause before any row is replayed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from skd.data.image_probe import file_tail_digest, image_size
from skd.data.index import quick_fingerprints, scan_split
from skd.errors import DatasetError, ModelError
from skd.store.cache_store import Store, part_name

NAMED = 5  # files, rows or chunks named in a message; the rest are counted


@dataclass
class Check:
    """One verdict: what was checked and found, and for a failure its cause in a few words."""

    name: str  # data, weights, logits, integrity
    ok: bool
    detail: str
    # different data, different weights, corrupted shard, teacher outputs differ
    cause: str | None = None


def named(items: list[str]) -> str:
    """The first NAMED items, then how many more."""
    more = f" and {len(items) - NAMED} more" if len(items) > NAMED else ""
    return ", ".join(items[:NAMED]) + more


def first_line(exc: BaseException) -> str:
    """An error as its type and the start of its first line: zarr's and numcodecs' messages run
    long."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Data


def recorded_paths(store: Store, split: str) -> list[str]:
    """The stored sample paths, unchecked: only the ones opened go through check_relative_path."""
    return [str(p) for p in store.group[f"{split}/path"][:]]


def check_data(store: Store, root: Path) -> Check:
    """Compare the dataset's file list and file sizes with the fingerprints the cache recorded."""
    if not (root / "train").is_dir():
        raise DatasetError(
            f"dataset {root} has no train/ folder: pass --data ROOT where cache {store.path}'s images live"
        )
    # files a `--on-bad-image skip` build left out
    skipped = store.meta["dataset"].get("skipped", [])
    found = quick_fingerprints(root, store.has_val, skipped)
    recorded = (store.meta["dataset"]["fingerprint"], store.meta["dataset"].get("val_fingerprint"))
    left_out = {path for path, _ in skipped}
    problems = []
    for split, name, now, then in (
        ("train", "samples", found[0], recorded[0]),
        ("val", "val", found[1], recorded[1]),
    ):
        if now == then or (split == "val" and not store.has_val):
            continue
        if now is None:
            problems.append(f"{root}/val is missing")
            continue
        before = recorded_paths(store, name)
        current = [p for p in scan_split(root, split, empty=[])[0] if p not in left_out]
        missing, extra = sorted(set(before) - set(current)), sorted(set(current) - set(before))
        if missing:
            problems.append(
                f"{len(missing)} of the cache's {split} files are missing under {root} ({named(missing)})"
            )
        if extra:
            problems.append(
                f"{root}/{split} has {len(extra)} files the cache does not know ({named(extra)})"
            )
        if not missing and not extra:
            problems.append(
                f"files under {root}/{split} changed size since the build (the same {len(before):,} names)"
            )
    if problems:
        return Check("data", False, "; ".join(problems), "different data")
    return Check("data", True, f"{root}: file list and sizes match the cache's fingerprints")


def size_problems(
    root: Path, paths: list[str], sizes: np.ndarray, tails: np.ndarray | None = None
) -> dict[int, str]:
    """{index: problem} of the files at `paths` that are missing, whose decoded size is not the
    recorded (height, width) in `sizes`, or whose tail digest is not the recorded one in `tails`
    (another image of the same sizes: a cache built before digests were recorded has none)."""
    problems = {}
    for i, (path, size) in enumerate(zip(paths, sizes)):
        try:
            now = image_size(root / path)
            tail = None if tails is None else file_tail_digest(root / path)
        # missing or unreadable: this file's problem, reported with the others
        except Exception as exc:
            problems[i] = f"{path} cannot be read ({first_line(exc)})"
            continue
        if tuple(now) != tuple(int(v) for v in size):
            problems[i] = f"{path} is now {now[0]}x{now[1]}, the cache recorded {size[0]}x{size[1]}"
        elif tail is not None and tail != int(tails[i]):
            problems[i] = (
                f"{path} holds another image than at the build (same byte and pixel size, other content)"
            )
    return problems


def with_changed_files(data_check: Check, changed: list[str]) -> Check:
    """The data check, failed if sampled files changed since the build (their names added to its
    detail)."""
    if not changed:
        return data_check
    note = f"sampled files that changed ({len(changed)}): {named(changed)}"
    return Check(
        "data",
        False,
        f"{data_check.detail}; {note}" if not data_check.ok else note,
        "different data",
    )


# ---------------------------------------------------------------------------------------------
# Weights


def teacher_weights(store: Store, override: str | None) -> str | None:
    """The `weights` argument of load_teacher that re-creates the cache's teacher."""
    recorded = store.meta["teacher"]["weights"]
    if override is not None:
        return override
    if recorded == "none":
        raise ModelError(
            f"cache {store.path} was built with --weights none (random weights that were not "
            "saved): its teacher cannot be re-created, so it cannot be verified"
        )
    if recorded in ("torchvision-default", "py"):
        return None
    if not Path(recorded).is_file():
        raise ModelError(
            f"the teacher weights {recorded} recorded by cache {store.path} are not there: pass --weights FILE"
        )
    return recorded


def check_weights(store: Store, teacher) -> Check:
    """Compare the re-created teacher's weights (a sha256 of its tensors) with the one the cache
    recorded."""
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
        f"{teacher.name} from {teacher.weights}"
        + (f", sha256 {then[:16]} as recorded" if then else ""),
    )


# ---------------------------------------------------------------------------------------------
# Integrity


def check_integrity(store: Store, progress: bool = False) -> Check:
    """Read every array, and every chunk of every complete shard; name the shards whose files are
    missing and the chunks that fail to decode or hold non-finite logits."""
    ranges = store.complete_ranges()
    chunk = int(store.meta.get("chunk_rows") or store.shard_rows)
    bad = [f"{name} ({first_line(exc)})" for name, exc in unreadable_arrays(store)]
    for view, shard, start, stop in tqdm(
        ranges, desc="integrity", unit="shard", disable=not progress
    ):
        missing = store.missing_shard_files(view, shard)
        if missing:
            names = ", ".join(missing)
            bad.append(f"{part_name(view)} shard {shard} (missing {names})")
            continue
        for a in range(start, stop, chunk):
            b = min(stop, a + chunk)
            where = f"{part_name(view)} shard {shard} rows {a}-{b - 1}"
            try:
                logits = store.read_logits(view, a, b)
            except Exception as exc:  # zarr and numcodecs raise many kinds on damaged bytes
                bad.append(f"{where} ({first_line(exc)})")
                continue
            if not np.isfinite(logits).all():
                bad.append(f"{where} (non-finite logits)")
    if bad:
        return Check(
            "integrity", False, f"damaged or missing ({len(bad)}): {named(bad)}", "corrupted shard"
        )
    return Check(
        "integrity",
        True,
        f"{len(ranges)} complete shards read, every chunk decodes to finite logits",
    )


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
