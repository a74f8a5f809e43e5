"""Writing logits into a cache: whole shards from a background thread.

A shard is the unit of writing: concurrent writers to one shard lose data, and a shard written
piecewise is a read-modify-write each time. `ShardWriter` buffers rows until a shard is full,
encodes it and writes it in one call, then records it complete, so a kill leaves it incomplete,
never mixed.
"""

from __future__ import annotations

import queue
import threading

import numpy as np

from skd.errors import fault
from skd.storage.locks import FolderLock, Lease
from skd.storage.objectstore import StoreError
from skd.store.cache_store import Store, View, part_name


class ShardWriter:
    """Background writer: buffers rows of whole shards, encodes and writes each when full.

    `put` blocks when `depth` batches are waiting, so a slow disk slows the producer instead of
    filling memory. Errors in the writer surface in the producer's next `put` or in `close`.
    """

    def __init__(
        self,
        store: Store,
        view: View,
        shards: list[int],
        rows: int,
        lock: FolderLock | Lease | None = None,
        depth: int = 8,
    ):
        self.store, self.view, self.rows = store, view, rows
        # the build's lock (rank 0 holds it), checked before each shard: a lease lost stops writes
        self.lock = lock
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
        """Wait for every shard to be written; raises the writer's error or a shard left
        unfilled."""
        self.abort()
        if self.error is not None:
            raise self.error
        if self.shards:
            raise RuntimeError(f"input ended before shards {self.shards} were full")

    def abort(self) -> None:
        """Let the writer finish the rows already queued, then stop; never raises (close reports
        errors)."""
        self.queue.put(None)
        self.thread.join()

    def _run(self) -> None:
        buffer: list[np.ndarray] = []
        filled = 0
        try:
            while (item := self.queue.get()) is not None:
                positions, logits = item
                while len(positions):  # a batch may end one shard and start the next (of this rank)
                    if not self.shards:
                        raise RuntimeError(
                            f"rows arrived past the last shard at position {positions[0]}"
                        )
                    start, stop = self.store.shard_bounds(self.shards[0], self.rows)
                    take = min(len(positions), stop - start - filled)
                    if not np.array_equal(
                        positions[:take], np.arange(start + filled, start + filled + take)
                    ):
                        raise RuntimeError(f"rows arrived out of order at position {positions[0]}")
                    buffer.append(logits[:take])
                    filled += take
                    positions, logits = positions[take:], logits[take:]
                    if filled == stop - start:
                        self._write(self.shards.pop(0), np.concatenate(buffer))
                        buffer, filled = [], 0
        except BaseException as exc:  # handed to the producer thread
            self.error = exc
            while self.queue.get() is not None:
                pass

    def _write(self, shard: int, logits: np.ndarray) -> None:
        """Encode and write a shard's rows, then mark it complete: a kill in between leaves it
        incomplete."""
        if self.lock is not None:
            self.lock.check()
        try:
            self.store.write_shard_data(self.view, shard, self.store.codec.encode(logits))
            fault("mid-shard", self.shards_written + 1)
            self.store.mark_complete(self.view, shard)
        except OSError as exc:
            raise StoreError(
                f"cannot write shard {shard} of {part_name(self.view)} to {self.store.path} "
                f"({exc.strerror or exc}): free space or fix the disk, then rerun the same "
                "command to resume"
            ) from None
        # an object store that refused the shard's PUT or could not be reached
        except StoreError as exc:
            raise StoreError(f"{exc}, then rerun the same command to resume") from None
        self.shards_written += 1
        fault("after-shard", self.shards_written)


def mark_finished(store: Store) -> None:
    """Record `complete` in the attributes once every shard is (by a listing taken now: other ranks
    wrote too)."""
    store.listing(fresh=True)
    if store.is_complete() and not store.meta.get("complete"):
        store.meta = {**store.meta, "complete": True}
        store.group.attrs["skd"] = store.meta
