"""The cache store: a Zarr v3 group with sharded, zstd-compressed arrays (format 1).

Array names are a contract (DESIGN.md): other tools open the cache with plain zarr.
A shard is the unit of writing (writers never share one; a shard is written in one call),
a chunk the unit of reading. Completion is recorded per shard in `views/complete` and
`val/complete`, whose one-element chunks can be set by several ranks at once.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np
import zarr
import zarr.codecs

from .codecs import Codec, Encoded, get_codec

FORMAT_VERSION = 1
ATTR_KEY = "skd"


class StoreError(ValueError):
    """A cache that cannot be used as asked: str(e) is one line naming the folder and what to do."""


def _zstd():
    return zarr.codecs.ZstdCodec(level=3)


@dataclass(frozen=True)
class Split:
    """What the store records of one split: its samples and, per view, its windows."""

    paths: list[str]
    labels: np.ndarray
    sizes: np.ndarray


class Store:
    """An open cache. `meta` is the `skd` group attribute; arrays are read lazily."""

    def __init__(self, path: Path, group: zarr.Group):
        self.path = Path(path)
        self.group = group
        self.meta: dict = dict(group.attrs[ATTR_KEY])
        self.codec: Codec = get_codec(self.meta["codec"])
        self.shard_rows: int = int(self.meta["shard_rows"])

    # -- shape -------------------------------------------------------------------------------
    @property
    def num_views(self) -> int:
        return int(self.meta["views"])

    @property
    def num_samples(self) -> int:
        return int(self.meta["dataset"]["num_samples"])

    @property
    def num_classes(self) -> int:
        return int(self.meta["teacher"]["num_classes"])

    @property
    def has_val(self) -> bool:
        return "val" in self.group and "logits" in self.group["val"]

    @property
    def num_val(self) -> int:
        return int(self.group["val/label"].shape[0]) if self.has_val else 0

    def num_shards(self, rows: int) -> int:
        return -(-rows // self.shard_rows)

    def shard_bounds(self, shard: int, rows: int) -> tuple[int, int]:
        start = shard * self.shard_rows
        return start, min(rows, start + self.shard_rows)

    # -- samples and plan ------------------------------------------------------------------
    def split(self, name: str = "samples") -> Split:
        """Paths, labels and sizes of the training samples (`samples`) or of `val`."""
        g = self.group[name]
        paths = [str(p) for p in g["path"][:]]
        for p in paths:
            check_relative_path(p, self.path)
        return Split(paths, g["label"][:].astype(np.int64), g["size"][:].astype(np.int64))

    def view_plan(self, view: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(order, box, flip) of one view as recorded."""
        g = self.group["views"]
        return g["order"][view], g["box"][view], g["flip"][view]

    def val_boxes(self) -> np.ndarray:
        return self.group["val/box"][:]

    # -- completion ------------------------------------------------------------------------
    def complete(self) -> np.ndarray:
        """(K, shards) bool: which shards of which view hold final logits."""
        return self.group["views/complete"][:].astype(bool)

    def val_complete(self) -> np.ndarray:
        return self.group["val/complete"][:].astype(bool) if self.has_val else np.zeros(0, bool)

    def is_complete(self) -> bool:
        return bool(self.complete().all() and self.val_complete().all())

    # -- logits ----------------------------------------------------------------------------
    def _logit_group(self, view: int | None) -> tuple[zarr.Group, tuple]:
        """The group holding the logits and the index prefix: views[k] or val (view None)."""
        if view is None:
            return self.group["val"], ()
        return self.group["views"], (view,)

    def write_shard(self, view: int | None, shard: int, encoded: Encoded) -> None:
        """Write one whole shard of logits (and scale/offset) and then mark it complete."""
        g, prefix = self._logit_group(view)
        rows = g["logits"].shape[-2]
        start, stop = self.shard_bounds(shard, rows)
        if encoded.logits.shape[0] != stop - start:
            raise ValueError(f"shard {shard} needs {stop - start} rows, got {encoded.logits.shape[0]}")
        sl = prefix + (slice(start, stop),)
        g["logits"][sl] = encoded.logits
        if self.codec.affine:
            g["scale"][sl] = encoded.scale
            g["offset"][sl] = encoded.offset
        g["complete"][prefix + (shard,)] = 1

    def read_rows(self, view: int | None, start: int, stop: int) -> Encoded:
        """Stored rows [start, stop) of view `view` (None: validation), in the codec's form."""
        g, prefix = self._logit_group(view)
        sl = prefix + (slice(start, stop),)
        if self.codec.affine:
            return Encoded(g["logits"][sl], g["scale"][sl], g["offset"][sl])
        return Encoded(g["logits"][sl])

    def read_logits(self, view: int | None, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Decoded float32 logits of rows [start, stop)."""
        if stop is None:
            g, _ = self._logit_group(view)
            stop = g["logits"].shape[-2]
        return self.codec.decode(self.read_rows(view, start, stop))

    def bytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


def check_relative_path(path: str, cache: Path) -> None:
    """Refuse absolute paths and `..` in a recorded sample path (a cache is data, not trusted)."""
    p = PurePosixPath(path)
    if p.is_absolute() or ".." in p.parts or "\\" in path:
        raise StoreError(f"{cache}: sample path {path!r} is absolute or leaves the dataset root; "
                         "refusing to open files from this cache")


def _create(group: zarr.Group, name: str, data=None, *, shape=None, dtype=None, chunks, shards=None,
            compress=True) -> zarr.Array:
    text = data is not None and data.dtype.kind in "UTO"
    if data is not None:
        shape, dtype = data.shape, (str if text else data.dtype)
    arr = group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, shards=shards,
                             compressors=_zstd() if compress else None, fill_value=None if text else 0,
                             overwrite=True)
    if data is not None:
        arr[...] = data
    return arr


def _write_split(group: zarr.Group, name: str, split: Split, chunk: int) -> None:
    n = len(split.paths)
    c = max(1, min(chunk * 64, n))
    _create(group, f"{name}/path", np.array(split.paths, dtype=object), chunks=(c,))
    _create(group, f"{name}/label", np.asarray(split.labels, np.int32), chunks=(c,))
    _create(group, f"{name}/size", np.asarray(split.sizes, np.int32), chunks=(c, 2))


def _logit_arrays(group: zarr.Group, prefix: str, lead: tuple, rows: int, classes: int, codec: Codec,
                  shard_rows: int, chunk_rows: int) -> None:
    """Create logits (+ scale/offset) of shape lead + (rows, C), sharded along rows, and `complete`."""
    ones = (1,) * len(lead)
    shard, chunk = shard_rows, chunk_rows  # a shard may overhang the array's end; zarr trims it
    _create(group, f"{prefix}/logits", shape=lead + (rows, classes), dtype=codec.dtype,
            chunks=ones + (chunk, classes), shards=ones + (shard, classes))
    if codec.affine:
        for name in ("scale", "offset"):
            _create(group, f"{prefix}/{name}", shape=lead + (rows,), dtype="float32",
                    chunks=ones + (chunk,), shards=ones + (shard,))
    _create(group, f"{prefix}/complete", shape=lead + (-(-rows // shard_rows),), dtype="uint8",
            chunks=ones + (1,), compress=False)


def create_store(path: Path, meta: dict, *, train: Split, plans: list, val: Split | None,
                 val_boxes: np.ndarray | None, num_classes: int) -> Store:
    """Write a new, empty cache: samples, the plan of every view, empty logit arrays.

    The `skd` attribute is written last: a folder without it is an unfinished creation.
    """
    codec = get_codec(meta["codec"])
    shard_rows, chunk_rows = int(meta["shard_rows"]), int(meta["chunk_rows"])
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    n, k = len(train.paths), len(plans)
    if shard_rows % chunk_rows:
        raise ValueError(f"shard rows {shard_rows} must be a multiple of chunk rows {chunk_rows}")
    _write_split(group, "samples", train, chunk_rows)
    shard = min(shard_rows, n)
    order = np.stack([p.order for p in plans]).astype(np.int32)
    box = np.stack([p.box for p in plans]).astype(np.int32)
    flip = np.stack([p.flip for p in plans]).astype(np.uint8)
    _create(group, "views/order", order, chunks=(1, shard))
    _create(group, "views/box", box, chunks=(1, shard, 4))
    _create(group, "views/flip", flip, chunks=(1, shard))
    _logit_arrays(group, "views", (k,), n, num_classes, codec, shard_rows, chunk_rows)
    if val is not None:
        _write_split(group, "val", val, chunk_rows)
        _create(group, "val/box", np.asarray(val_boxes, np.int32), chunks=(min(shard_rows, len(val.paths)), 4))
        _logit_arrays(group, "val", (), len(val.paths), num_classes, codec, shard_rows, chunk_rows)
    group.attrs[ATTR_KEY] = meta
    return Store(Path(path), group)


def is_store(path: Path) -> bool:
    """True when `path` holds a finished cache creation (a zarr group with the `skd` attribute)."""
    try:
        group = zarr.open_group(str(path), mode="r", zarr_format=3)
    except Exception:
        return False
    return ATTR_KEY in group.attrs


REQUIRED_ARRAYS = ("samples/path", "samples/label", "samples/size", "views/order", "views/box",
                   "views/flip", "views/logits", "views/complete")


def open_store(path: Path | str, mode: str = "r") -> Store:
    """Open a cache for reading (or `r+` to continue writing); StoreError for anything unusable."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"cache {path} does not exist: build it with `skd-cache build --out {path}`")
    try:
        group = zarr.open_group(str(path), mode=mode, zarr_format=3)
    except Exception as exc:
        raise StoreError(f"{path} is not a zarr v3 cache ({type(exc).__name__}): "
                         "pass the folder written by `skd-cache build`") from None
    meta = group.attrs.get(ATTR_KEY)
    if meta is None:
        raise StoreError(f"{path} is not an skd cache (no '{ATTR_KEY}' attribute): "
                         "its creation was interrupted or it was written by another tool; rebuild it")
    version = meta.get("format")
    if version != FORMAT_VERSION:
        raise StoreError(f"{path} has cache format {version}, this skd reads format {FORMAT_VERSION}: "
                         "upgrade skd or rebuild the cache")
    missing = [name for name in REQUIRED_ARRAYS if name not in group]
    if missing:
        raise StoreError(f"{path} is missing arrays {', '.join(missing)}: the cache is damaged; rebuild it")
    return Store(path, group)


class RowReader:
    """Streams stored rows [start, stop) of one view in order, reading ahead in a background thread.

    Reads are shard-aligned blocks of up to `block_rows` rows (large reads amortise zarr's per-call
    cost); `batches(batch_size)` slices them into consumer batches of stored (encoded) rows.
    """

    def __init__(self, store: Store, view: int | None, start: int, stop: int, *,
                 block_rows: int | None = None, prefetch: int = 2):
        self.store, self.view, self.start, self.stop = store, view, start, stop
        self.block_rows = block_rows or store.shard_rows
        self.prefetch = prefetch

    def _blocks(self) -> Iterator[tuple[int, int]]:
        pos = self.start
        while pos < self.stop:
            aligned_end = (pos // self.block_rows + 1) * self.block_rows
            end = min(self.stop, aligned_end)
            yield pos, end
            pos = end

    def blocks(self) -> Iterator[tuple[int, Encoded]]:
        """(first row, Encoded block) in order, read ahead by a background thread."""
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        done = object()
        stop_event = threading.Event()

        def produce():
            try:
                for a, b in self._blocks():
                    if stop_event.is_set():
                        return
                    q.put((a, self.store.read_rows(self.view, a, b)))
                q.put(done)
            except BaseException as exc:  # handed to the consumer
                q.put(exc)

        thread = threading.Thread(target=produce, daemon=True, name="skd-row-reader")
        thread.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop_event.set()
            while thread.is_alive():
                try:
                    q.get(timeout=0.1)
                except queue.Empty:
                    pass

    def batches(self, batch_size: int) -> Iterator[tuple[int, Encoded]]:
        """(first row, Encoded rows) of consecutive batches of `batch_size` rows (last one short)."""
        pending: list[Encoded] = []
        pending_rows = 0
        first = self.start
        for _, block in self.blocks():
            pending.append(block)
            pending_rows += block.logits.shape[0]
            while pending_rows >= batch_size:
                merged = _concat(pending)
                yield first, _slice(merged, 0, batch_size)
                first += batch_size
                rest = _slice(merged, batch_size, None)
                pending, pending_rows = [rest], rest.logits.shape[0]
        if pending_rows:
            yield first, _concat(pending)


def _concat(parts: list[Encoded]) -> Encoded:
    if len(parts) == 1:
        return parts[0]
    return Encoded(*(None if parts[0][i] is None else np.concatenate([p[i] for p in parts]) for i in range(3)))


def _slice(e: Encoded, a: int, b: int | None) -> Encoded:
    return Encoded(*(None if x is None else x[a:b] for x in e))
