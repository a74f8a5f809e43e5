"""The lock a build holds on its cache, and a training run on its run folder, so two never write
one.

`FolderLock` is a file lock beside a local folder (filelock: released by the kernel when its holder
dies, even by kill -9). `Lease` is an expiring object beside an object-store prefix, created with a
conditional put and renewed, since no kernel releases a lock there when its holder dies. Both name
their holder when they refuse, `check()` before each shard, and `release()` without raising.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import filelock

from skd.errors import BusyError

# seconds a lease lasts unless renewed (every third of it); SKD_LEASE_TTL overrides
LEASE_TTL = 60.0


def _holder_line() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"


class FolderLock:
    """An exclusive lock on the file `DIR.lock` beside a folder, holding its holder's name;
    `activity` says in the refusal what the holder does with the folder ("built" for a cache,
    "trained into" for a run)."""

    def __init__(self, out: Path, activity: str = "built"):
        out = out.resolve()  # `--out .` has no name to put a lock beside
        out.parent.mkdir(parents=True, exist_ok=True)
        self.path = out.with_name(out.name + ".lock")
        self._lock = filelock.FileLock(self.path, on_acquired=self._sign)
        try:
            self._lock.acquire(timeout=0)
        except filelock.Timeout:
            holder = self._read_holder() or "another process"
            raise BusyError(
                f"{out} is being {activity} by {holder}: wait for it to finish or stop it, then rerun to resume"
            ) from None

    @staticmethod
    def _sign(fd: int) -> None:
        os.ftruncate(fd, 0)
        os.write(fd, _holder_line().encode())

    def _read_holder(self) -> str:
        try:
            return self.path.read_text().strip()
        except OSError:
            return ""

    def check(self) -> None:
        """A kernel lock cannot be lost while its holder lives: nothing to check."""

    def release(self) -> None:
        """Remove the lock file and unlock (filelock makes a waiter that opened the removed file
        retry)."""
        if self._lock.is_locked:
            self.path.unlink(missing_ok=True)
            self._lock.release()

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Lease:
    """An exclusive, expiring lease: the object `key` in the obstore store `objects`.

    Taken with a conditional put that fails if the object exists (`mode="create"`), holding the
    owner (host, pid), a token and the expiry; renewed every ttl/3 by a background thread with a put
    that succeeds only if the object is still the one this lease wrote (its ETag), so a holder that
    stalled past the expiry learns that it lost the lease instead of overwriting its successor. An
    expired lease, or one whose holder is a dead process on this host, is taken over (again
    conditionally on its ETag). `release()` deletes it if it is still ours. Clocks of the nodes must
    agree to well within the ttl. `name` is the cache's URL for messages; `error(exc, what)` turns a
    failed request into a one-line error.
    """

    def __init__(self, objects, key: str, name: str, error, ttl: float | None = None):
        self.objects, self.key, self.name, self._error = objects, key, name, error
        self.ttl = float(ttl or os.environ.get("SKD_LEASE_TTL") or LEASE_TTL)
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

    def _put(self, mode) -> str:
        import obstore

        return obstore.put(self.objects, self.key, self._body(), mode=mode, use_multipart=False)[
            "e_tag"
        ]

    def _acquire(self) -> str:
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        for _ in range(10):
            try:
                return self._put("create")
            except AlreadyExistsError:
                pass
            except Exception as exc:
                raise self._error(exc, "refused the lease") from None
            try:
                current = obstore.get(self.objects, self.key)
                holder, meta = _holder(bytes(current.bytes())), current.meta
            except FileNotFoundError:
                continue  # released meanwhile: create it again
            if not self._expired(holder, meta):
                until = time.strftime("%H:%M:%S", time.localtime(holder.get("expires", 0)))
                raise BusyError(
                    f"{self.name} is being built by {holder.get('owner', 'another process')} "
                    f"(lease {self.key} renewed until {until}): wait for it to finish or stop it, "
                    "then rerun to resume; a killed build's lease expires by itself"
                )
            try:
                return self._put(_version(meta))
            except (PreconditionError, FileNotFoundError):
                continue  # someone else took it over first: look again
        raise BusyError(
            f"{self.name}: the lease {self.key} keeps changing hands: another build is starting; rerun later"
        )

    def _expired(self, holder: dict, meta: dict) -> bool:
        """Past its expiry (by the holder's record and by the store's clock), or held by a dead
        process here."""
        written = meta["last_modified"].timestamp()
        expires = max(
            float(holder.get("expires") or 0), written + float(holder.get("ttl") or self.ttl)
        )
        if time.time() > expires:
            return True
        return (
            holder.get("host") == self.host
            and isinstance(holder.get("pid"), int)
            and not _alive(holder["pid"])
        )

    def _renew(self) -> None:
        deadline = time.time() + self.ttl
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self.renew():
                    return
                deadline = time.time() + self.ttl
            # the store is unreachable for now: try again, unless the lease has run out
            except Exception:
                if time.time() > deadline:
                    self.lost = (
                        f"{self.name}: the lease {self.key} could not be renewed before it expired: "
                        "check the connection to the store, then rerun to resume"
                    )
                    return

    def renew(self) -> bool:
        """Extend the lease by a ttl if it is still the one this lease wrote; False (and `lost` set)
        if not."""
        from obstore.exceptions import PreconditionError

        try:
            self.etag = self._put({"e_tag": self.etag})
            return True
        except (PreconditionError, FileNotFoundError):
            self.lost = (
                f"{self.name}: the build lost its lease {self.key} (it was taken over after it "
                "expired): another build now writes this cache; rerun once it is done"
            )
            return False

    def check(self) -> None:
        """BusyError once the lease is lost: writing on would race the build that took it over."""
        if self.lost is not None:
            raise BusyError(self.lost)

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
                    _holder(bytes(obstore.get(self.objects, self.key).bytes())).get("token")
                    == self.token
                ):
                    obstore.delete(self.objects, self.key)
            except Exception:  # gone already, or unreachable: it expires by itself
                pass


def _version(meta: dict) -> dict:
    """The conditional-update mode of obstore's put: succeed only if the object is still this
    version."""
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
