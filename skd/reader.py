"""Streaming reads of stored logit rows: one view's rows in order, read ahead in a background thread."""
from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Iterator

import numpy as np

from .codecs import Encoded
from .store import Store, StoreError, shard_file


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
