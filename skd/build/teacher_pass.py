"""Stage one: run the teacher over the recorded views and write its logits into the cache.

Decode (the input pipeline's workers), teacher forward (this thread) and encode + write (a
background `ShardWriter`) overlap, so the slowest of the three sets the pace. Whole shards only,
completion recorded per shard: a rerun of the same command resumes.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from skd import pipelines
from skd.build.prepare import (
    Layout,
    cache_meta,
    check_out,
    check_pairs,
    plan_attributes,
    prepare_store,
)
from skd.config import BuildConfig
from skd.data.index import check_root
from skd.errors import DatasetError, ModelError, OptionError, SkdWarning, fault
from skd.models.recipe import resolve, to_meta
from skd.models.runtime import (
    Dist,
    amp_name,
    device_kind,
    init_distributed,
    place,
    resolve_device,
    shutdown,
)
from skd.models.teachers import CompiledTeacher, forward, load_teacher, output_classes
from skd.replay.sources import ReplaySource, cached_source, planned_source
from skd.storage.location import parse_location
from skd.store.cache_store import VAL, Store, View, open_store
from skd.store.codec_table import AUTO, FIDELITY_ROWS, codec_fidelity
from skd.store.codecs import get_codec
from skd.store.schema import recorded_augment
from skd.store.writer import ShardWriter, mark_finished

LARGEST_PUBLISHED_SIZE = 800  # timm's largest ImageNet recipes (e.g. EfficientNet-L2 at 800 px)


@dataclass
class BuildSummary:
    views: int
    rows_written: int
    rows_total: int
    bytes_on_disk: int
    bytes_per_row: float
    seconds: float
    images_per_sec: float


def build_cache(cfg: BuildConfig, *, progress: bool = False) -> BuildSummary:
    """Build (or resume) the cache described by `cfg`; returns what this run did."""
    # a folder (`--out .`: by its name) or a URL
    cfg = replace(cfg, out=parse_location(cfg.out).absolute())
    try:  # the codec names are the store's: the config, below it, cannot check them
        get_codec(cfg.codec) if cfg.codec != AUTO else None
    except ValueError as exc:
        raise OptionError(f"--codec: {exc}") from None
    d = init_distributed(device_kind(cfg.device))
    try:
        return _build(cfg, d, progress=progress and d.main)
    finally:
        shutdown(d)


def _build(cfg: BuildConfig, d: Dist, *, progress: bool) -> BuildSummary:
    """Resolve the teacher, its recipe and the plan; open (or create) the cache on rank 0; fill this
    rank's shards of every view."""
    started = time.perf_counter()
    device = resolve_device(cfg.device, d)
    amp = amp_name(cfg.amp, device)
    check_root(Path(cfg.data))  # before the lock and --out's parents are created
    teacher = load_teacher(cfg.teacher, cfg.weights)
    plan_source = open_store(cfg.plan_from) if cfg.plan_from is not None else None
    plan, views = plan_attributes(cfg, plan_source)
    check_pairs(cfg, plan)
    recipe, origin = resolve(
        cfg.teacher_recipe_options(), teacher.pretrained_cfg, teacher.published, plan["image_size"]
    )
    warn_large_input(recipe.size, cfg.batch_size)
    model = place(teacher.model, device)
    meta = cache_meta(cfg, teacher, amp, to_meta(recipe, origin), plan, views)
    classes = lambda: output_classes(model, recipe.size, device, f"teacher {cfg.teacher}")  # noqa: E731
    measure = lambda layout: measure_codec(layout, cfg, model, recipe, meta, device, amp)  # noqa: E731
    lock, store = open_on_main(cfg, d, meta, classes, measure, progress, plan_source)
    try:
        store = store or open_store(cfg.out, mode="r+")  # the other ranks open what rank 0 made
        source = cached_source(store, recipe=recipe, root=Path(cfg.data))
        # one graph per rank
        model = CompiledTeacher(model, cfg.batch_size) if cfg.compile else model
        lost = store.lost_shards()  # from the listing taken at open: one lookup per complete shard
        rows = sum(
            fill_view(
                store, source, view, model, cfg, d, device, amp, progress, lock, lost.get(view, [])
            )
            for view in store.parts()
        )
        rows = d.total(rows)  # also the barrier: every rank has written its shards
        if d.main:
            mark_finished(store)
        return summarize(store, rows, time.perf_counter() - started)
    finally:
        if lock is not None:
            lock.release()


def warn_large_input(size: int, batch_size: int) -> None:
    """One warning where the teacher's input is beyond any published recipe: each batch's images
    alone take batch x 3 x size^2 float32 before the teacher's activations, which grow with size^2
    too."""
    if size > LARGEST_PUBLISHED_SIZE:
        warnings.warn(
            f"teacher input {size} px is beyond published recipes (up to {LARGEST_PUBLISHED_SIZE} px): a batch of "
            f"{batch_size} images takes {batch_size * 3 * size * size * 4 / 1e9:,.1f} GB before the teacher runs, "
            "its activations many times that: check --teacher-size",
            SkdWarning,
            stacklevel=2,
        )


def open_on_main(
    cfg: BuildConfig,
    d: Dist,
    meta: dict,
    num_classes,
    measure,
    progress: bool,
    plan_source: Store | None,
):
    """(lock, store) on rank 0: --out checked, locked, and the cache resumed or created; (None,
    None) on the other ranks. A problem on rank 0 is raised on every rank (and releases the
    lock)."""
    lock, store, problem = None, None, None
    if d.main:
        where = parse_location(cfg.out)
        try:
            check_out(where, Path(cfg.data))
            lock = where.lock()
            store = prepare_store(cfg, meta, num_classes, progress, plan_source, measure)
        except OSError as exc:
            problem = OptionError(
                f"--out {cfg.out}: {exc.strerror or exc}"
                f"{f' ({exc.filename})' if exc.filename else ''}: choose a folder you can write"
            )
        # OptionError, ModelError, DatasetError...: the lock file must not stay behind
        except Exception as exc:
            problem = exc
    problem = d.broadcast(problem)
    if problem is not None:
        if lock is not None:
            lock.release()
        raise problem
    return lock, store


def measure_codec(
    layout: Layout, cfg: BuildConfig, model, recipe, meta: dict, device, amp: str
) -> tuple[str, dict]:
    """(codec, its fidelity record): the teacher's logits of the first rows of view 0, as the build
    will compute them, stored with --codec (or, for auto, with the smallest codec within --max-kl)
    and compared with their exact values. One teacher pass over FIDELITY_ROWS images, once per
    cache."""
    rows = min(FIDELITY_ROWS, len(layout.train.paths), cfg.shard_rows)
    source = planned_source(
        Path(cfg.data),
        layout.train,
        layout.plans[0],
        recipe=recipe,
        loader=meta["plan"]["loader"],
        num_classes=len(meta["dataset"]["classes"]),
        augment_ops=recorded_augment(meta["plan"]).ops,
    )
    loader = source.loader(
        0, np.arange(rows), batch_size=cfg.batch_size, workers=cfg.workers, device=device
    )
    try:
        logits = np.concatenate(
            [forward(model, batch.images, device, amp).cpu().numpy() for batch in loader]
        )
    except OSError as exc:  # an image that went missing or unreadable after the index pass
        raise DatasetError(
            f"reading the images of view 0/{meta['views']} failed ({pipelines.read_error(exc)}): "
            f"check {cfg.data}, then rerun the same command"
        ) from None
    return codec_fidelity(
        cfg.codec, logits, max_kl=cfg.max_kl, shard_rows=cfg.shard_rows, chunk_rows=cfg.chunk_rows
    )


def fill_view(
    store: Store,
    source: ReplaySource,
    view: View,
    model,
    cfg: BuildConfig,
    d: Dist,
    device: torch.device,
    amp: str,
    progress: bool,
    lock=None,
    lost: list[int] = (),
) -> int:
    """Compute this rank's incomplete shards of one view (or of VAL), and those `lost` (recorded
    complete but whose files are gone); returns the rows written."""
    rows = store.part_rows(view)
    complete = store.part_complete(view)
    complete[list(lost)] = False
    shards = [j for j in range(len(complete)) if not complete[j] and j % d.world == d.rank]
    if not shards:
        return 0
    positions = np.concatenate([np.arange(*store.shard_bounds(j, rows)) for j in shards])
    loader = source.loader(
        view, positions, batch_size=cfg.batch_size, workers=cfg.workers, device=device
    )
    label = "val" if view == VAL else f"view {view}/{store.num_views}"
    writer = ShardWriter(store, view, shards, rows, lock=lock)  # a lost lease stops the writes
    with tqdm(
        total=len(positions), desc=label, unit="img", disable=not progress, dynamic_ncols=True
    ) as bar:
        try:
            fault_point = "val-batch" if view == VAL else "after-batch"
            done = write_teacher_logits(model, loader, writer, device, amp, bar, fault_point)
        except OSError as exc:  # an image that went missing or unreadable after the index pass
            writer.abort()
            raise DatasetError(
                f"reading the images of {label} failed ({pipelines.read_error(exc)}): "
                f"check {source.root}, then rerun the same command to resume"
            ) from None
        except BaseException:  # Ctrl-C, a teacher error: the shards already written stay complete
            writer.abort()
            raise
        writer.close()
    return done


def write_teacher_logits(
    model,
    loader,
    writer: ShardWriter,
    device: torch.device,
    amp: str,
    bar,
    fault_point: str = "after-batch",
) -> int:
    """Feed every batch of `loader` through the teacher into `writer`; returns images processed.

    One batch behind: batch i's forward is queued before batch i - 1's logits are copied to the
    host, so on a GPU the copy's wait overlaps the next forward instead of leaving the device idle.
    """
    # pending: (positions, logits on the device) of the batch not yet handed on
    done, pending = 0, None
    for count, batch in enumerate(loader, 1):
        logits = forward(model, batch.images, device, amp)
        if pending is not None:
            done += hand_on(writer, *pending, amp, bar)
            fault(fault_point, count - 1)
        pending = (batch.positions, logits)
    if pending is not None:
        done += hand_on(writer, *pending, amp, bar)
        fault(fault_point, count)
    return done


def hand_on(
    writer: ShardWriter, positions: torch.Tensor, logits: torch.Tensor, amp: str, bar
) -> int:
    """A batch's logits, copied to the host and checked (finite, within the codec's range), to the
    writer."""
    logits = logits.cpu().numpy()
    limit = writer.store.codec.limit
    magnitude = np.abs(logits).max(axis=1, initial=0)  # one pass: nan or inf where a row has any
    finite = np.isfinite(magnitude)
    if not finite.all():  # never store them: every student step on such a row would be NaN
        raise ModelError(
            f"the teacher gave inf or nan logits for {int((~finite).sum())} of {len(finite)} "
            f"images (first at position {int(positions[~finite][0])}) with --amp {amp}: "
            "check the weights, or use --amp bf16 or none (fp16 overflows easily)"
        )
    if magnitude.max(initial=0) > limit:
        raise OptionError(
            f"the teacher gave logits up to {magnitude.max():.3g}, beyond what --codec "
            f"{writer.store.codec.name} stores ({limit:.6g}): use --codec fp32"
        )
    writer.put(positions.numpy(), logits)
    bar.update(len(logits))
    return len(logits)


def summarize(store: Store, rows_written: int, seconds: float) -> BuildSummary:
    store.listing(fresh=True)  # what every rank wrote
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
