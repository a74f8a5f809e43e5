"""The cache store: a Zarr v3 group with sharded, zstd-compressed arrays (format 2).

Array names, shapes and attributes are a contract, written down in cache/README.md: other tools
open the cache with plain zarr.
A shard is the unit of writing (writers never share one; a shard is written in one call),
a chunk the unit of reading. Completion is recorded per shard in `views/complete` and
`val/complete`, whose one-element chunks can be set by several ranks at once.
A cache is a local folder or a prefix in an object store (`s3://`, `gs://`, `az://`: see skd.location);
the shard checks and storage figures of an object store work on one listing of its prefix.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
import zarr.codecs
import zarr.storage
from zarr.core.buffer import default_buffer_prototype

from .codecs import Codec, Encoded, get_codec
from .location import Location, ObjectPath, StoreError, check_objects, parse_location, scrub
from .schema import check_arrays, check_files, check_meta, check_relative_path, samples_sha256

__all__ = ["Location", "ObjectPath", "StoreError", "parse_location"]  # re-exported: callers import them from here

# zarrs (Rust) decodes the cache's arrays wherever it supports them (see codec_pipeline); shards are written
# through zarr's own pipeline (see Store.write_shard_data)
zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
WRITE_PIPELINE = "zarr.core.codec_pipeline.BatchedCodecPipeline"

ATTR_KEY = "skd"
CREATING_KEY = "skd_creating"  # set while create_store runs: a folder with only this is our unfinished creation


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
    """An open cache. `meta` is the `skd` group attribute; arrays are read lazily.

    `location` says where it lives (a folder or an object-store prefix); `path` names it in messages: the
    folder's Path, or an ObjectPath (`s3://bucket/prefix`) that joins and relativises like one.
    """

    def __init__(self, path: Path | str | Location, group: zarr.Group):
        self.location = parse_location(path)
        self.path: Path | ObjectPath = self.location.path
        self._listed: dict[str, int] | None = None  # an object store's listing, taken once (see objects)
        self.group = group
        self.meta: dict = dict(group.attrs[ATTR_KEY])
        self.codec: Codec = get_codec(self.meta["codec"])
        self.shard_rows: int = int(self.meta["shard_rows"])
        self._splits: dict[str, Split] = {}  # sample arrays, read once (open_store checks them, replay uses them)

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
        """Paths, labels and sizes of the training samples (`samples`) or of `val`, read and checked once."""
        if name not in self._splits:
            paths = [str(p) for p in self._read(f"{name}/path")]
            for p in paths:
                check_relative_path(p, self.path)
            self._splits[name] = Split(
                paths, self._read(f"{name}/label").astype(np.int64), self._read(f"{name}/size").astype(np.int64)
            )
        return self._splits[name]

    def view_plan(self, view: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(order, box, flip) of one view as recorded, checked: the order a permutation of the samples, every
        window inside its image, flips 0 or 1 (a cache is untrusted input)."""
        order, box, flip = (self._read(f"views/{name}", view) for name in ("order", "box", "flip"))
        n = self.num_samples
        if order.min(initial=0) < 0 or order.max(initial=0) >= n or np.bincount(order, minlength=n).max() > 1:
            raise self._bad_plan(f"views/order of view {view} is not a permutation of the {n} samples")
        sizes = self.split("samples").sizes[order]
        y, x, h, w = box.T.astype(np.int64)
        if ((y < 0) | (x < 0) | (h <= 0) | (w <= 0) | (y + h > sizes[:, 0]) | (x + w > sizes[:, 1])).any():
            raise self._bad_plan(f"views/box of view {view} holds windows outside their images")
        if flip.max(initial=0) > 1:
            raise self._bad_plan(f"views/flip of view {view} holds values other than 0 and 1")
        return order, box, flip

    def view_mix(self, view: int) -> tuple[np.ndarray, np.ndarray]:
        """(mix_lambda, mix_box) of one view as recorded: own-image weights (1: unmixed), CutMix regions as
        fractions; both checked to lie in [0, 1]."""
        lam, box = self._read("views/mix_lambda", view), self._read("views/mix_box", view)
        if not (
            np.isfinite(lam).all()
            and np.isfinite(box).all()
            and 0 <= lam.min(initial=1)
            and lam.max(initial=1) <= 1
            and 0 <= box.min(initial=0)
            and box.max(initial=0) <= 1
        ):
            raise self._bad_plan(f"views/mix_lambda or views/mix_box of view {view} hold values outside [0, 1]")
        return lam, box

    def _bad_plan(self, what: str) -> StoreError:
        return StoreError(f"cache {self.path}: {what}: rebuild or re-download it")

    def val_boxes(self) -> np.ndarray:
        return self._read("val/box")

    def _read(self, name: str, selection=slice(None)) -> np.ndarray:
        """Values of a plan, sample or flag array; a damaged or missing one is a StoreError naming it."""
        try:
            return self.group[name][selection]
        except (KeyError, ValueError, RuntimeError) as exc:  # zarr and numcodecs raise many kinds on damage
            raise StoreError(
                f"{self.path}: {name} cannot be read ({scrub(str(exc))}): the cache is damaged; "
                "`skd-cache verify --integrity` lists what is, and rebuilding with --overwrite "
                "replaces it"
            ) from exc

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
        self._listed = None
        for name, data in parts.items():
            if not self.location.is_local:  # one PUT of the whole shard object, encoded in memory
                array = g[name]
                self.location.put(shard_key(array, prefix, shard), encode_shard(array, sl, data))
                continue
            # zarr's own pipeline writes: zarrs drops chunks of fill values even with write_empty_chunks, and
            # every shard must get its file (a missing file then always means damage)
            with zarr.config.set({"codec_pipeline.path": WRITE_PIPELINE}):
                array = g[name].with_config({"write_empty_chunks": True})
            # An unfinished shard's old file may be damaged, and zarr merges a short last shard into it.
            shard_file(array, prefix, shard).unlink(missing_ok=True)
            array[sl] = data

    def shard_files(self, view: int | None, shard: int) -> list[Path | ObjectPath]:
        """The files of shard `shard` of view `view` (None: val): logits, and scale and offset when affine."""
        g, prefix = self._logit_group(view)
        names = ("logits", "scale", "offset") if self.codec.affine else ("logits",)
        if self.location.is_local:
            return [shard_file(g[name], prefix, shard) for name in names]
        return [self.path / shard_key(g[name], prefix, shard) for name in names]

    def missing_shard_files(self, view: int | None, shard: int) -> list[Path | ObjectPath]:
        """Files of a complete shard that were lost: every shard is written whole, so a missing one is damage.
        On an object store: those not in the prefix's listing, taken once per Store (see `objects`)."""
        if self.location.is_local:
            return [f for f in self.shard_files(view, shard) if not f.exists()]
        listed = self.objects()
        return [f for f in self.shard_files(view, shard) if f.key not in listed]

    def objects(self, fresh: bool = False) -> dict[str, int]:
        """{key: bytes} of an object-store cache's objects: one listing, kept until this Store writes a shard
        (or `fresh`)."""
        if self._listed is None or fresh:
            self._listed = self.location.listing()
        return self._listed

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

    # -- storage figures -------------------------------------------------------------------
    def bytes_on_disk(self) -> int:
        if not self.location.is_local:
            return sum(self.objects(fresh=True).values())
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    def rows_written(self) -> int:
        """Rows of logits in complete shards, over all views and val."""
        parts = [(done, self.num_samples) for done in self.complete()] + [(self.val_complete(), self.num_val)]
        return sum(
            stop - start
            for done, n in parts
            for start, stop in (self.shard_bounds(int(j), n) for j in np.flatnonzero(done))
        )

    def logit_bytes(self) -> int:
        """Bytes on disk of the complete shards' logits (and scale and offset for the affine codecs), views and
        val: the same rows as `rows_written`, so an unfinished cache's bytes per row are right too."""
        parts = [(view, done) for view, done in enumerate(self.complete())] + [(None, self.val_complete())]
        files = [
            f for view, done in parts for shard in np.flatnonzero(done) for f in self.shard_files(view, int(shard))
        ]
        if not self.location.is_local:
            listed = self.objects(fresh=True)
            return sum(listed.get(f.key, 0) for f in files)
        return sum(f.stat().st_size for f in files if f.exists())

    def storage(self) -> dict:
        """Bytes of logits per written row and the compression ratios against raw float32 and float16 rows."""
        rows, size = self.rows_written(), self.logit_bytes()
        per_row = size / rows if rows else None
        c = self.num_classes
        return {
            "logit_bytes": size,
            "rows_written": rows,
            "bytes_per_row": per_row,
            "ratio_vs_fp32": 4 * c / per_row if per_row else None,
            "ratio_vs_fp16": 2 * c / per_row if per_row else None,
        }


def as_os_error(exc: RuntimeError, file: Path) -> Exception:
    """zarrs reports a failed system call as RuntimeError("... (os error N)"): the OSError it stands for, naming
    `file`, so that callers handle a full disk the same way whichever codec pipeline wrote; `exc` otherwise."""
    found = re.search(r"os error (\d+)", str(exc))
    if found is None:
        return exc
    code = int(found.group(1))
    return OSError(code, os.strerror(code), str(file))


def _create(
    group: zarr.Group, name: str, data=None, *, shape=None, dtype=None, chunks, shards=None, compress=True
) -> zarr.Array:
    text = data is not None and data.dtype.kind in "UTO"
    if data is not None:
        shape, dtype = data.shape, (str if text else data.dtype)
    arr = group.create_array(
        name,
        shape=shape,
        dtype=dtype,
        chunks=chunks,
        shards=shards,
        compressors=_zstd() if compress else None,
        fill_value=None if text else 0,
        overwrite=True,
    )
    if data is not None:
        arr[...] = data
    return arr


def _write_split(group: zarr.Group, name: str, split: Split, chunk: int) -> None:
    n = len(split.paths)
    c = max(1, min(chunk * 64, n))
    _create(group, f"{name}/path", np.array(split.paths, dtype=object), chunks=(c,))
    _create(group, f"{name}/label", np.asarray(split.labels, np.int32), chunks=(c,))
    _create(group, f"{name}/size", np.asarray(split.sizes, np.int32), chunks=(c, 2))


def _logit_arrays(
    group: zarr.Group, prefix: str, lead: tuple, rows: int, classes: int, codec: Codec, shard_rows: int, chunk_rows: int
) -> None:
    """Create logits (+ scale/offset) of shape lead + (rows, C), sharded along rows, and `complete`."""
    ones = (1,) * len(lead)
    shard, chunk = shard_rows, chunk_rows  # a shard may overhang the array's end; zarr trims it
    _create(
        group,
        f"{prefix}/logits",
        shape=lead + (rows, classes),
        dtype=codec.dtype,
        chunks=ones + (chunk, classes),
        shards=ones + (shard, classes),
    )
    if codec.affine:
        for name in ("scale", "offset"):
            _create(
                group,
                f"{prefix}/{name}",
                shape=lead + (rows,),
                dtype="float32",
                chunks=ones + (chunk,),
                shards=ones + (shard,),
            )
    _create(
        group,
        f"{prefix}/complete",
        shape=lead + (-(-rows // shard_rows),),
        dtype="uint8",
        chunks=ones + (1,),
        compress=False,
    )


def codec_pipeline(array: zarr.Array) -> str:
    """Name of the codec pipeline class that serves reads of slices of `array`: "ZarrsCodecPipeline", or
    the one zarrs hands them to ("BatchedCodecPipeline") where it does not support the array's store or
    data type, or where zarr's config names another pipeline.

    zarrs falls back without an error (a warning at most), so readers check and report this rather than
    assume it. (zarrs also hands over reads with an integer index, which drop an axis: read with slices.)
    """
    pipeline = array._async_array.codec_pipeline
    if type(pipeline).__name__ == "ZarrsCodecPipeline" and pipeline.python_impl is not None:
        dtype = array._async_array.metadata.data_type.to_native_dtype()
        if pipeline.impl is None or dtype.kind in "VSUMmOT":  # the kinds zarrs' read() hands over
            pipeline = pipeline.python_impl
    return type(pipeline).__name__


def shard_file(array: zarr.Array, prefix: tuple, shard: int) -> Path:
    """The file holding shard `shard` (along rows) of a logits, scale or offset array in a local cache."""
    return Path(array.store_path.store.root) / shard_key(array, prefix, shard)


def shard_key(array: zarr.Array, prefix: tuple, shard: int) -> str:
    """The key (relative to the cache) of shard `shard` (along rows) of a logits, scale or offset array."""
    coords = prefix + (shard,) + (0,) * (array.ndim - len(prefix) - 1)
    return f"{array.store_path.path}/{array.metadata.encode_chunk_key(coords)}"


def encode_shard(array: zarr.Array, selection: tuple, data: np.ndarray) -> bytes:
    """The bytes of the shard object that `array[selection] = data` writes (a whole shard), encoded in memory
    by zarr's own pipeline with every chunk kept: an object store then gets it in one PUT, without reading
    the old object first (zarr would merge a short last shard into it)."""
    objects = dict(array.metadata.to_buffer_dict(default_buffer_prototype()))
    with zarr.config.set({"codec_pipeline.path": WRITE_PIPELINE}):
        copy = zarr.open_array(zarr.storage.MemoryStore(objects), mode="r+").with_config({"write_empty_chunks": True})
    copy[selection] = data
    written = [v for k, v in objects.items() if k != "zarr.json"]
    if len(written) != 1:
        raise ValueError(f"{array.path}{selection} spans {len(written)} shards, not one")
    return written[0].to_bytes()


def create_store(
    path: Path | str | Location,
    meta: dict,
    *,
    train: Split,
    plans: list,
    val: Split | None,
    val_boxes: np.ndarray | None,
    num_classes: int,
) -> Store:
    """Write a new, empty cache: samples, the plan of every view, empty logit arrays.

    The group starts with only the `skd_creating` attribute and gets `skd` last, so an interrupted
    creation is recognisable as ours. `path` (a folder or an object-store URL) must be absent or empty
    (mode w-: nothing already there is ever cleared).
    """
    location = parse_location(path)
    codec = get_codec(meta["codec"])
    shard_rows, chunk_rows = int(meta["shard_rows"]), int(meta["chunk_rows"])
    group = zarr.open_group(
        location.zarr_store(read_only=False), mode="w-", zarr_format=3, attributes={CREATING_KEY: True}
    )
    n, k = len(train.paths), len(plans)
    if shard_rows % chunk_rows:
        raise ValueError(f"shard rows {shard_rows} must be a multiple of chunk rows {chunk_rows}")
    _write_split(group, "samples", train, chunk_rows)
    shard = min(shard_rows, n)
    order = np.stack([p.order for p in plans]).astype(np.int32)
    box = np.stack([p.box for p in plans]).astype(np.int32)
    flip = np.stack([p.flip for p in plans]).astype(np.uint8)
    unmixed = np.ones(n, np.float32), np.zeros((n, 4), np.float32)
    mixes = [getattr(p, "mix", None) or unmixed for p in plans]  # plans without mixing: every row unmixed
    _create(group, "views/order", order, chunks=(1, shard))
    _create(group, "views/box", box, chunks=(1, shard, 4))
    _create(group, "views/flip", flip, chunks=(1, shard))
    _create(group, "views/mix_lambda", np.stack([m[0] for m in mixes]).astype(np.float32), chunks=(1, shard))
    _create(group, "views/mix_box", np.stack([m[1] for m in mixes]).astype(np.float32), chunks=(1, shard, 4))
    _logit_arrays(group, "views", (k,), n, num_classes, codec, shard_rows, chunk_rows)
    if val is not None:
        _write_split(group, "val", val, chunk_rows)
        _create(group, "val/box", np.asarray(val_boxes, np.int32), chunks=(min(shard_rows, len(val.paths)), 4))
        _logit_arrays(group, "val", (), len(val.paths), num_classes, codec, shard_rows, chunk_rows)
    hashes = {
        "samples_sha256": samples_sha256(train.paths, train.labels, train.sizes),
        "val_sha256": None if val is None else samples_sha256(val.paths, val.labels, val.sizes),
    }
    group.attrs.put({ATTR_KEY: check_meta(location.path, {**meta, "dataset": {**meta["dataset"], **hashes}})})
    return Store(location, group)


def cache_state(path: Path | str | Location) -> str | None:
    """ "cache" for a created cache (a zarr group with the `skd` attribute), "creating" for a creation of
    ours that was interrupted, None for anything else (another zarr group, a plain or unreadable folder or
    prefix; `Location.is_empty` tells an unreachable bucket from an empty one)."""
    try:
        location = parse_location(path)
        if location.is_local and location.local.is_dir():
            check_files(location.local)  # a FIFO as zarr.json would block zarr's read
        group = zarr.open_group(location.zarr_store(read_only=True), mode="r", zarr_format=3)
        attrs = group.attrs
        if ATTR_KEY in attrs:
            return "cache"
        return "creating" if CREATING_KEY in attrs else None
    except Exception:
        return None


def open_store(path: Path | str | Location, mode: str = "r") -> Store:
    """Open a cache (a folder or an object-store URL) for reading (or `r+` to continue writing); StoreError
    for anything unusable. An object store's prefix is listed once, here: the listing is checked like a
    folder's files and kept for the shard checks."""
    location = parse_location(path)
    path, listing = location.path, None
    if location.is_local and not location.local.exists():
        raise StoreError(f"cache {path} does not exist: build it with `skd-cache build --out {path}`")
    if not location.is_local:
        if not (listing := location.listing()):
            raise StoreError(
                f"cache {path} does not exist (no object under it): build it with `skd-cache build --out {path}`"
            )
        check_objects(location, listing)  # before zarr reads any of them
    elif location.local.is_dir():
        check_files(path)  # before zarr reads any of them: a FIFO as a zarr.json would block it
    try:
        group = zarr.open_group(location.zarr_store(read_only=mode == "r"), mode=mode, zarr_format=3)
    except Exception as exc:
        raise StoreError(
            f"{path} is not a zarr v3 cache ({type(exc).__name__}): pass the folder written by `skd-cache build`"
        ) from None
    meta = group.attrs.get(ATTR_KEY)
    if meta is None:
        raise StoreError(
            f"{path} is not an skd cache (no '{ATTR_KEY}' attribute): "
            "its creation was interrupted or it was written by another tool; rebuild it"
        )
    check_meta(path, meta)
    check_arrays(path, group, meta)
    store = Store(location, group)
    store._listed = listing
    for split, key in (("samples", "samples_sha256"), ("val", "val_sha256")):
        if split == "val" and not store.has_val:
            continue
        recorded = store.split(split)
        if samples_sha256(recorded.paths, recorded.labels, recorded.sizes) != meta["dataset"][key]:
            raise StoreError(
                f"cache {path}: the {split} arrays (paths, labels, sizes) do not match the sha256 "
                "recorded when it was built (edited or swapped entries): rebuild or re-download it"
            )
    return store
