"""Streaming reads of stored logit rows: one view's rows in order, read ahead in a background thread
(in a small pool of threads for a cache in an object store, to hide the latency of its requests)."""

from __future__ import annotations

import posixpath
import queue
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from skd.storage.objectstore import scrub
from skd.storage.zarr_internals import codec_pipeline, zarrs_reads
from skd.store.cache_store import VAL, Store, StoreError, View, as_os_error, part_name, shard_key
from skd.store.codecs import Encoded


class RowReader:
    """Streams stored rows [start, stop) of one view (or of VAL) in order, reading ahead in a
    background thread.

    Reads are shard-aligned blocks of up to `block_rows` rows (large reads amortise per-call costs),
    each one slice read per array (logits, and scale and offset for the affine codecs) through zarr
    with the zarrs codec pipeline (skd.storage.zarr_internals); `pipelines` names the pipeline
    serving each array. `batches(batch_size)` slices the blocks into consumer batches of stored
    (encoded) rows, as views of the blocks wherever a batch lies inside one block. `threads` is how
    many chunks zarrs decodes at once per read (its `threading.max_workers`, on zarrs' pool of one
    thread per core).

    zarr and zarrs read a missing shard file as fill values; every shard is written whole, so the
    reader lists the shard files of its range once, up front (one listing of the folder or prefix of
    each array's shards), and a missing one is a StoreError naming it.

    `parallel` blocks are read at once, by a pool of threads, and `prefetch` more are queued: the
    Location's `read_parallelism` (1 for a folder: one background thread; more for an object store,
    where each read waits on requests; there the arrays of a block are read at once too, and zarrs
    gets a thread for each read in flight, since its threads wait on the requests).
    """

    def __init__(
        self,
        store: Store,
        view: View,
        start: int,
        stop: int,
        *,
        block_rows: int | None = None,
        prefetch: int = 2,
        threads: int = 2,
        parallel: int | None = None,
    ):
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.location = store.location
        self.parallel = parallel or self.location.read_parallelism
        if self.parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {parallel}")
        rows = store.part_rows(view)
        if view != VAL and not 0 <= view < store.num_views:
            raise ValueError(f"view {view} is outside the cache's {store.num_views} views")
        if not 0 <= start <= stop <= rows:
            raise ValueError(
                f"rows [{start}, {stop}) are outside the {rows} rows of {part_name(view)}"
            )
        self.store, self.view, self.start, self.stop, self.rows = store, view, start, stop, rows
        self.block_rows = block_rows or store.shard_rows
        self.prefetch = prefetch
        self.threads = threads
        group, self._prefix = store._logit_group(view)
        names = store.codec.arrays
        # waiting on I/O
        workers = max(threads, 2 * self.parallel * len(names)) if self.parallel > 1 else threads
        # zarrs reads it when the array opens
        with zarrs_reads(**{"threading.max_workers": workers}):
            self._arrays = {name: group[name] for name in names}
        # slices: zarrs hands integer indexes to zarr
        self._lead = tuple(slice(i, i + 1) for i in self._prefix)
        self.pipelines = {name: codec_pipeline(array) for name, array in self._arrays.items()}
        self._check_shards()

    def _shards(self) -> range:
        size = self.store.shard_rows
        return range(self.start // size, -(-self.stop // size))

    def _check_shards(self) -> None:
        """StoreError naming the first shard file of rows [start, stop) that is missing or
        unreadable: one listing of each array's shard folder (or prefix), compared with the keys the
        shards need."""
        shards = self._shards()
        if not shards:
            return
        for name, array in self._arrays.items():
            needed = [shard_key(array, self._prefix, s) for s in shards]
            found = self.location.listing(
                posixpath.commonpath([posixpath.dirname(k) for k in needed])
            )
            for shard, key in zip(shards, needed):
                if key not in found:
                    bounds = self.store.shard_bounds(shard, self.rows)
                    raise self._unreadable(key, *bounds) or self._damaged(
                        f"{self.location.name(key)} is missing", *bounds, lost=True
                    )

    def _unreadable(self, key: str, a: int, b: int) -> StoreError | None:
        """The error for the shard file `key`, which a listing or a read failed on: gone (damage),
        an OS error (a folder in its place, a permission, EIO), or a store that cannot be asked;
        None if it reads."""
        try:
            self.location.probe(key)
        except FileNotFoundError:
            return self._damaged(f"{self.location.name(key)} is missing", a, b, lost=True)
        except OSError as exc:
            return self._os_error(exc, a, b)
        except StoreError as exc:  # no connection, refused credentials: the same kind, named here
            return type(exc)(f"rows {a}-{b} of {part_name(self.view)} cannot be read: {exc}")
        return None

    def _read(self, a: int, b: int) -> Encoded:
        """Rows [a, b) of every array, each a new C-contiguous array; failures are one-line
        StoreErrors.

        From an object store, whole shards only (then sliced): zarrs fetches the index of a shard it
        reads in part while holding the GIL, which would stall every other thread for two
        requests."""
        return Encoded(
            **{name: self._read_array(array, a, b) for name, array in self._arrays.items()}
        )

    def _read_array(self, array, a: int, b: int) -> np.ndarray:
        """Rows [a, b) of one array (see `_read`)."""
        if self.location.reads_whole_shards:
            size = self.store.shard_rows
            lo, hi = a // size * size, min(self.rows, -(-b // size) * size)
            if (lo, hi) != (a, b):
                return self._read_array(array, lo, hi)[a - lo : b - lo]
        try:
            return array[self._lead + (slice(a, b),)][(0,) * len(self._lead)]
        except OSError as exc:
            # zarr's own pipeline: permissions, I/O errors, stale network mounts
            if exc.errno is not None:
                raise self._os_error(exc, a, b) from exc
            # zarrs: a zstd frame that fails to decode
            raise self._diagnose(array, exc, a, b) from exc
        # zarrs raises RuntimeError for damage and I/O alike
        except (ValueError, RuntimeError) as exc:
            raise self._diagnose(array, exc, a, b) from exc

    def _diagnose(self, array, exc: Exception, a: int, b: int) -> StoreError:
        """The error for a failed read of rows [a, b) of `array`: what reading its shard files gives
        (zarrs' messages do not tell I/O from damage, nor name the file), else damage."""
        size = self.store.shard_rows
        keys = [shard_key(array, self._prefix, s) for s in range(a // size, -(-b // size))]
        names = ", ".join(self.location.name(k) for k in keys)
        named = as_os_error(exc, names) if isinstance(exc, RuntimeError) else None
        if isinstance(named, OSError):  # zarrs' "... (os error N)": a failed system call
            return self._os_error(named, a, b)
        for key in keys:
            if (error := self._unreadable(key, a, b)) is not None:
                return error
        detail = scrub(" ".join(str(exc).split()))[:300]  # one line
        return self._damaged(f"{names}: {detail or type(exc).__name__}", a, b)

    def _damaged(self, detail: str, a: int, b: int, lost: bool = False) -> StoreError:
        """Damage found in rows [a, b): a lost shard file (a rerun of the build rewrites it) or a
        damaged one."""
        remedy = (
            "rerun the cache's `skd-cache build` command (the same options) to rebuild the lost shards"
            if lost
            else "`skd-cache verify --integrity` lists every bad shard, and rebuilding with --overwrite replaces it"
        )
        return StoreError(
            f"{self.store.path}: rows {a}-{b} of {part_name(self.view)} cannot be read ({detail}): "
            f"the cache is damaged; {remedy}"
        )

    def _os_error(self, exc: OSError, a: int, b: int) -> StoreError:
        """Permissions, I/O errors, stale network mounts: the cache's files, not the images."""
        return StoreError(
            f"{self.store.path}: rows {a}-{b} of {part_name(self.view)} cannot be read "
            f"({exc.strerror or exc}: {exc.filename or 'a cache file'}): check the cache's "
            "files and their permissions"
        )

    def _blocks(self) -> Iterator[tuple[int, int]]:
        pos = self.start
        while pos < self.stop:
            aligned_end = (pos // self.block_rows + 1) * self.block_rows
            end = min(self.stop, aligned_end)
            yield pos, end
            pos = end

    def blocks(self) -> Iterator[tuple[int, Encoded]]:
        """(first row, Encoded block) in order, read ahead by a background thread (`parallel`
        threads); a block holding a row that would decode to nan or inf is a StoreError naming the
        row (a student step on it would turn every weight into NaN)."""
        for first, block in self._read_ahead():
            self._check_finite(first, block)
            yield first, block

    def _check_finite(self, first: int, block: Encoded) -> None:
        """StoreError naming the first row whose stored floats (fp16 and fp32 logits; the affine
        codecs' scale and offset) are not all finite: min and max are nan or inf exactly then,
        without a mask per value."""
        for values in block:
            if values is None or values.dtype.kind != "f" or not values.size:
                continue
            if np.isfinite(values.min()) and np.isfinite(values.max()):
                continue
            row = first + int(
                np.flatnonzero(~np.isfinite(values.reshape(len(values), -1)).all(axis=1))[0]
            )
            raise StoreError(
                f"{self.store.path}: row {row} of {part_name(self.view)} holds non-finite logits (nan or inf): "
                "the cache is damaged; `skd-cache verify --integrity` lists every bad shard, and rebuilding "
                "with --overwrite replaces it"
            )

    def _read_ahead(self) -> Iterator[tuple[int, Encoded]]:
        """`blocks` as read: in order, ahead of the consumer."""
        if self.parallel > 1:
            yield from self._parallel_blocks()
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        done = object()
        stop_event = threading.Event()

        def produce():
            try:
                for a, b in self._blocks():
                    if stop_event.is_set():
                        return
                    q.put((a, self._read(a, b)))
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
            # unblock a producer waiting on a full queue, then let it finish
            while thread.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(0.01)

    def _parallel_blocks(self) -> Iterator[tuple[int, Encoded]]:
        """`blocks` with `parallel` blocks in flight (each array of a block a task of its own) and
        `prefetch` more queued, handed out in order; a consumer that stops early waits only for the
        reads in flight."""
        ahead = self.parallel + self.prefetch
        spans = self._blocks()
        arrays = list(self._arrays.values())
        pool = ThreadPoolExecutor(self.parallel * len(arrays), thread_name_prefix="skd-row-reader")
        pending: deque = deque()

        def submit(a: int, b: int) -> None:
            pending.append((a, [pool.submit(self._read_array, array, a, b) for array in arrays]))

        try:
            for a, b in spans:
                submit(a, b)
                if len(pending) >= ahead:
                    break
            while pending:
                a, futures = pending.popleft()
                block = Encoded(**{name: f.result() for name, f in zip(self._arrays, futures)})
                following = next(spans, None)
                if following is not None:
                    submit(*following)
                yield a, block
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

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


def _concat(parts: list[Encoded]) -> Encoded:
    if len(parts) == 1:
        return parts[0]
    return Encoded(
        *(
            None if parts[0][i] is None else np.concatenate([p[i] for p in parts])
            for i in range(len(parts[0]))
        )
    )


def _slice(e: Encoded, a: int, b: int | None) -> Encoded:
    return Encoded(*(None if x is None else x[a:b] for x in e))
