"""Streaming reads of stored logit rows: one view's rows in order, read ahead in a background thread."""
from __future__ import annotations

import errno
import os
import queue
import threading
from collections.abc import Iterator

import numpy as np
import zarr

from .codecs import Encoded
from .store import Store, StoreError, as_os_error, codec_pipeline, shard_file


class RowReader:
    """Streams stored rows [start, stop) of one view in order, reading ahead in a background thread.

    Reads are shard-aligned blocks of up to `block_rows` rows (large reads amortise per-call costs), each
    one slice read per array (logits, and scale and offset for the affine codecs) through zarr with the
    zarrs codec pipeline that `skd.store` selects; `pipelines` names the pipeline serving each array.
    `batches(batch_size)` slices the blocks into consumer batches of stored (encoded) rows, as views of
    the blocks wherever a batch lies inside one block. `threads` is how many chunks zarrs decodes at once
    per read (its `threading.max_workers`, on zarrs' pool of one thread per core).

    zarr and zarrs read a missing shard file as fill values; every shard is written whole, so the reader
    lists the shard files of its range once, up front, and a missing one is a StoreError naming it.
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
        self.store, self.view, self.start, self.stop, self.rows = store, view, start, stop, rows
        self.block_rows = block_rows or store.shard_rows
        self.prefetch = prefetch
        self.threads = threads
        group, self._prefix = store._logit_group(view)
        names = ("logits", "scale", "offset") if store.codec.affine else ("logits",)
        with zarr.config.set({"threading.max_workers": threads}):  # zarrs reads it when the array opens
            self._arrays = {name: group[name] for name in names}
        self._lead = tuple(slice(i, i + 1) for i in self._prefix)  # slices: zarrs hands integer indexes to zarr
        self.pipelines = {name: codec_pipeline(array) for name, array in self._arrays.items()}
        self._check_files()

    def _check_files(self) -> None:
        """StoreError naming the first shard file of rows [start, stop) that is missing or a folder: one
        listing of each array's shard folders, compared with the files the shards need."""
        size = self.store.shard_rows
        shards = range(self.start // size, -(-self.stop // size))
        if not shards:
            return
        needed = {name: [str(shard_file(array, self._prefix, s)) for s in shards]
                  for name, array in self._arrays.items()}
        listed = {name: _listing(os.path.commonpath([os.path.dirname(f) for f in files]))
                  for name, files in needed.items()}
        for i, shard in enumerate(shards):
            a, b = self.store.shard_bounds(shard, self.rows)
            for name, files in needed.items():
                found, folders = listed[name]
                if files[i] in folders:  # zarrs reads that as a missing file too
                    raise self._os_error(IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), files[i]), a, b)
                if files[i] not in found:
                    raise self._damaged(f"{files[i]} is missing", a, b)

    def _read(self, a: int, b: int) -> Encoded:
        """Rows [a, b) of every array, each a new C-contiguous array; failures are one-line StoreErrors."""
        sel = self._lead + (slice(a, b),)
        parts = []
        for array in self._arrays.values():
            try:
                parts.append(array[sel][(0,) * len(self._lead)])
            except OSError as exc:
                if exc.errno is not None:  # zarr's own pipeline: permissions, I/O errors, stale network mounts
                    raise self._os_error(exc, a, b) from exc
                raise self._diagnose(array, exc, a, b) from exc  # zarrs: a zstd frame that fails to decode
            except (ValueError, RuntimeError) as exc:  # zarrs raises RuntimeError for damage and I/O alike
                raise self._diagnose(array, exc, a, b) from exc
        return Encoded(*parts)

    def _diagnose(self, array, exc: Exception, a: int, b: int) -> StoreError:
        """The error for a failed read of rows [a, b) of `array`: an OS error if reading its shard files
        gives one (zarrs' messages do not tell I/O from damage, nor name the file), else damage."""
        size = self.store.shard_rows
        files = [shard_file(array, self._prefix, s) for s in range(a // size, -(-b // size))]
        named = as_os_error(exc, ", ".join(map(str, files))) if isinstance(exc, RuntimeError) else None
        if isinstance(named, OSError):  # zarrs' "... (os error N)": a failed system call
            return self._os_error(named, a, b)
        for f in files:
            try:
                with open(f, "rb") as fh:
                    while fh.read(1 << 20):
                        pass
            except FileNotFoundError:
                return self._damaged(f"{f} is missing", a, b)
            except OSError as os_exc:
                return self._os_error(os_exc, a, b)
        detail = " ".join(str(exc).split())  # one line
        return self._damaged(f"{', '.join(map(str, files))}: {detail or type(exc).__name__}", a, b)

    def _damaged(self, detail: str, a: int, b: int) -> StoreError:
        return StoreError(f"{self.store.path}: rows {a}-{b} of {_split_name(self.view)} cannot be read ({detail}): "
                          "the cache is damaged; `skd-cache verify --integrity` lists every bad shard, "
                          "and rebuilding with --overwrite replaces it")

    def _os_error(self, exc: OSError, a: int, b: int) -> StoreError:
        """Permissions, I/O errors, stale network mounts: the cache's files, not the images."""
        return StoreError(f"{self.store.path}: rows {a}-{b} of {_split_name(self.view)} cannot be read "
                          f"({exc.strerror or exc}: {exc.filename or 'a cache file'}): check the cache's "
                          "files and their permissions")

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


def _split_name(view: int | None) -> str:
    return "val" if view is None else f"view {view}"


def _concat(parts: list[Encoded]) -> Encoded:
    if len(parts) == 1:
        return parts[0]
    return Encoded(*(None if parts[0][i] is None else np.concatenate([p[i] for p in parts]) for i in range(3)))


def _slice(e: Encoded, a: int, b: int | None) -> Encoded:
    return Encoded(*(None if x is None else x[a:b] for x in e))


def _listing(folder: str) -> tuple[set[str], set[str]]:
    """(files, folders) under `folder`, as paths joined onto it: one walk, no stat per file."""
    files, folders = set(), set()
    for root, dirs, names in os.walk(folder):
        files.update(os.path.join(root, n) for n in names)
        folders.update(os.path.join(root, d) for d in dirs)
    return files, folders
