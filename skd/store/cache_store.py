"""An open cache: a Zarr v3 group with sharded, zstd-compressed arrays (the format in
skd.store.schema).

Array names, shapes and attributes are a contract, written down in cache/README.md: other tools open
the cache with plain zarr. A shard is the unit of writing (writers never share one; a shard is
written in one call, as one whole object), a chunk the unit of reading. Completion is recorded per
shard in `views/complete` and `val/complete`, whose one-element chunks can be set by several ranks
at once. Where the cache lives (a folder, an object-store prefix) is its `Location`'s business: the
shard checks and storage figures work on the Location's listing of the cache, taken once.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import zarr
import zarr.storage
from zarr.core.buffer import default_buffer_prototype
from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding

from skd.data.index import Split
from skd.storage.location import Location, parse_location
from skd.storage.objectstore import StoreError, scrub
from skd.storage.zarr_internals import zarr_writes, zarrs_reads
from skd.store.codecs import Codec, Encoded, get_codec
from skd.store.recorded_plan import RecordedPlan
from skd.store.schema import check_arrays, check_meta, check_relative_paths, samples_sha256

ATTR_KEY = "skd"
# set while create_store runs: a folder with only this is our unfinished creation
CREATING_KEY = "skd_creating"
VAL = "val"  # names the validation split's logits wherever a view number names a training view's
View = int | Literal["val"]  # a part of the cache that holds logits: a view number, or VAL


def part_name(view: View) -> str:
    """How messages name a part of the cache: "view 3", or "val"."""
    return "val" if view == VAL else f"view {view}"


class Store(RecordedPlan):
    """An open cache. `meta` is the `skd` group attribute; arrays are read lazily.

    `location` says where it lives (a folder or an object-store prefix); `path` names it in
    messages: the folder's Path, or the URL (`s3://bucket/prefix`). `listing` is the Location's
    {key: bytes} of the cache, taken when it was opened (and again after this Store writes a shard,
    or when asked `fresh`).
    """

    def __init__(
        self, path: Path | str | Location, group: zarr.Group, listing: dict[str, int] | None = None
    ):
        self.location: Location = parse_location(path)
        self.path: Path | str = self.location.path
        self._listed = listing
        # arrays opened for reading, once each (see `array`)
        self._opened: dict[str, zarr.Array] = {}
        self.group = group
        self.meta: dict = dict(group.attrs[ATTR_KEY])
        self.codec: Codec = get_codec(
            self.meta["codec"], classes=int(self.meta["teacher"]["num_classes"])
        )
        self.shard_rows: int = int(self.meta["shard_rows"])
        # sample arrays, read once (open_store checks them, replay uses them)
        self._splits: dict[str, Split] = {}
        # completion flags opened for writing (`mark_complete`)
        self._flag_arrays: dict[str, zarr.Array] = {}
        # completion flags by part, from the listing (`part_complete`)
        self._done: dict[View, np.ndarray] | None = None

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
        """Whether the cache holds validation logits: the attributes say so (num_val > 0 exactly
        when `val/*` is there, which open_store checks), so asking costs no request."""
        return self.num_val > 0

    @property
    def num_val(self) -> int:
        return int(self.meta["dataset"].get("num_val") or 0)

    def reopen(self, meta: dict) -> None:
        """Take the attributes `meta` just written (a cache grown by views): arrays are opened again
        when next asked for, at their new shapes."""
        self.meta = meta
        self._opened.clear()
        self._flag_arrays.clear()
        self._done = None

    def parts(self) -> list[View]:
        """Every part that holds logits: the views in order, then VAL when the cache has validation
        logits."""
        return [*range(self.num_views), *([VAL] if self.has_val else [])]

    def part_rows(self, view: View) -> int:
        """Rows of logits of a part: one per training sample for a view, one per validation image
        for VAL."""
        return self.num_val if view == VAL else self.num_samples

    def num_shards(self, rows: int) -> int:
        return -(-rows // self.shard_rows)

    def shard_bounds(self, shard: int, rows: int) -> tuple[int, int]:
        start = shard * self.shard_rows
        return start, min(rows, start + self.shard_rows)

    # -- samples and plan ------------------------------------------------------------------
    def split(self, name: str = "samples") -> Split:
        """Paths, labels and sizes of the training samples (`samples`) or of `val`, read and checked
        once."""
        if name not in self._splits:
            paths = list(map(str, self._read(f"{name}/path")))
            check_relative_paths(paths, self.path)
            tails = self._read(f"{name}/tail") if self.meta["dataset"].get("tails") else None
            self._splits[name] = Split(
                paths,
                self._read(f"{name}/label").astype(np.int64),
                self._read(f"{name}/size").astype(np.int64),
                tails=tails,
            )
        return self._splits[name]

    def array(self, name: str) -> zarr.Array:
        """The array `name`, opened once, to decode through zarrs (Rust) wherever zarrs supports
        it."""
        if name not in self._opened:
            with zarrs_reads():
                self._opened[name] = self.group[name]
        return self._opened[name]

    def _read(self, name: str, selection=slice(None)) -> np.ndarray:
        """Values of a plan, sample or flag array; a damaged or missing one is a StoreError naming
        it."""
        try:
            return self.array(name)[selection]
        # zarr and numcodecs raise many kinds on damage
        except (KeyError, ValueError, RuntimeError) as exc:
            raise StoreError(
                f"{self.path}: {name} cannot be read ({scrub(str(exc))}): the cache is damaged; "
                "`skd-cache verify --integrity` lists what is, and rebuilding with --overwrite "
                "replaces it"
            ) from exc

    # -- completion ------------------------------------------------------------------------
    def complete(self) -> np.ndarray:
        """(K, shards) bool: which shards of which view hold final logits."""
        shards = self.num_shards(self.num_samples)
        return np.array([self.part_complete(view) for view in range(self.num_views)], bool).reshape(
            -1, shards
        )

    def val_complete(self) -> np.ndarray:
        return self.part_complete(VAL) if self.has_val else np.zeros(0, bool)

    def part_complete(self, view: View) -> np.ndarray:
        """(shards,) bool: which shards of one part hold final logits, from the listing: a flag is
        an object of its own only while it is 1 (zarr deletes a chunk set to its fill value 0), so
        no flag is read, however many views there are. Flags this Store sets are added as it sets
        them."""
        listed = self.listing()  # first: a new listing forgets the flags taken from the last
        if self._done is None:
            self._done = {}
        if view not in self._done:
            array, prefix = (
                self.array("val/complete" if view == VAL else "views/complete"),
                self._prefix(view),
            )
            keys = chunk_keys(array, prefix, range(self.num_shards(self.part_rows(view))))
            self._done[view] = np.array([key in listed for key in keys], bool)
        return self._done[view]

    def is_complete(self) -> bool:
        return bool(self.complete().all() and self.val_complete().all())

    def complete_ranges(self) -> list[tuple[View, int, int, int]]:
        """(part, shard, first row, end row) of every complete shard, the views' first, then
        val's."""
        done = [*self.complete(), *([self.val_complete()] if self.has_val else [])]
        return [
            (view, shard, *self.shard_bounds(shard, self.part_rows(view)))
            for view, complete in zip(self.parts(), done)
            for shard in np.flatnonzero(complete).tolist()
        ]

    def lost_shards(self) -> dict[View, list[int]]:
        """{part: shards} recorded complete whose files are not in the listing (a half-done copy, a
        deleted object): every shard is written whole, so they are damage a rerun of the build
        rewrites."""
        lost: dict[View, list[int]] = {}
        listed = self.listing()
        for view, shard, keys in self._complete_shard_keys():
            if any(key not in listed for key in keys):
                lost.setdefault(view, []).append(shard)
        return lost

    def _complete_shard_keys(self) -> Iterator[tuple[View, int, tuple[str, ...]]]:
        """(part, shard, the keys of its files) of every complete shard, the views' first, then
        val's."""
        for view in self.parts():
            done = np.flatnonzero(self.part_complete(view)).tolist()
            arrays, prefix = self._logit_arrays(view)
            for shard, *keys in zip(done, *(shard_keys(array, prefix, done) for array in arrays)):
                yield view, shard, tuple(keys)

    # -- logits ----------------------------------------------------------------------------
    def _logit_group(self, view: View) -> tuple[zarr.Group, tuple]:
        """The group holding a part's logits and the index prefix: views[k], or val."""
        return (self.group["val"] if view == VAL else self.group["views"]), self._prefix(view)

    @staticmethod
    def _prefix(view: View) -> tuple:
        """The index of a part in its arrays: (k,) along the view axis, () for val."""
        return () if view == VAL else (view,)

    def _logit_arrays(self, view: View) -> tuple[list[zarr.Array], tuple]:
        """A part's stored arrays (`Codec.arrays`: logits, and scale/offset or offset/index), each
        opened once per Store, and the index prefix: no metadata read per shard, however many views
        and shards are asked about."""
        path, prefix = ("val", ()) if view == VAL else ("views", (view,))
        return [self.array(f"{path}/{name}") for name in self.codec.arrays], prefix

    def mark_complete(self, view: View, shard: int) -> None:
        name = "val/complete" if view == VAL else "views/complete"
        # opened once, through zarr's own pipeline (as every write of skd's)
        if name not in self._flag_arrays:
            with zarr_writes():
                self._flag_arrays[name] = self.group[name]
        flags = self._flag_arrays[name]
        flags[self._prefix(view) + (shard,)] = 1
        self._listed_put(chunk_keys(flags, self._prefix(view), [shard])[0], 1)
        if self._done is not None and view in self._done:
            self._done[view][shard] = True

    def _listed_put(self, key: str, size: int) -> None:
        """Keep the listing true to what this Store wrote (no listing again after each shard)."""
        if self._listed is not None:
            self._listed[key] = size

    def write_shard_data(self, view: View, shard: int, encoded: Encoded) -> None:
        """Write one whole shard of logits (and scale/offset), each array's shard as one whole
        object: encoded in memory, then handed to the Location in one write (a PUT, or a file
        renamed into place), so neither an old, possibly damaged file nor a read-modify-write is
        ever involved."""
        arrays, prefix = self._logit_arrays(view)
        start, stop = self.shard_bounds(shard, self.part_rows(view))
        if encoded.logits.shape[0] != stop - start:
            raise ValueError(
                f"shard {shard} needs {stop - start} rows, got {encoded.logits.shape[0]}"
            )
        selection = prefix + (slice(start, stop),)
        for array, name in zip(arrays, self.codec.arrays):
            data = getattr(encoded, name)
            key, whole = shard_key(array, prefix, shard), encode_shard(array, selection, data)
            self.location.put(key, whole)
            self._listed_put(key, len(whole))

    def shard_keys(self, view: View, shard: int) -> list[str]:
        """The keys of shard `shard` of a part: logits, and scale and offset when affine."""
        arrays, prefix = self._logit_arrays(view)
        return [shard_key(array, prefix, shard) for array in arrays]

    def missing_shard_files(self, view: View, shard: int) -> list[str]:
        """Keys of a complete shard's files that were lost (not in the listing): every shard is
        written whole, so a missing one is damage."""
        listed = self.listing()
        return [key for key in self.shard_keys(view, shard) if key not in listed]

    def listing(self, fresh: bool = False) -> dict[str, int]:
        """{key: bytes} of the cache's files or objects: one listing (taken at open, or again when
        `fresh`: what other processes wrote since), with what this Store wrote since added."""
        if self._listed is None or fresh:
            self._listed, self._done = self.location.listing(), None
        return self._listed

    def read_rows(self, view: View, start: int, stop: int) -> Encoded:
        """Stored rows [start, stop) of a part (a view, or VAL), in the codec's form."""
        arrays, prefix = self._logit_arrays(view)
        # slices: zarrs hands integer indexes to zarr's own pipeline
        lead = tuple(slice(i, i + 1) for i in prefix)
        rows = (array[lead + (slice(start, stop),)][(0,) * len(lead)] for array in arrays)
        return Encoded(**dict(zip(self.codec.arrays, rows)))

    def read_logits(self, view: View, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Decoded float32 logits of rows [start, stop)."""
        if stop is None:
            stop = self.part_rows(view)
        return self.codec.decode(self.read_rows(view, start, stop))

    # -- storage figures -------------------------------------------------------------------
    def bytes_on_disk(self) -> int:
        """Bytes of every file or object of the cache, by the listing (`listing(fresh=True)` first
        for what other processes wrote since it was taken)."""
        return sum(self.listing().values())

    def rows_written(self) -> int:
        """Rows of logits in complete shards, over all views and val."""
        return sum(stop - start for _, _, start, stop in self.complete_ranges())

    def logit_bytes(self) -> int:
        """Bytes of the complete shards' logits (and scale and offset for the affine codecs), views
        and val: the same rows as `rows_written`, so an unfinished cache's bytes per row are right
        too."""
        listed = self.listing()
        return sum(listed.get(key, 0) for _, _, keys in self._complete_shard_keys() for key in keys)

    def storage(self) -> dict:
        """Bytes of logits per written row and the compression ratios against raw float32 and
        float16 rows."""
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
    """zarrs reports a failed system call as RuntimeError("... (os error N)"): the OSError it stands
    for, naming `file`, so that callers handle a full disk the same way whichever codec pipeline
    wrote; `exc` otherwise."""
    found = re.search(r"os error (\d+)", str(exc))
    if found is None:
        return exc
    code = int(found.group(1))
    return OSError(code, os.strerror(code), str(file))


def shard_key(array: zarr.Array, prefix: tuple, shard: int) -> str:
    """The key (relative to the cache) of shard `shard` (along rows) of a logits, scale or offset
    array."""
    return shard_keys(array, prefix, [shard])[0]


def shard_keys(array: zarr.Array, prefix: tuple, shards: Iterable[int]) -> list[str]:
    """The keys of several shards (along rows) of a logits, scale or offset array."""
    return chunk_keys(array, prefix, shards, (0,) * (array.ndim - len(prefix) - 1))


def chunk_keys(
    array: zarr.Array, prefix: tuple, indexes: Iterable[int], suffix: tuple = ()
) -> list[str]:
    """The keys (relative to the cache) of the chunks (or shards) of `array` at `prefix + (i,) +
    suffix` for each i: joined here where the array has zarr's default keys (`c/i/j`), else by zarr
    per key (~3 us each; a cache of 1,000 ImageNet views has ~300k shard and flag keys)."""
    path, encoding = array.store_path.path, array.metadata.chunk_key_encoding
    if isinstance(encoding, DefaultChunkKeyEncoding) and encoding.separator == "/":
        head, tail = (
            f"{path}/c/" + "".join(f"{c}/" for c in prefix),
            "".join(f"/{c}" for c in suffix),
        )
        return [f"{head}{i}{tail}" for i in indexes]
    return [f"{path}/{array.metadata.encode_chunk_key(prefix + (i,) + suffix)}" for i in indexes]


def encode_shard(array: zarr.Array, selection: tuple, data: np.ndarray) -> bytes:
    """The bytes of the shard object that `array[selection] = data` writes (a whole shard), encoded
    in memory by zarr's own pipeline with every chunk kept: the Location then writes it whole,
    without reading the old object first (zarr would merge a short last shard into it)."""
    objects = dict(array.metadata.to_buffer_dict(default_buffer_prototype()))
    with zarr_writes():
        copy = zarr.open_array(zarr.storage.MemoryStore(objects), mode="r+").with_config(
            {"write_empty_chunks": True}
        )
    copy[selection] = data
    written = [v for k, v in objects.items() if k != "zarr.json"]
    if len(written) != 1:
        raise ValueError(f"{array.path}{selection} spans {len(written)} shards, not one")
    return written[0].to_bytes()


def cache_state(path: Path | str | Location) -> str | None:
    """ "cache" for a created cache (a zarr group with the `skd` attribute), "creating" for a
    creation of ours that was interrupted, None for anything else (another zarr group, a plain or
    unreadable folder or prefix; `Location.is_empty` tells an unreachable bucket from an empty
    one)."""
    try:
        location = parse_location(path)
        # the group's zarr.json only: a FIFO there would block zarr's read
        location.check_metadata()
        group = zarr.open_group(location.zarr_store(read_only=True), mode="r", zarr_format=3)
        attrs = group.attrs
        if ATTR_KEY in attrs:
            return "cache"
        return "creating" if CREATING_KEY in attrs else None
    except Exception:
        return None


def open_store(path: Path | str | Location, mode: str = "r") -> Store:
    """Open a cache (a folder or an object-store URL) for reading (or `r+` to continue writing);
    StoreError for anything unusable. The cache is listed once, here: every entry checked as
    untrusted input before zarr reads it, and the listing kept for the shard checks."""
    location = parse_location(path)
    path, listing = location.path, location.inspect()  # before zarr reads anything
    try:
        group = zarr.open_group(
            location.zarr_store(read_only=mode == "r"), mode=mode, zarr_format=3
        )
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
    store = Store(location, group, listing)
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
