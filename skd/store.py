"""The cache store: a Zarr v3 group with sharded, zstd-compressed arrays (format 1).

Array names are a contract (DESIGN.md): other tools open the cache with plain zarr.
A shard is the unit of writing (writers never share one; a shard is written in one call),
a chunk the unit of reading. Completion is recorded per shard in `views/complete` and
`val/complete`, whose one-element chunks can be set by several ranks at once.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import zarr
import zarr.codecs

from .codecs import Codec, Encoded, get_codec

FORMAT_VERSION = 1
ATTR_KEY = "skd"
CREATING_KEY = "skd_creating"  # set while create_store runs: a folder with only this is our unfinished creation


class StoreError(ValueError):
    """A cache that cannot be used as asked: str(e) is one line naming the folder and what to do."""


def _zstd():
    """zstd with a content checksum per chunk: a flipped byte anywhere fails to decode, never
    decodes silently to another value (the shard index has its own crc32c)."""
    return zarr.codecs.ZstdCodec(level=3, checksum=True)


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
        # every complete shard has its files (older caches left out shards of fill values only)
        self.whole_shards: bool = bool(self.meta.get("whole_shards", False))

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
        paths = [str(p) for p in self._read(f"{name}/path")]
        for p in paths:
            check_relative_path(p, self.path)
        return Split(paths, self._read(f"{name}/label").astype(np.int64), self._read(f"{name}/size").astype(np.int64))

    def view_plan(self, view: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(order, box, flip) of one view as recorded."""
        return tuple(self._read(f"views/{name}", view) for name in ("order", "box", "flip"))

    def val_boxes(self) -> np.ndarray:
        return self._read("val/box")

    def _read(self, name: str, selection=slice(None)) -> np.ndarray:
        """Values of a plan, sample or flag array; a damaged or missing one is a StoreError naming it."""
        try:
            return self.group[name][selection]
        except (KeyError, ValueError, RuntimeError) as exc:  # zarr and numcodecs raise many kinds on damage
            raise StoreError(f"{self.path}: {name} cannot be read ({exc}): the cache is damaged; "
                             "`skd-cache verify --integrity` lists what is, and rebuilding with --overwrite "
                             "replaces it") from exc

    # -- completion ------------------------------------------------------------------------
    def complete(self) -> np.ndarray:
        """(K, shards) bool: which shards of which view hold final logits."""
        return self._read("views/complete").astype(bool)

    def val_complete(self) -> np.ndarray:
        return self._read("val/complete").astype(bool) if self.has_val else np.zeros(0, bool)

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
        self.write_shard_data(view, shard, encoded)
        self.mark_complete(view, shard)

    def mark_complete(self, view: int | None, shard: int) -> None:
        g, prefix = self._logit_group(view)
        g["complete"][prefix + (shard,)] = 1

    def write_shard_data(self, view: int | None, shard: int, encoded: Encoded) -> None:
        """Write one whole shard of logits (and scale/offset), in one call per array."""
        g, prefix = self._logit_group(view)
        rows = g["logits"].shape[-2]
        start, stop = self.shard_bounds(shard, rows)
        if encoded.logits.shape[0] != stop - start:
            raise ValueError(f"shard {shard} needs {stop - start} rows, got {encoded.logits.shape[0]}")
        sl = prefix + (slice(start, stop),)
        parts = {"logits": encoded.logits}
        if self.codec.affine:
            parts.update(scale=encoded.scale, offset=encoded.offset)
        for name, data in parts.items():
            array = g[name]
            # An unfinished shard's old file may be damaged, and zarr merges a short last shard into it.
            shard_file(array, prefix, shard).unlink(missing_ok=True)
            # Every shard gets its file, even one of fill values: a missing file then always means damage.
            array.with_config({"write_empty_chunks": True})[sl] = data

    def shard_files(self, view: int | None, shard: int) -> list[Path]:
        """The files of shard `shard` of view `view` (None: val): logits, and scale and offset when affine."""
        g, prefix = self._logit_group(view)
        names = ("logits", "scale", "offset") if self.codec.affine else ("logits",)
        return [shard_file(g[name], prefix, shard) for name in names]

    def missing_shard_files(self, view: int | None, shard: int) -> list[Path]:
        """Files of a complete shard that were lost (none can be, by design, in caches without whole shards)."""
        if not self.whole_shards:
            return []
        return [f for f in self.shard_files(view, shard) if not f.exists()]

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
    """Refuse absolute paths and `..` in a recorded sample path (a cache is data, not trusted).

    Plain string tests rather than PurePosixPath: this runs once per sample, 1.28 M times.
    """
    if (path.startswith("/") or "\\" in path or path == ".." or path.startswith("../")
            or path.endswith("/..") or "/../" in path):
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


def shard_file(array: zarr.Array, prefix: tuple, shard: int) -> Path:
    """The file holding shard `shard` (along rows) of a logits, scale or offset array in a local cache."""
    coords = prefix + (shard,) + (0,) * (array.ndim - len(prefix) - 1)
    return Path(array.store_path.store.root) / array.store_path.path / array.metadata.encode_chunk_key(coords)


def create_store(path: Path, meta: dict, *, train: Split, plans: list, val: Split | None,
                 val_boxes: np.ndarray | None, num_classes: int) -> Store:
    """Write a new, empty cache: samples, the plan of every view, empty logit arrays.

    The group starts with only the `skd_creating` attribute and gets `skd` last, so an interrupted
    creation is recognisable as ours. `path` must be absent or empty (mode w-: nothing already there
    is ever cleared).
    """
    codec = get_codec(meta["codec"])
    shard_rows, chunk_rows = int(meta["shard_rows"]), int(meta["chunk_rows"])
    group = zarr.open_group(str(path), mode="w-", zarr_format=3, attributes={CREATING_KEY: True})
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
    group.attrs.put({ATTR_KEY: {**meta, "whole_shards": True}})
    return Store(Path(path), group)


def cache_state(path: Path) -> str | None:
    """"cache" for a created cache (a zarr group with the `skd` attribute), "creating" for a creation of
    ours that was interrupted, None for anything else (another zarr group, a plain or unreadable folder)."""
    try:
        group = zarr.open_group(str(path), mode="r", zarr_format=3)
        attrs = group.attrs
        if ATTR_KEY in attrs:
            return "cache"
        # creations before the marker are known by their first array
        return "creating" if CREATING_KEY in attrs or "samples/path" in group else None
    except Exception:
        return None


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

    Reads are shard-aligned blocks of up to `block_rows` rows (large reads amortise per-call costs);
    `batches(batch_size)` slices them into consumer batches of stored (encoded) rows, as views of the
    blocks wherever a batch lies inside one block. A local store in the layout `create_store` writes
    (Zarr v3 sharding with the index at the end, bytes + zstd chunks) is read without zarr's per-chunk
    machinery: one file read per shard, the shard index's crc32c checked, each chunk zstd-decoded
    straight into the block. Any other layout or store is read through zarr (`Store.read_rows`).
    """

    def __init__(self, store: Store, view: int | None, start: int, stop: int, *,
                 block_rows: int | None = None, prefetch: int = 2, threads: int = 2):
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        rows = store.num_samples if view is not None else store.num_val
        if view is not None and not 0 <= view < store.num_views:
            raise ValueError(f"view {view} is outside the cache's {store.num_views} views")
        if not 0 <= start <= stop <= rows:
            raise ValueError(f"rows [{start}, {stop}) are outside the {rows} rows of {_split_name(view)}")
        self.store, self.view, self.start, self.stop = store, view, start, stop
        self.block_rows = block_rows or store.shard_rows
        self.prefetch = prefetch
        self.threads = threads
        self._direct = self._Sharded.for_view(store, view)

    def _read(self, a: int, b: int, pool: ThreadPoolExecutor | None = None) -> Encoded:
        try:
            if self._direct is None:
                return self.store.read_rows(self.view, a, b)
            return Encoded(*(None if arr is None else arr.read(a, b, pool) for arr in self._direct))
        except (ValueError, RuntimeError) as exc:  # zarr and numcodecs raise many kinds on damaged bytes
            raise StoreError(f"{self.store.path}: rows {a}-{b} of {_split_name(self.view)} cannot be read ({exc}): "
                             "the cache is damaged; `skd-cache verify --integrity` lists every bad shard, "
                             "and rebuilding with --overwrite replaces it") from exc
        except OSError as exc:  # permissions, I/O errors, stale network mounts: the cache's files, not the images
            raise StoreError(f"{self.store.path}: rows {a}-{b} of {_split_name(self.view)} cannot be read "
                             f"({exc.strerror or exc}: {exc.filename or 'a cache file'}): check the cache's "
                             "files and their permissions") from exc

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
            pool = ThreadPoolExecutor(self.threads, "skd-zstd") if self.threads > 1 and self._direct else None
            try:
                for a, b in self._blocks():
                    if stop_event.is_set():
                        return
                    q.put((a, self._read(a, b, pool)))
                q.put(done)
            except BaseException as exc:  # handed to the consumer
                q.put(exc)
            finally:
                if pool is not None:
                    pool.shutdown()

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
            while thread.is_alive():  # unblock a producer waiting on a full queue, then let it finish
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(0.01)

    def batches(self, batch_size: int) -> Iterator[tuple[int, Encoded]]:
        """(first row, Encoded rows) of consecutive batches of `batch_size` rows (last one short).

        A batch inside one block is a view of it; only a batch that straddles two blocks is copied.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        carry: Encoded | None = None  # fewer than batch_size rows left over from earlier blocks
        first = self.start
        for _, block in self.blocks():
            n, pos = block.logits.shape[0], 0
            if carry is not None:
                need = batch_size - carry.logits.shape[0]
                if n < need:
                    carry = _concat([carry, block])
                    continue
                yield first, _concat([carry, _slice(block, 0, need)])
                first, pos, carry = first + batch_size, need, None
            while n - pos >= batch_size:
                yield first, _slice(block, pos, pos + batch_size)
                first, pos = first + batch_size, pos + batch_size
            if pos < n:
                carry = _slice(block, pos, None)
        if carry is not None:
            yield first, carry

    class _Sharded:
        """Direct reads of one sharded logit array (logits, scale or offset) of a local store.

        Shard files hold zstd frames of whole chunks followed by the index: (offset, nbytes) uint64
        little-endian per chunk (all ones: chunk absent, read as the fill value) and its crc32c.
        """

        MISSING = 2**64 - 1

        def __init__(self, array, lead: tuple, row_axis: int, crc, whole_shards: bool):
            import numcodecs

            self.array, self.lead, self.crc = array, lead, crc
            self.whole_shards = whole_shards
            self.dtype = np.dtype(array.dtype)
            self.row_shape = tuple(array.shape[row_axis + 1:])
            self.rows = int(array.shape[row_axis])
            self.shard_rows = int(array.metadata.chunk_grid.chunk_shape[row_axis])
            self.chunk_rows = int(array.metadata.codecs[0].chunk_shape[row_axis])
            self.chunks = self.shard_rows // self.chunk_rows
            self.fill = array.fill_value
            self.zstd = numcodecs.Zstd()
            self.buffer = bytearray(0)  # compressed bytes of the shard being read (one reader thread)

        @classmethod
        def for_view(cls, store: Store, view: int | None) -> list | None:
            """[logits, scale, offset] readers (None where the codec has no such array), or None
            when any array is not in the layout these reads understand (then zarr reads it)."""
            import sys

            try:
                import google_crc32c
                crc = google_crc32c.value
            except ImportError:
                try:
                    import crc32c
                    crc = crc32c.crc32c
                except ImportError:
                    return None
            if sys.byteorder != "little":
                return None
            g, prefix = store._logit_group(view)
            names = ("logits", "scale", "offset") if store.codec.affine else ("logits",)
            out = []
            for name in names:
                try:
                    array = g[name]
                    understood = cls._understood(array, len(prefix))
                except Exception:  # anything unexpected: leave it to zarr
                    return None
                if not understood:
                    return None
                out.append(cls(array, prefix, len(prefix), crc, store.whole_shards))
            return out + [None] * (3 - len(out))

        @staticmethod
        def _understood(array, row_axis: int) -> bool:
            """True for a local, sharded array in create_store's layout (its shard files are read directly)."""
            from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
            from zarr.storage import LocalStore

            def name(value):  # an enum member (zarr 3.1) or its string (zarr 3.4)
                return getattr(value, "value", value)
            md = array.metadata
            if getattr(md, "zarr_format", None) != 3 or len(md.codecs) != 1:
                return False
            sharding = md.codecs[0]
            shard_shape = tuple(md.chunk_grid.chunk_shape)
            dtype = np.dtype(array.dtype)
            little = (None, "little") if dtype.itemsize == 1 else ("little",)
            return (isinstance(sharding, ShardingCodec)
                    and name(sharding.index_location) == "end"
                    and [type(c) for c in sharding.index_codecs] == [BytesCodec, Crc32cCodec]
                    and name(sharding.index_codecs[0].endian) == "little"
                    and [type(c) for c in sharding.codecs] == [BytesCodec, ZstdCodec]
                    and name(sharding.codecs[0].endian) in little
                    and dtype.byteorder in "=|<"
                    and all(s == 1 for s in shard_shape[:row_axis] + tuple(sharding.chunk_shape[:row_axis]))
                    and shard_shape[row_axis + 1:] == tuple(array.shape[row_axis + 1:])
                    and tuple(sharding.chunk_shape[row_axis + 1:]) == tuple(array.shape[row_axis + 1:])
                    and shard_shape[row_axis] % sharding.chunk_shape[row_axis] == 0
                    and isinstance(array.store_path.store, LocalStore))

        def read(self, a: int, b: int, pool: ThreadPoolExecutor | None = None) -> np.ndarray:
            """Rows [a, b) as a new C-contiguous array; a shard's chunks are decoded by `pool` when given
            (zstd releases the GIL, so each thread adds a core's worth of decompression)."""
            out = np.empty((b - a,) + self.row_shape, self.dtype)
            for shard in range(a // self.shard_rows, -(-b // self.shard_rows)):
                s0 = shard * self.shard_rows
                self._read_shard(shard, max(a, s0) - s0, min(b, s0 + self.shard_rows) - s0,
                                 out[max(a, s0) - a:min(b, s0 + self.shard_rows) - a], pool)
            return out

        def _read_shard(self, shard: int, r0: int, r1: int, out: np.ndarray,
                        pool: ThreadPoolExecutor | None) -> None:
            """Rows [r0, r1) of one shard (shard-relative) into `out`."""
            import os

            c0, c1 = r0 // self.chunk_rows, -(-r1 // self.chunk_rows)
            path = shard_file(self.array, self.lead, shard)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:  # readers read complete shards only
                if self.whole_shards:
                    raise ValueError(f"{path} is missing") from None
                out[...] = self.fill  # an older cache: zarr left out a shard of fill values
                return
            try:
                index_bytes = self.chunks * 16 + 4
                size = os.fstat(fd).st_size
                tail = os.pread(fd, index_bytes, size - index_bytes) if size >= index_bytes else b""
                if len(tail) != index_bytes or self.crc(tail[:-4]) != int.from_bytes(tail[-4:], "little"):
                    raise ValueError(f"{path}: shard index fails its crc32c check (damaged file)")
                index = np.frombuffer(tail, "<u8", count=2 * self.chunks).reshape(self.chunks, 2)[c0:c1]
                present = index[:, 0] != self.MISSING
                if present.any():
                    lo = int(index[present, 0].min())
                    hi = int((index[present, 0] + index[present, 1]).max())
                    if hi > size - index_bytes:
                        raise ValueError(f"{path}: shard index points past the data (damaged file)")
                    data = self._pread(fd, hi - lo, lo)
            except OSError as exc:  # a read error names the file, as the open does
                raise OSError(exc.errno, exc.strerror, str(path)) from exc
            finally:
                os.close(fd)
            chunk_shape = (self.chunk_rows,) + self.row_shape

            def decode_chunk(i: int, offset: int, nbytes: int) -> None:
                g0 = (c0 + i) * self.chunk_rows  # shard-relative rows of this chunk
                lo_row, hi_row = max(r0, g0), min(r1, g0 + self.chunk_rows)
                dest = out[lo_row - r0:hi_row - r0]
                if offset == self.MISSING:
                    dest[...] = self.fill
                    return
                frame = data[offset - lo:offset - lo + nbytes]
                whole = hi_row - lo_row == self.chunk_rows
                target = dest if whole else np.empty(chunk_shape, self.dtype)
                flat = target.reshape(-1).view(np.uint8)
                if self._frame_size(frame) == flat.nbytes:
                    self.zstd.decode(frame, out=flat)
                else:  # no recorded size, or another one: decode, then check the length
                    raw = np.frombuffer(self.zstd.decode(frame), np.uint8)
                    if raw.nbytes != flat.nbytes:
                        raise ValueError(f"{path}: chunk {c0 + i} holds {raw.nbytes} bytes, not {flat.nbytes} "
                                         "(damaged file)")
                    flat[...] = raw
                if not whole:
                    dest[...] = target[lo_row - g0:hi_row - g0]

            chunks = [(i, offset, nbytes) for i, (offset, nbytes) in enumerate(index.tolist())]
            if pool is None or len(chunks) < 2:
                for chunk in chunks:
                    decode_chunk(*chunk)
            else:
                futures = [pool.submit(decode_chunk, *chunk) for chunk in chunks]
                wait(futures)  # all of them: the shard's buffer is reused by the next read
                for future in futures:
                    future.result()  # the first error, if any

        def _pread(self, fd: int, size: int, offset: int) -> memoryview:
            """`size` bytes at `offset`, read into a buffer this reader reuses (no fresh pages per shard)."""
            import os

            if not hasattr(os, "preadv"):
                return memoryview(os.pread(fd, size, offset))
            if len(self.buffer) < size:
                self.buffer = bytearray(size)
            view = memoryview(self.buffer)[:size]
            got = os.preadv(fd, [view], offset)
            if got != size:
                raise ValueError(f"short read of a shard file ({got} of {size} bytes)")
            return view

        @staticmethod
        def _frame_size(frame: memoryview) -> int | None:
            """Content size recorded in a zstd frame header (None when absent or not a zstd frame)."""
            if len(frame) < 6 or bytes(frame[:4]) != b"\x28\xb5\x2f\xfd":
                return None
            descriptor = frame[4]
            fcs_flag, single, dict_flag = descriptor >> 6, (descriptor >> 5) & 1, descriptor & 3
            pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag]
            width = (1 if single else 0, 2, 4, 8)[fcs_flag]
            if width == 0 or len(frame) < pos + width:
                return None
            value = int.from_bytes(bytes(frame[pos:pos + width]), "little")
            return value + 256 if width == 2 else value


def _split_name(view: int | None) -> str:
    return "val" if view is None else f"view {view}"


def _concat(parts: list[Encoded]) -> Encoded:
    if len(parts) == 1:
        return parts[0]
    return Encoded(*(None if parts[0][i] is None else np.concatenate([p[i] for p in parts]) for i in range(3)))


def _slice(e: Encoded, a: int, b: int | None) -> Encoded:
    return Encoded(*(None if x is None else x[a:b] for x in e))
