"""Where a cache lives, and the one place that knows how to reach it.

Every place that takes a cache takes a plain path, a `file://` URL or an object-store URL
(`s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix`); `parse_location` turns it
into a `Location`: a `LocalFolder` here, or an `ObjectPrefix` (skd.storage.objectstore). The rest of
skd asks the Location what it needs (what is there, write this whole shard, lock the cache, where
zarr opens it) and never which kind it is.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Protocol
from urllib.parse import unquote, urlsplit

from skd.config import path_text
from skd.storage.files import check_entry, check_files
from skd.storage.locks import FolderLock, Lease
from skd.storage.objectstore import SCHEMES, ObjectPrefix, StoreError

URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# abfss://container@account.dfs.core.windows.net/...
USER = re.compile(r"^[A-Za-z0-9._-]+@[^/@:]+(/|$)")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
HINT = "use s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, az://CONTAINER/PREFIX, file:///PATH or a local path"


class Location(Protocol):
    """A cache's home. Keys are `/`-separated paths relative to it (`views/logits/c/0/1/0`)."""

    kind: str  # "folder" or "object store", as `skd-cache info` names it
    # blocks a reader keeps in flight: 1 for a folder, more where each read waits on requests
    read_parallelism: int
    reads_whole_shards: bool  # read whole shards and slice them, rather than parts of one

    @property
    # the cache as shown and as `Store.path`: a folder's Path, or the URL
    def path(self) -> Path | str: ...

    def name(self, key: str = "") -> str: ...  # the file or URL of `key`, for messages
    def zarr_store(self, *, read_only: bool): ...  # what zarr.open_group opens
    # {key: bytes} of everything (under `under`)
    def listing(self, under: str = "") -> dict[str, int]: ...
    # the listing of an existing cache, checked as untrusted input
    def inspect(self) -> dict[str, int]: ...
    # CacheError unless the group's zarr.json is absent or fit to read
    def check_metadata(self) -> None: ...
    def is_empty(self) -> bool: ...
    # its size; FileNotFoundError if gone, OSError or StoreError if unreadable
    def probe(self, key: str) -> int: ...
    def put(self, key: str, data: bytes) -> None: ...  # one whole object, atomically
    def remove_all(self) -> None: ...
    def discard_partial_writes(self) -> None: ...  # temporary files a killed write left behind
    # why a new cache here would be unsafe, if it would
    def new_home_problem(self, data: Path) -> str | None: ...
    def lock(self, ttl: float | None = None) -> FolderLock | Lease: ...
    # the same home, named independently of the working directory
    def absolute(self) -> Location: ...


@dataclass(frozen=True)
class LocalFolder:
    """A cache in a folder of a local or shared file system."""

    folder: Path

    kind = "folder"
    # one background thread reads ahead; a second would compete for the same disk
    read_parallelism = 1
    reads_whole_shards = False

    def __str__(self) -> str:
        return str(self.folder)

    @property
    def path(self) -> Path:
        return self.folder

    def name(self, key: str = "") -> str:
        return str(self.folder / key) if key else str(self.folder)

    def absolute(self) -> LocalFolder:
        return LocalFolder(self.folder.resolve())

    def zarr_store(self, *, read_only: bool):
        return str(self.folder)

    def listing(self, under: str = "") -> dict[str, int]:
        """{key: size in bytes} of every file under the folder (or under `under` in it): one
        walk."""
        top = self.folder / under if under else self.folder
        found = {}
        for root, _, names in os.walk(top):
            rel = Path(root).relative_to(self.folder).as_posix()
            for n in names:
                key = n if rel == "." else f"{rel}/{n}"
                try:
                    found[key] = os.stat(os.path.join(root, n)).st_size
                except OSError:
                    found[key] = 0  # a dangling link: there, and reported by whoever reads it
        return found

    def inspect(self) -> dict[str, int]:
        """The listing of an existing cache, every entry checked first (a FIFO as a zarr.json would
        block zarr, a link must not lead out of the cache, no zarr.json over zarr metadata's
        size)."""
        if not self.folder.exists():
            raise StoreError(
                f"cache {self} does not exist: build it with `skd-cache build --out {self}`"
            )
        return check_files(self.folder) if self.folder.is_dir() else {}

    def check_metadata(self) -> None:
        """The group's zarr.json, if there, is a regular file inside the folder within zarr
        metadata's size."""
        entry = self.folder / "zarr.json"
        if os.path.lexists(entry):
            check_entry(self.folder, Path(os.path.realpath(self.folder)), entry)

    def is_empty(self) -> bool:
        return not self.folder.exists() or (self.folder.is_dir() and not any(self.folder.iterdir()))

    def probe(self, key: str) -> int:
        """Read the file `key` through (its size): the OS error it gives (a folder, a permission,
        EIO), if any."""
        size = 0
        with open(self.folder / key, "rb") as fh:
            while block := fh.read(1 << 20):
                size += len(block)
        return size

    def put(self, key: str, data: bytes) -> None:
        """Write the file `key` whole: a temporary file beside it, then renamed over it (readers see
        the old file or the new one, never a part; a kill leaves only a `.partial` file, removed on
        resume)."""
        target = self.folder / key
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}.", suffix=".partial"
        )
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def remove_all(self) -> None:
        shutil.rmtree(self.folder)

    def discard_partial_writes(self) -> None:
        for leftover in self.folder.rglob("*.partial"):  # left by a killed write (ours or zarr's)
            leftover.unlink()

    def new_home_problem(self, data: Path) -> str | None:
        """Why a cache here would be unsafe: the folder overlaps the dataset's train/ or val/, or a
        file stands in its path; None where it would not."""
        o, d = self.folder.resolve(), data.resolve()
        if (
            o == d
            or o in d.parents
            or any(o == d / s or d / s in o.parents for s in ("train", "val"))
        ):
            return f"--out {self} overlaps the dataset {data}: choose a folder outside its train/ and val/"
        for path in (self.folder, *self.folder.parents):
            if path.exists() and not path.is_dir():
                return f"--out {self}: {path} is a file: choose a folder for the cache"
        return None

    def lock(self, ttl: float | None = None) -> FolderLock:
        """The file lock `DIR.lock` beside the folder (`ttl` is for leases: a kernel lock needs
        none)."""
        return FolderLock(self.folder)


def parse_location(where) -> LocalFolder | ObjectPrefix:
    """A cache argument (a Location, a path, `file://`, `s3://`, `gs://` or `az://` URL) as a
    Location; StoreError for an unknown scheme, a URL without a bucket or one that carries a
    password."""
    if isinstance(where, (LocalFolder, ObjectPrefix)):
        return where
    text = path_text(where) if isinstance(where, PurePath) else str(where)
    if URL.match(text) is None:
        return LocalFolder(Path(text))
    scheme = URL.match(text).group(1).lower()
    rest = text[len(scheme) + 3 :].split("?", 1)[0].split("#", 1)[0]
    if "@" in rest and not (scheme in ("abfs", "abfss") and USER.match(rest)):
        raise StoreError(
            f"cache {scheme}://...: the URL carries user info (an '@'): put credentials in the "
            "environment (AWS_*, GOOGLE_*, AZURE_*), not in the URL"
        )
    if "#" in text or CONTROL.search(text):
        shown = CONTROL.sub("?", text.split("?", 1)[0].split("#", 1)[0])
        raise StoreError(
            f"cache {shown}...: the URL holds a '#' or a control character, which do not survive as object keys "
            "(a URL ends its path at '#'): name the prefix without them"
        )
    parts = urlsplit(text)
    host = parts.hostname or ""
    # never user info, a query (SAS tokens) or a fragment
    shown = f"{scheme}://{host}{parts.path}".rstrip("/")
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise StoreError(
                f"cache {shown}: a file:// URL names a local path (file:///PATH), not host {host}"
            )
        return LocalFolder(Path(unquote(parts.path)))
    if scheme not in SCHEMES:
        raise StoreError(f"cache {shown}: unknown scheme {scheme}://: {HINT}")
    if parts.query:
        raise StoreError(
            f"cache {shown}: the URL carries a query (a token?): put credentials in the "
            "environment (AWS_*, GOOGLE_*, AZURE_*), not in the URL"
        )
    bucket = host
    # abfss://container@account.dfs.core.windows.net/prefix: the container, no secret
    if parts.username:
        bucket, host = parts.username, f"{parts.username}@{host}"
    if not bucket:
        raise StoreError(f"cache {shown}: the URL names no bucket: {HINT}")
    prefix = unquote(parts.path).strip("/")
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise StoreError(
            f"cache {shown}: the prefix has an empty, '.' or '..' part: name it plainly"
        )
    root = f"{scheme}://{host}"
    return ObjectPrefix(
        display=root + (f"/{prefix}" if prefix else ""),
        scheme=scheme,
        bucket=bucket,
        root=root,
        prefix=prefix,
    )
