"""Stage one: run the teacher over the recorded views and write its logits into the cache.

Decode (the input pipeline's workers), teacher forward (this thread) and encode + write (a
background writer with a bounded queue) overlap, so the slowest of the three sets the pace.
Whole shards only, completion recorded per shard: a rerun of the same command resumes.
"""
from __future__ import annotations

import os
import fcntl
import queue
import shutil
import signal
import socket
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torchvision
import zarr
from tqdm import tqdm

import pipelines

from . import __version__
from .codecs import get_codec
from .distributed import Dist, init_distributed, resolve_device, shutdown
from .index import check_root, fingerprint, index_dataset, scan_split
from .plan import CropParams, center_boxes, plan_view
from .store import FORMAT_VERSION, Split, Store, cache_state, create_store, open_store
from .teachers import load_teacher, output_classes

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
VAL_CROP_FRACTION = 224 / 256


class BuildError(ValueError):
    """The build cannot go ahead as asked: one line saying what to change."""


@dataclass
class BuildConfig:
    """Everything `skd-cache build` takes; the plan-, teacher- and data-defining fields are recorded."""

    teacher: str
    data: Path
    out: Path
    weights: str | None = None
    views: int = 10
    image_size: int = 224
    batch_size: int = 256
    codec: str = "int8"
    amp: str = "auto"
    device: str = "auto"
    loader: str = "dali"
    seed: int = 0
    workers: int = 8
    shard_rows: int = 16384
    chunk_rows: int = 1024
    compile: bool = False
    overwrite: bool = False
    val: bool = True
    on_bad_image: str = "error"
    crop: CropParams = field(default_factory=CropParams)


@dataclass
class BuildSummary:
    views: int
    rows_written: int
    rows_total: int
    bytes_on_disk: int
    bytes_per_row: float
    seconds: float
    images_per_sec: float


# The recorded settings a rerun must repeat to resume; anything else may change between runs.
IDENTITY = {
    "teacher": ("teacher", "name"), "weights": ("teacher", "weights_sha256"), "amp": ("teacher", "amp"),
    "data": ("dataset", "fingerprint"), "val data": ("dataset", "val_fingerprint"),
    "seed": ("plan", "seed"), "image-size": ("plan", "image_size"), "crop": ("plan", "crop"),
    "loader": ("plan", "loader"), "codec": ("codec",), "views": ("views",), "shard-size": ("shard_rows",),
}


def differences(recorded: dict, wanted: dict) -> list[str]:
    """Names of the identity settings in which two cache descriptions differ."""
    def get(d, keys):
        for k in keys:
            d = d.get(k) if isinstance(d, dict) else None
        return d
    return [name for name, keys in IDENTITY.items() if get(recorded, keys) != get(wanted, keys)]


def legacy_weights(recorded: dict, meta: dict) -> dict:
    """`meta` as a cache written before tensor hashes recorded it: the weights file's sha256 (None for a
    `py:` teacher without a file) in place of the tensors' sha256."""
    if "weights_hash" in recorded.get("teacher", {}):
        return meta
    teacher = {k: v for k, v in meta["teacher"].items() if k not in ("weights_hash", "file_sha256")}
    return {**meta, "teacher": {**teacher, "weights_sha256": meta["teacher"]["file_sha256"]}}


def _software() -> dict:
    versions = {"skd": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
                "zarr": zarr.__version__, "numpy": np.__version__}
    try:
        import nvidia.dali
        versions["dali"] = nvidia.dali.__version__
    except ImportError:
        pass
    return versions


def _amp_name(cfg: BuildConfig, device: torch.device) -> str:
    if cfg.amp == "auto":
        return "bf16" if device.type == "cuda" else "none"
    if cfg.amp not in AMP_DTYPES:
        raise BuildError(f"--amp {cfg.amp}: choose bf16, fp16, none or auto")
    return cfg.amp


def _identity(cfg: BuildConfig, teacher, amp: str) -> dict:
    """The part of the metadata that decides the cache's contents (compared on resume)."""
    return {
        "format": FORMAT_VERSION,
        "teacher": {"name": cfg.teacher, "weights": teacher.weights, "weights_sha256": teacher.weights_sha256,
                    "weights_hash": "tensors", "file_sha256": teacher.file_sha256,
                    "amp": amp, "mean": list(pipelines.IMAGENET_MEAN), "std": list(pipelines.IMAGENET_STD)},
        "dataset": {"root": str(Path(cfg.data).resolve())},
        "plan": {"seed": cfg.seed, "image_size": cfg.image_size, "crop": cfg.crop.to_dict(),
                 "val_crop_fraction": VAL_CROP_FRACTION, "loader": cfg.loader},
        "codec": cfg.codec, "views": cfg.views, "shard_rows": cfg.shard_rows, "chunk_rows": cfg.chunk_rows,
    }


def quick_fingerprints(root: Path, with_val: bool, skipped=()) -> tuple[str, str | None]:
    """Dataset fingerprints from a directory scan and file sizes, without opening any image.

    `skipped` are the paths a `--on-bad-image skip` build left out (recorded in the cache).
    """
    leave_out = {path for path, _ in skipped}
    out = []
    for split in ("train", "val"):
        if split == "val" and not (with_val and (root / "val").is_dir()):
            out.append(None)
            continue
        paths, _ = scan_split(root, split, empty=[])
        paths = [p for p in paths if p not in leave_out]
        out.append(fingerprint(paths, [os.stat(root / p).st_size for p in paths]))
    return out[0], out[1]


def _create(cfg: BuildConfig, meta: dict, index, num_classes: int) -> Store:
    """Plan every view of the indexed dataset and write an empty cache."""
    meta["dataset"].update(num_samples=len(index.train), classes=index.classes,
                           num_val=len(index.val) if index.val is not None else 0,
                           fingerprint=index.train.fingerprint,
                           val_fingerprint=index.val.fingerprint if index.val is not None else None,
                           skipped=[list(item) for item in index.skipped])
    plans = [plan_view(cfg.seed, k, index.train.sizes, cfg.crop) for k in range(cfg.views)]
    train = Split(index.train.paths, index.train.labels, index.train.sizes)
    val = None if index.val is None else Split(index.val.paths, index.val.labels, index.val.sizes)
    val_boxes = None if index.val is None else center_boxes(index.val.sizes, VAL_CROP_FRACTION)
    return create_store(cfg.out, meta, train=train, plans=plans, val=val, val_boxes=val_boxes,
                        num_classes=num_classes)


def check_out(out: Path, data: Path) -> None:
    """Refuse an --out that is not a cache folder, so that neither a build nor --overwrite can touch other files."""
    o, d = out.resolve(), data.resolve()
    if o == d or o in d.parents or any(o == d / s or d / s in o.parents for s in ("train", "val")):
        raise BuildError(f"--out {out} overlaps the dataset {data}: choose a folder outside its train/ and val/")
    for path in (out, *out.parents):
        if path.exists() and not path.is_dir():
            raise BuildError(f"--out {out}: {path} is a file: choose a folder for the cache")
    if out.is_dir() and any(out.iterdir()) and cache_state(out) is None:
        what = "a zarr group skd did not create (or one whose zarr.json is damaged)" \
            if (out / "zarr.json").exists() else "not an skd cache"
        raise BuildError(f"{out} exists and is {what}: choose another --out "
                         "(--overwrite replaces only a cache; remove other folders yourself)")


def prepare_store(cfg: BuildConfig, meta: dict, num_classes, progress: bool) -> Store:
    """Open the cache at cfg.out for resuming, or index the data and create it.

    Refuses a cache built with different identity settings. `num_classes()` runs the teacher
    once; it is called only after the dataset index found no bad image.
    """
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        if cache_state(out) == "creating":
            raise BuildError(f"{out} holds an unfinished cache creation: pass --overwrite to start it again")
        store = open_store(out, mode="r+")
        if cfg.val and not store.has_val and (Path(cfg.data) / "val").is_dir():
            raise BuildError(f"{out} was built with --no-val: pass --no-val to resume, or --overwrite to rebuild "
                             "it with the validation logits")
        skipped = store.meta["dataset"].get("skipped", [])
        train_fp, val_fp = quick_fingerprints(Path(cfg.data), store.has_val, skipped)
        meta["dataset"].update(fingerprint=train_fp, val_fingerprint=val_fp)
        changed = differences(store.meta, legacy_weights(store.meta, meta))
        if changed:
            raise BuildError(f"{out} was built with other settings ({', '.join(changed)}): pass the same "
                             "arguments to resume, another --out, or --overwrite to rebuild")
        for leftover in out.rglob("*.partial"):  # zarr writes through temporary files; a killed build leaves them
            leftover.unlink()
        return store
    index = index_dataset(cfg.data, with_val=cfg.val, workers=max(4, cfg.workers), progress=progress,
                          on_bad=cfg.on_bad_image)
    classes = num_classes()
    if classes < len(index.classes):
        raise BuildError(f"teacher {cfg.teacher} has {classes} outputs but {cfg.data}/train has "
                         f"{len(index.classes)} classes: use a teacher trained on these classes")
    meta["teacher"]["num_classes"] = classes
    if out.exists() and cfg.overwrite:
        shutil.rmtree(out)
    return _create(cfg, meta, index, classes)


class ShardWriter:
    """Background writer: buffers rows of whole shards, encodes and writes each when full.

    `put` blocks when `depth` batches are waiting, so a slow disk slows the producer instead of
    filling memory. Errors in the writer surface in the producer's next `put` or in `close`.
    """

    def __init__(self, store: Store, view: int | None, shards: list[int], rows: int, depth: int = 8):
        self.store, self.view, self.rows = store, view, rows
        self.shards = list(shards)
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.shards_written = 0
        self.thread = threading.Thread(target=self._run, daemon=True, name="skd-shard-writer")
        self.thread.start()

    def put(self, positions: np.ndarray, logits: np.ndarray) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((positions, logits))

    def close(self) -> None:
        """Wait for every shard to be written; raises the writer's error or a shard left unfilled."""
        self.abort()
        if self.error is not None:
            raise self.error
        if self.shards:
            raise RuntimeError(f"input ended before shards {self.shards} were full")

    def abort(self) -> None:
        """Let the writer finish the rows already queued, then stop; never raises (close reports errors)."""
        self.queue.put(None)
        self.thread.join()

    def _run(self) -> None:
        codec = get_codec(self.store.meta["codec"])
        buffer: list[np.ndarray] = []
        filled = 0
        try:
            while True:
                item = self.queue.get()
                if item is None:
                    return
                positions, logits = item
                while len(positions):  # a batch may end one shard and start the next (of this rank)
                    if not self.shards:
                        raise RuntimeError(f"rows arrived past the last shard at position {positions[0]}")
                    start, stop = self.store.shard_bounds(self.shards[0], self.rows)
                    take = min(len(positions), stop - start - filled)
                    if not np.array_equal(positions[:take], np.arange(start + filled, start + filled + take)):
                        raise RuntimeError(f"rows arrived out of order at position {positions[0]}")
                    buffer.append(logits[:take])
                    filled += take
                    positions, logits = positions[take:], logits[take:]
                    if filled == stop - start:
                        self._write(self.shards[0], codec.encode(np.concatenate(buffer)))
                        self.shards.pop(0)
                        self.shards_written += 1
                        fault("after-shard", self.shards_written)
                        buffer, filled = [], 0
        except BaseException as exc:  # handed to the producer thread
            self.error = exc
            while self.queue.get() is not None:
                pass

    def _write(self, shard: int, encoded) -> None:
        """Write a shard's rows, then mark it complete: a kill in between leaves it incomplete."""
        where = "val" if self.view is None else f"view {self.view}"
        try:
            self.store.write_shard_data(self.view, shard, encoded)
            fault("mid-shard", self.shards_written + 1)
            self.store.mark_complete(self.view, shard)
        except OSError as exc:
            raise BuildError(f"cannot write shard {shard} of {where} to {self.store.path} "
                             f"({exc.strerror or exc}): free space or fix the disk, then rerun the same "
                             "command to resume") from None


def fault(point: str, count: int) -> None:
    """Fault injection for the crash tests: SKD_FAULT=<point>:<count> kills this process with SIGKILL,
    SKD_INTERRUPT=<point>:<count> sends it SIGINT (a Ctrl-C).

    Points: after-batch (batches fed to the writer), mid-shard (rows written, completion not yet
    recorded), after-shard (completion recorded), val-batch (batches of the validation pass);
    in skd-train: train-step (steps since the process started), after-epoch (checkpoint written).
    """
    here = f"{point}:{count}"
    if os.environ.get("SKD_FAULT") == here:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("SKD_INTERRUPT") == here:
        os.kill(os.getpid(), signal.SIGINT)


def _positions(store: Store, shards: list[int], rows: int) -> np.ndarray:
    parts = [np.arange(*store.shard_bounds(j, rows)) for j in shards]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def run_teacher(model, loader, writer: ShardWriter, device: torch.device, amp: str, bar,
                fault_point: str = "after-batch") -> int:
    """Feed every batch of `loader` through the teacher into `writer`; returns images processed."""
    dtype = AMP_DTYPES[amp]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    done = 0
    with torch.inference_mode(), autocast:
        for count, batch in enumerate(loader, 1):
            images = batch.images.to(device, non_blocking=True)
            if device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            logits = model(images).float().cpu().numpy()
            magnitude = np.abs(logits).max(axis=1, initial=0)  # one pass: nan or inf where a row has any
            finite = np.isfinite(magnitude)
            if not finite.all():  # never store them: every student step on such a row would be NaN
                raise BuildError(f"the teacher gave inf or nan logits for {int((~finite).sum())} of {len(finite)} "
                                 f"images (first at position {int(batch.positions[~finite][0])}) with --amp {amp}: "
                                 "check the weights, or use --amp bf16 or none (fp16 overflows easily)")
            if magnitude.max(initial=0) > writer.store.codec.limit:
                raise BuildError(f"the teacher gave logits up to {magnitude.max():.3g}, beyond what --codec "
                                 f"{writer.store.codec.name} stores ({writer.store.codec.limit:.6g}): use --codec fp32")
            writer.put(batch.positions.numpy(), logits)
            done += len(logits)
            bar.update(len(logits))
            fault(fault_point, count)
    return done


def build_cache(cfg: BuildConfig, *, progress: bool = False, log=None) -> BuildSummary:
    """Build (or resume) the cache described by `cfg`; returns what this run did."""
    log = log or (lambda message: None)
    cfg = replace(cfg, out=Path(cfg.out).resolve())  # `--out .` and relative paths name one folder everywhere
    try:
        get_codec(cfg.codec)
    except ValueError as exc:
        raise BuildError(f"--codec: {exc}") from None
    device_kind = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    d = init_distributed(device_kind)
    try:
        return _build(cfg, d, progress=progress and d.main, log=log if d.main else (lambda m: None))
    finally:
        shutdown(d)


def _build(cfg: BuildConfig, d: Dist, *, progress: bool, log) -> BuildSummary:
    started = time.perf_counter()
    device = resolve_device(cfg.device, d)
    amp = _amp_name(cfg, device)
    root = Path(cfg.data)
    check_root(root)  # before the lock and --out's parents are created
    teacher = load_teacher(cfg.teacher, cfg.weights)
    model = teacher.model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    meta = _identity(cfg, teacher, amp)
    meta["software"] = _software()
    lock = None
    problem = None
    if d.main:
        try:
            check_out(Path(cfg.out), root)
            lock = BuildLock(Path(cfg.out))
            store = prepare_store(cfg, meta, lambda: output_classes(model, cfg.image_size, device,
                                                                    f"teacher {cfg.teacher}"), progress)
        except OSError as exc:
            problem = BuildError(f"--out {cfg.out}: {exc.strerror or exc}"
                                 f"{f' ({exc.filename})' if exc.filename else ''}: choose a folder you can write")
        except Exception as exc:  # BuildError, ModelError, DatasetError...: the lock file must not stay behind
            problem = exc
    problem = d.broadcast(problem)
    if problem is not None:
        if lock is not None:
            lock.release()
        raise problem
    if not d.main:
        store = open_store(cfg.out, mode="r+")
    if cfg.compile:
        model = torch.compile(model)
    try:
        return _fill(cfg, d, store, model, device, amp, root, started, progress)
    finally:
        if lock is not None:
            lock.release()


def _fill(cfg: BuildConfig, d: Dist, store: Store, model, device: torch.device, amp: str, root: Path,
          started: float, progress: bool) -> BuildSummary:
    """Compute every incomplete shard this rank owns, view by view, then the validation split."""

    samples = store.split("samples")
    n = store.num_samples
    rows_written = 0
    jobs: list[tuple[int | None, str]] = [(k, f"view {k}/{store.num_views}") for k in range(store.num_views)]
    if store.has_val:
        jobs.append((None, "val"))
    for view, label in jobs:
        if view is None:
            split = store.split("val")
            rows, complete = len(split.paths), store.val_complete()
            order, box, flip = np.arange(rows), store.val_boxes(), np.zeros(rows, np.uint8)
        else:
            split, rows, complete = samples, n, store.complete()[view]
            order, box, flip = store.view_plan(view)
        shards = [j for j in range(len(complete)) if not complete[j] and j % d.world == d.rank]
        if not shards:
            continue
        positions = _positions(store, shards, rows)
        ids = order[positions]
        loader = pipelines.make_loader(
            cfg.loader, files=[str(root / split.paths[i]) for i in ids], boxes=box[positions],
            flips=flip[positions], labels=split.labels[ids], positions=positions,
            image_size=cfg.image_size, batch_size=cfg.batch_size, workers=cfg.workers, device=device)
        writer = ShardWriter(store, view, shards, rows)
        with tqdm(total=len(positions), desc=label, unit="img", disable=not progress, dynamic_ncols=True) as bar:
            try:
                rows_written += run_teacher(model, loader, writer, device, amp, bar,
                                            "val-batch" if view is None else "after-batch")
            except OSError as exc:  # an image that went missing or unreadable after the index pass
                writer.abort()
                raise BuildError(f"reading the images of {label} failed ({pipelines.read_error(exc)}): "
                                 f"check {root}, then rerun the same command to resume") from None
            except BaseException:  # Ctrl-C, a teacher error: the shards already written stay complete
                writer.abort()
                raise
            writer.close()
    rows_written = d.total(rows_written)  # also the barrier: every rank has written its shards
    seconds = time.perf_counter() - started
    if d.main:
        store = open_store(cfg.out, mode="r+")
        if store.is_complete() and not store.meta.get("complete"):
            store.group.attrs["skd"] = {**store.meta, "complete": True}
    return summarize(store, rows_written, seconds)


class BuildLock:
    """An exclusive lock beside the cache (`DIR.lock`), so two builds never write one cache.

    flock is released by the kernel when the holder dies, even by kill -9; the file names the
    holder for the refusal message.
    """

    def __init__(self, out: Path):
        out = out.resolve()  # `--out .` has no name to put a lock beside
        out.parent.mkdir(parents=True, exist_ok=True)
        self.path = out.with_name(out.name + ".lock")
        while True:
            self.file = open(self.path, "a+")
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.file.seek(0)
                holder = self.file.read().strip() or "another process"
                self.file.close()
                raise BuildError(f"{out} is being built by {holder}: wait for it to finish or stop it, "
                                 "then rerun to resume") from None
            if self._still_at_path():
                break
            self.file.close()  # the holder released (and removed) it while we waited: lock the new file
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        self.file.flush()

    def _still_at_path(self) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(self.file.fileno()).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if not self.file.closed:
            self.path.unlink(missing_ok=True)
            self.file.close()


def summarize(store: Store, rows_written: int, seconds: float) -> BuildSummary:
    from .stats import storage

    total = store.num_views * store.num_samples + store.num_val
    return BuildSummary(views=store.num_views, rows_written=rows_written, rows_total=total,
                        bytes_on_disk=store.bytes_on_disk(), bytes_per_row=storage(store)["bytes_per_row"] or 0.0,
                        seconds=seconds, images_per_sec=rows_written / max(seconds, 1e-9))


def summary_lines(s: BuildSummary) -> list[str]:
    return [f"views {s.views}, rows {s.rows_total:,} ({s.rows_written:,} written now)",
            f"on disk {s.bytes_on_disk / 2**20:,.1f} MiB, {s.bytes_per_row:,.0f} B per row of logits",
            f"time {s.seconds:,.1f} s, {s.images_per_sec:,.1f} images/s"]

