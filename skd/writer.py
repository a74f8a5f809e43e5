"""Writing logits into a cache: whole shards from a background thread, and the lock one build holds.

A shard is the unit of writing: concurrent writers to one shard lose data, and a shard written
piecewise is a read-modify-write each time. `ShardWriter` buffers rows until a shard is full, encodes
it and writes it in one call, then records it complete, so a kill leaves it incomplete, never mixed.

`acquire_lock` takes the lock of a cache: a `BuildLock` (flock on a file beside the folder) for a local
cache, a `Lease` (an object beside the prefix, created with a conditional put and renewed) for a cache in
an object store, where no kernel releases a lock when its holder dies.
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import socket
import threading
import time
from pathlib import Path

import numpy as np

from .errors import SkdError, fault
from .store import Location, Store, parse_location

LEASE_TTL = 60.0  # seconds a lease lasts unless renewed (every third of it); SKD_LEASE_TTL overrides


class WriteError(SkdError):
    """Logits cannot be written (disk full, cache being built by another process): one line saying what to do."""


class ShardWriter:
    """Background writer: buffers rows of whole shards, encodes and writes each when full.

    `put` blocks when `depth` batches are waiting, so a slow disk slows the producer instead of
    filling memory. Errors in the writer surface in the producer's next `put` or in `close`.
    """

    def __init__(self, store: Store, view: int | None, shards: list[int], rows: int, depth: int = 8, lock=None):
        self.store, self.view, self.rows = store, view, rows
        self.lock = lock  # a Lease is checked before each shard: one lost (taken over) stops the writes
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
        buffer: list[np.ndarray] = []
        filled = 0
        try:
            while (item := self.queue.get()) is not None:
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
                        self._write(self.shards.pop(0), np.concatenate(buffer))
                        buffer, filled = [], 0
        except BaseException as exc:  # handed to the producer thread
            self.error = exc
            while self.queue.get() is not None:
                pass

    def _write(self, shard: int, logits: np.ndarray) -> None:
        """Encode and write a shard's rows, then mark it complete: a kill in between leaves it incomplete."""
        where = "val" if self.view is None else f"view {self.view}"
        if hasattr(self.lock, "check"):
            self.lock.check()
        try:
            self.store.write_shard_data(self.view, shard, self.store.codec.encode(logits))
            fault("mid-shard", self.shards_written + 1)
            self.store.mark_complete(self.view, shard)
        except OSError as exc:
            raise WriteError(
                f"cannot write shard {shard} of {where} to {self.store.path} "
                f"({exc.strerror or exc}): free space or fix the disk, then rerun the same "
                "command to resume"
            ) from None
        self.shards_written += 1
        fault("after-shard", self.shards_written)


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
                raise WriteError(
                    f"{out} is being built by {holder}: wait for it to finish or stop it, then rerun to resume"
                ) from None
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


class Lease:
    """An exclusive, expiring lease on a cache in an object store: the object `<prefix>.lock` beside it.

    Taken with a conditional put that fails if the object exists (`mode="create"`), holding the owner
    (host, pid), a token and the expiry; renewed every ttl/3 by a background thread with a put that
    succeeds only if the object is still the one this lease wrote (its ETag), so a holder that stalled past
    the expiry learns that it lost the lease instead of overwriting its successor. An expired lease, or
    one whose holder is a dead process on this host, is taken over (again conditionally on its ETag).
    `release()` deletes it if it is still ours. Clocks of the nodes must agree to well within the ttl.
    """

    def __init__(self, where: str | Path | Location, ttl: float | None = None):
        self.location = parse_location(where)
        if self.location.is_local or not self.location.prefix:
            raise WriteError(
                f"{self.location}: a lease is for a cache under a prefix of an object store (s3://BUCKET/NAME)"
            )
        self.ttl = float(ttl or os.environ.get("SKD_LEASE_TTL") or LEASE_TTL)
        self.key = self.location.prefix + ".lock"
        self.host, self.pid, self.token = socket.gethostname(), os.getpid(), os.urandom(8).hex()
        self.lost: str | None = None
        self._stop = threading.Event()
        self.etag = self._acquire()
        self.thread = threading.Thread(target=self._renew, daemon=True, name="skd-lease")
        self.thread.start()

    def _body(self) -> bytes:
        return json.dumps(
            {
                "owner": f"pid {self.pid} on {self.host}",
                "host": self.host,
                "pid": self.pid,
                "token": self.token,
                "ttl": self.ttl,
                "expires": time.time() + self.ttl,
                "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
        ).encode()

    def _acquire(self) -> str:
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        objects = self.location.bucket_objects
        for _ in range(10):
            try:
                return obstore.put(objects, self.key, self._body(), mode="create", use_multipart=False)["e_tag"]
            except AlreadyExistsError:
                pass
            except Exception as exc:
                raise self.location.error(exc, "refused the lease") from None
            try:
                current = obstore.get(objects, self.key)
                holder, meta = _holder(bytes(current.bytes())), current.meta
            except FileNotFoundError:
                continue  # released meanwhile: create it again
            if not self._expired(holder, meta):
                until = time.strftime("%H:%M:%S", time.localtime(holder.get("expires", 0)))
                raise WriteError(
                    f"{self.location} is being built by {holder.get('owner', 'another process')} "
                    f"(lease {self.key} renewed until {until}): wait for it to finish or stop it, "
                    "then rerun to resume; a killed build's lease expires by itself"
                )
            try:
                return obstore.put(objects, self.key, self._body(), mode=_version(meta), use_multipart=False)["e_tag"]
            except (PreconditionError, FileNotFoundError):
                continue  # someone else took it over first: look again
        raise WriteError(
            f"{self.location}: the lease {self.key} keeps changing hands: another build is starting; rerun later"
        )

    def _expired(self, holder: dict, meta: dict) -> bool:
        """Past its expiry (by the holder's record and by the store's clock), or held by a dead process here."""
        written = meta["last_modified"].timestamp()
        expires = max(float(holder.get("expires") or 0), written + float(holder.get("ttl") or self.ttl))
        if time.time() > expires:
            return True
        return holder.get("host") == self.host and isinstance(holder.get("pid"), int) and not _alive(holder["pid"])

    def _renew(self) -> None:
        deadline = time.time() + self.ttl
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self.renew():
                    return
                deadline = time.time() + self.ttl
            except Exception:  # the store is unreachable for now: try again, unless the lease has run out
                if time.time() > deadline:
                    self.lost = (
                        f"{self.location}: the lease {self.key} could not be renewed before it expired: "
                        "check the connection to the store, then rerun to resume"
                    )
                    return

    def renew(self) -> bool:
        """Extend the lease by a ttl if it is still the one this lease wrote; False (and `lost` set) if not."""
        import obstore
        from obstore.exceptions import PreconditionError

        try:
            self.etag = obstore.put(
                self.location.bucket_objects, self.key, self._body(), mode={"e_tag": self.etag}, use_multipart=False
            )["e_tag"]
            return True
        except (PreconditionError, FileNotFoundError):
            self.lost = (
                f"{self.location}: the build lost its lease {self.key} (it was taken over after it "
                "expired): another build now writes this cache; rerun once it is done"
            )
            return False

    def check(self) -> None:
        """WriteError once the lease is lost: writing on would race the build that took it over."""
        if self.lost is not None:
            raise WriteError(self.lost)

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours; never raises."""
        import obstore

        if self._stop.is_set():
            return
        self._stop.set()
        self.thread.join()
        if self.lost is None:
            try:
                if (
                    _holder(bytes(obstore.get(self.location.bucket_objects, self.key).bytes())).get("token")
                    == self.token
                ):
                    obstore.delete(self.location.bucket_objects, self.key)
            except Exception:  # gone already, or unreachable: it expires by itself
                pass


def acquire_lock(where: str | Path | Location, ttl: float | None = None) -> BuildLock | Lease:
    """The lock of the cache at `where`: a BuildLock beside a local folder, a Lease beside an object-store
    prefix. Either is released with `release()`; both raise a one-line WriteError naming the holder."""
    location = parse_location(where)
    return BuildLock(location.local) if location.is_local else Lease(location, ttl)


def _version(meta: dict) -> dict:
    """The conditional-update mode of obstore's put: succeed only if the object is still this version."""
    return {"e_tag": meta["e_tag"], **({"version": meta["version"]} if meta.get("version") else {})}


def _holder(data: bytes) -> dict:
    try:
        holder = json.loads(data)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
