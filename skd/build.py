"""Stage one: run the teacher over the recorded views and write its logits into the cache.

Decode (the input pipeline's workers), teacher forward (this thread) and encode + write (a
background `ShardWriter`) overlap, so the slowest of the three sets the pace. Whole shards only,
completion recorded per shard: a rerun of the same command resumes.
"""

from __future__ import annotations

import shutil
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torchvision
import zarr
from tqdm import tqdm

from . import __version__, pipelines
from .codecs import get_codec
from .config import BuildConfig
from .errors import SkdError, SkdWarning, fault
from .index import check_root, index_dataset, quick_fingerprints
from .mixing import MixParams
from .plan import VAL_CROP_FRACTION, ViewPlan, center_boxes, plan_id
from .recipe import resolve, to_meta
from .replay import ReplaySource, cached_source, planned_view, teacher_recipe
from .runtime import Dist, amp_name, device_kind, init_distributed, place, resolve_device, shutdown
from .schema import FORMAT_VERSION, samples_sha256
from .store import Split, Store, cache_state, create_store, open_store, parse_location
from .teachers import forward, load_teacher, output_classes
from .writer import ShardWriter, acquire_lock


class BuildError(SkdError):
    """The build cannot go ahead as asked: one line saying what to change."""


@dataclass
class BuildSummary:
    views: int
    rows_written: int
    rows_total: int
    bytes_on_disk: int
    bytes_per_row: float
    seconds: float
    images_per_sec: float


def build_cache(cfg: BuildConfig, *, progress: bool = False, log=None) -> BuildSummary:
    """Build (or resume) the cache described by `cfg`; returns what this run did."""
    where = parse_location(cfg.out)  # a folder, or an object-store URL (s3://, gs://, az://; file:// is a folder)
    cfg = replace(cfg, out=where.local.resolve() if where.is_local else where.display)  # `--out .`: one folder
    try:
        get_codec(cfg.codec)
    except ValueError as exc:
        raise BuildError(f"--codec: {exc}") from None
    cfg.mix_params().check()
    d = init_distributed(device_kind(cfg.device))
    try:
        return _build(cfg, d, progress=progress and d.main)
    finally:
        shutdown(d)


def _build(cfg: BuildConfig, d: Dist, *, progress: bool) -> BuildSummary:
    """Load the teacher, open (or create) the cache on rank 0, fill this rank's shards of every view."""
    started = time.perf_counter()
    device = resolve_device(cfg.device, d)
    amp = amp_name(cfg.amp, device)
    check_root(Path(cfg.data))  # before the lock and --out's parents are created
    teacher = load_teacher(cfg.teacher, cfg.weights)
    plan, views = recorded_plan(cfg)
    check_pairs(cfg, plan)
    recipe, origin = resolve(
        cfg.teacher_recipe_options(), teacher.pretrained_cfg, teacher.published, plan["image_size"]
    )
    model = place(teacher.model, device)
    meta = {**_identity(cfg, teacher, amp, to_meta(recipe, origin), plan, views), "software": _software()}
    lock, store, problem = None, None, None
    if d.main:
        try:
            check_out(cfg.out, Path(cfg.data))
            lock = acquire_lock(cfg.out)
            store = prepare_store(
                cfg, meta, lambda: output_classes(model, recipe.size, device, f"teacher {cfg.teacher}"), progress
            )
        except OSError as exc:
            problem = BuildError(
                f"--out {cfg.out}: {exc.strerror or exc}"
                f"{f' ({exc.filename})' if exc.filename else ''}: choose a folder you can write"
            )
        except Exception as exc:  # BuildError, ModelError, DatasetError...: the lock file must not stay behind
            problem = exc
    problem = d.broadcast(problem)
    try:
        if problem is not None:
            raise problem
        store = store or open_store(cfg.out, mode="r+")
        source = cached_source(store, recipe=teacher_recipe(store), root=Path(cfg.data))
        model = torch.compile(model) if cfg.compile else model
        rows = sum(
            fill_view(store, source, view, model, cfg, d, device, amp, progress, lock)
            for view in [*range(store.num_views), *([None] if store.has_val else [])]
        )
        rows = d.total(rows)  # also the barrier: every rank has written its shards
        if d.main:
            store = mark_finished(open_store(cfg.out, mode="r+"))
        return summarize(store, rows, time.perf_counter() - started)
    finally:
        if lock is not None:
            lock.release()


def fill_view(
    store: Store,
    source: ReplaySource,
    view: int | None,
    model,
    cfg: BuildConfig,
    d: Dist,
    device: torch.device,
    amp: str,
    progress: bool,
    lock=None,
) -> int:
    """Compute this rank's incomplete shards of one view (None: val); returns the rows written."""
    rows = store.num_samples if view is not None else store.num_val
    complete = store.complete()[view] if view is not None else store.val_complete()
    shards = [j for j in range(len(complete)) if not complete[j] and j % d.world == d.rank]
    if not shards:
        return 0
    positions = np.concatenate([np.arange(*store.shard_bounds(j, rows)) for j in shards])
    loader = source.loader(view, positions, batch_size=cfg.batch_size, workers=cfg.workers, device=device)
    label = "val" if view is None else f"view {view}/{store.num_views}"
    writer = ShardWriter(store, view, shards, rows, lock=lock)  # a lost lease stops the writes
    with tqdm(total=len(positions), desc=label, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        try:
            done = run_teacher(model, loader, writer, device, amp, bar, "val-batch" if view is None else "after-batch")
        except OSError as exc:  # an image that went missing or unreadable after the index pass
            writer.abort()
            raise BuildError(
                f"reading the images of {label} failed ({pipelines.read_error(exc)}): "
                f"check {source.root}, then rerun the same command to resume"
            ) from None
        except BaseException:  # Ctrl-C, a teacher error: the shards already written stay complete
            writer.abort()
            raise
        writer.close()
    return done


def run_teacher(
    model, loader, writer: ShardWriter, device: torch.device, amp: str, bar, fault_point: str = "after-batch"
) -> int:
    """Feed every batch of `loader` through the teacher into `writer`; returns images processed."""
    done = 0
    limit = writer.store.codec.limit
    for count, batch in enumerate(loader, 1):
        logits = forward(model, batch.images, device, amp).cpu().numpy()
        magnitude = np.abs(logits).max(axis=1, initial=0)  # one pass: nan or inf where a row has any
        finite = np.isfinite(magnitude)
        if not finite.all():  # never store them: every student step on such a row would be NaN
            raise BuildError(
                f"the teacher gave inf or nan logits for {int((~finite).sum())} of {len(finite)} "
                f"images (first at position {int(batch.positions[~finite][0])}) with --amp {amp}: "
                "check the weights, or use --amp bf16 or none (fp16 overflows easily)"
            )
        if magnitude.max(initial=0) > limit:
            raise BuildError(
                f"the teacher gave logits up to {magnitude.max():.3g}, beyond what --codec "
                f"{writer.store.codec.name} stores ({limit:.6g}): use --codec fp32"
            )
        writer.put(batch.positions.numpy(), logits)
        done += len(logits)
        bar.update(len(logits))
        fault(fault_point, count)
    return done


# ---------------------------------------------------------------------------------------------
# Opening or creating the cache

# The recorded settings a rerun must repeat to resume; anything else may change between runs.
IDENTITY = {
    "teacher": ("teacher", "name"),
    "weights": ("teacher", "weights_sha256"),
    "amp": ("teacher", "amp"),
    "teacher input": ("teacher", "input"),
    "data": ("dataset", "fingerprint"),
    "val data": ("dataset", "val_fingerprint"),
    "seed": ("plan", "seed"),
    "image-size": ("plan", "image_size"),
    "crop": ("plan", "crop"),
    "mixing": ("plan", "mix"),
    "loader": ("plan", "loader"),
    "codec": ("codec",),
    "views": ("views",),
    "shard-size": ("shard_rows",),
}


def differences(recorded: dict, wanted: dict) -> list[str]:
    """Names of the identity settings in which two cache descriptions differ."""

    def get(d, keys):
        for k in keys:
            d = d.get(k) if isinstance(d, dict) else None
        return d

    return [name for name, keys in IDENTITY.items() if get(recorded, keys) != get(wanted, keys)]


def _software() -> dict:
    versions = {
        "skd": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "zarr": zarr.__version__,
        "numpy": np.__version__,
    }
    try:
        import nvidia.dali

        versions["dali"] = nvidia.dali.__version__
    except ImportError:
        pass
    return versions


def recorded_plan(cfg: BuildConfig) -> tuple[dict, int]:
    """The plan attributes and view count of the new cache: from the options, or --plan-from's own."""
    if cfg.plan_from is not None:
        source = open_store(cfg.plan_from)
        return {k: v for k, v in source.meta["plan"].items() if k != "id"}, source.num_views
    return {
        "seed": cfg.seed,
        "image_size": cfg.image_size,
        "crop": cfg.crop.to_dict(),
        "val_crop_fraction": VAL_CROP_FRACTION,
        "loader": cfg.loader,
        "mix": cfg.mix_params().to_dict(),
    }, cfg.views


def check_pairs(cfg: BuildConfig, plan: dict) -> None:
    """A mixed plan pairs positions 2i and 2i + 1, and a pair must share a batch."""
    if MixParams.from_dict(plan["mix"]).enabled and (cfg.batch_size % 2 or cfg.shard_rows % 2):
        raise BuildError(
            f"mixing pairs positions 2i and 2i + 1 in one batch: --batch-size ({cfg.batch_size}) and "
            f"--shard-size ({cfg.shard_rows}) must be even"
        )


def _identity(cfg: BuildConfig, teacher, amp: str, recipe: dict, plan: dict, views: int) -> dict:
    """The part of the metadata that decides the cache's contents (compared on resume)."""
    return {
        "format": FORMAT_VERSION,
        "teacher": {
            "name": cfg.teacher,
            "weights": teacher.weights,
            "weights_sha256": teacher.weights_sha256,
            "amp": amp,
            "input": recipe,
            "pretrained_cfg": teacher.pretrained_cfg,
        },
        "dataset": {"root": str(Path(cfg.data).resolve())},
        "plan": dict(plan),
        "codec": cfg.codec,
        "views": views,
        "shard_rows": cfg.shard_rows,
        "chunk_rows": cfg.chunk_rows,
    }


def check_out(out, data: Path) -> None:
    """Refuse an --out that is not a cache folder, so that neither a build nor --overwrite can touch other files."""
    where = parse_location(out)
    if not where.is_local:  # a prefix in an object store: nothing to overlap, but it must be empty or a cache
        if not where.is_empty() and cache_state(where) is None:
            raise BuildError(
                f"{where} holds objects and is not an skd cache: choose another --out "
                "(--overwrite replaces only a cache; remove other objects yourself)"
            )
        return
    out = where.local
    o, d = out.resolve(), data.resolve()
    if o == d or o in d.parents or any(o == d / s or d / s in o.parents for s in ("train", "val")):
        raise BuildError(f"--out {out} overlaps the dataset {data}: choose a folder outside its train/ and val/")
    for path in (out, *out.parents):
        if path.exists() and not path.is_dir():
            raise BuildError(f"--out {out}: {path} is a file: choose a folder for the cache")
    if out.is_dir() and any(out.iterdir()) and cache_state(out) is None:
        what = (
            "a zarr group skd did not create (or one whose zarr.json is damaged)"
            if (out / "zarr.json").exists()
            else "not an skd cache"
        )
        raise BuildError(
            f"{out} exists and is {what}: choose another --out "
            "(--overwrite replaces only a cache; remove other folders yourself)"
        )


def prepare_store(cfg: BuildConfig, meta: dict, num_classes, progress: bool) -> Store:
    """Open the cache at cfg.out for resuming, or lay out its samples and plan and create it.

    Refuses a cache built with different identity settings. `num_classes()` runs the teacher
    once; it is called only after the dataset index found no bad image.
    """
    where = parse_location(cfg.out)
    if not where.is_empty() and not cfg.overwrite:
        return _resume(cfg, meta)
    layout = copied_layout(cfg) if cfg.plan_from is not None else planned_layout(cfg, progress)
    classes = num_classes()
    dataset_classes = len(layout.dataset["classes"])
    if classes < dataset_classes:
        raise BuildError(
            f"teacher {cfg.teacher} has {classes} outputs but {cfg.data}/train has "
            f"{dataset_classes} classes: use a teacher trained on these classes"
        )
    if classes > dataset_classes:
        warnings.warn(
            f"teacher {cfg.teacher} has {classes} outputs and {cfg.data}/train {dataset_classes} classes: "
            "class i of the dataset is taken to be output i (its accuracy in skd-cache stats says "
            "whether that holds)",
            SkdWarning,
            stacklevel=2,
        )
    meta["teacher"]["num_classes"] = classes
    meta["dataset"].update(layout.dataset)
    meta["plan"]["id"] = layout.plan_id(meta["plan"])
    if cfg.overwrite and not where.is_empty() and where.is_local:
        shutil.rmtree(where.local)
    elif cfg.overwrite and not where.is_empty():
        where.remove_all()
    return create_store(
        cfg.out,
        meta,
        train=layout.train,
        plans=layout.plans,
        val=layout.val,
        val_boxes=layout.val_boxes,
        num_classes=classes,
    )


@dataclass
class Layout:
    """What a new cache holds besides logits: its samples, the plan of every view, the validation windows."""

    train: Split
    plans: list
    val: Split | None
    val_boxes: np.ndarray | None
    dataset: dict  # the dataset attributes: counts, classes, fingerprints, skipped files

    def plan_id(self, plan_meta: dict) -> str:
        params = {k: v for k, v in plan_meta.items() if k not in ("id", "loader")}
        n = len(self.train.paths)
        unmixed = (np.ones(n, np.float32), np.zeros((n, 4), np.float32))
        arrays = [
            np.asarray(a, dtype)
            for p in self.plans
            for a, dtype in zip(
                (p.order, p.box, p.flip, *(p.mix or unmixed)), ("int32", "int32", "uint8", "float32", "float32")
            )
        ]
        if self.val is not None:
            arrays.append(np.asarray(self.val_boxes, "int32"))
        return plan_id(
            samples_sha256(self.train.paths, self.train.labels, self.train.sizes),
            None if self.val is None else samples_sha256(self.val.paths, self.val.labels, self.val.sizes),
            params,
            arrays,
        )


def planned_layout(cfg: BuildConfig, progress: bool) -> Layout:
    """Index the dataset and plan every view."""
    index = index_dataset(
        cfg.data, with_val=cfg.val, workers=max(4, cfg.workers), progress=progress, on_bad=cfg.on_bad_image
    )
    plans = [
        planned_view(cfg.seed, k, index.train.sizes, cfg.crop, cfg.mix_params(), cfg.image_size)
        for k in range(cfg.views)
    ]
    val = None if index.val is None else Split(index.val.paths, index.val.labels, index.val.sizes)
    return Layout(
        train=Split(index.train.paths, index.train.labels, index.train.sizes),
        plans=plans,
        val=val,
        val_boxes=None if val is None else center_boxes(index.val.sizes, VAL_CROP_FRACTION),
        dataset={
            "num_samples": len(index.train),
            "classes": index.classes,
            "num_val": len(index.val) if index.val is not None else 0,
            "fingerprint": index.train.fingerprint,
            "val_fingerprint": index.val.fingerprint if index.val is not None else None,
            "skipped": [list(item) for item in index.skipped],
        },
    )


def copied_layout(cfg: BuildConfig) -> Layout:
    """The samples and the whole recorded plan of the cache at --plan-from, byte for byte, once the images
    under --data are checked to be the ones it was built on."""
    source = open_store(cfg.plan_from)
    recorded = source.meta["dataset"]
    found = quick_fingerprints(Path(cfg.data), source.has_val, recorded.get("skipped", []))
    if found != (recorded["fingerprint"], recorded["val_fingerprint"]):
        raise BuildError(
            f"the images under {cfg.data} differ from those --plan-from {cfg.plan_from} was built on "
            "(file list or sizes): pass its --data"
        )
    plans = [ViewPlan(*source.view_plan(k), mix=source.view_mix(k)) for k in range(source.num_views)]
    keys = ("num_samples", "classes", "num_val", "fingerprint", "val_fingerprint", "skipped")
    return Layout(
        train=source.split("samples"),
        plans=plans,
        val=source.split("val") if source.has_val else None,
        val_boxes=source.val_boxes() if source.has_val else None,
        dataset={k: recorded.get(k) for k in keys},
    )


def _resume(cfg: BuildConfig, meta: dict) -> Store:
    """The cache at cfg.out, opened to continue writing, if it was built with the same identity settings."""
    out = parse_location(cfg.out)
    if cache_state(out) == "creating":
        raise BuildError(f"{out} holds an unfinished cache creation: pass --overwrite to start it again")
    store = open_store(out, mode="r+")
    if cfg.val and not store.has_val and (Path(cfg.data) / "val").is_dir():
        raise BuildError(
            f"{out} was built with --no-val: pass --no-val to resume, or --overwrite to rebuild "
            "it with the validation logits"
        )
    skipped = store.meta["dataset"].get("skipped", [])
    train_fp, val_fp = quick_fingerprints(Path(cfg.data), store.has_val, skipped)
    changed = differences(store.meta, {**meta, "dataset": {"fingerprint": train_fp, "val_fingerprint": val_fp}})
    if changed:
        raise BuildError(
            f"{out} was built with other settings ({', '.join(changed)}): pass the same "
            "arguments to resume, another --out, or --overwrite to rebuild"
        )
    for leftover in out.local.rglob("*.partial") if out.is_local else ():  # zarr's temporary files, left by a kill
        leftover.unlink()
    return store


def mark_finished(store: Store) -> Store:
    """Record `complete` in the attributes once every shard is."""
    if store.is_complete() and not store.meta.get("complete"):
        store.group.attrs["skd"] = {**store.meta, "complete": True}
    return store


def summarize(store: Store, rows_written: int, seconds: float) -> BuildSummary:
    total = store.num_views * store.num_samples + store.num_val
    return BuildSummary(
        views=store.num_views,
        rows_written=rows_written,
        rows_total=total,
        bytes_on_disk=store.bytes_on_disk(),
        bytes_per_row=store.storage()["bytes_per_row"] or 0.0,
        seconds=seconds,
        images_per_sec=rows_written / max(seconds, 1e-9),
    )


def summary_lines(s: BuildSummary) -> list[str]:
    return [
        f"views {s.views}, rows {s.rows_total:,} ({s.rows_written:,} written now)",
        f"on disk {s.bytes_on_disk / 2**20:,.1f} MiB, {s.bytes_per_row:,.0f} B per row of logits",
        f"time {s.seconds:,.1f} s, {s.images_per_sec:,.1f} images/s",
    ]
