"""What every file of a cache must be before zarr opens it: a folder or a regular file inside the
cache, metadata small enough to read whole; and the one error for a cache that is not what skd
wrote.

Both homes of a cache use these checks (a folder walks its entries, an object store checks its
listing), so they live with storage, below the schema that checks the cache's contents.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from skd.errors import CacheError


def rebuild(where) -> str:
    return f"{where}: rebuild or re-download it"


MAX_METADATA_BYTES = 2**20  # an array's zarr.json is about 1 KB; zarr reads it whole


def _entry_stat(path: Path, root: Path, entry) -> tuple[int, int]:
    """(mode, size) of a file or folder of the cache, links followed; CacheError for a link out of
    the cache or an entry that cannot be stat'ed (a link loop, a permission)."""
    if os.path.islink(entry):
        target = Path(os.path.realpath(entry))
        if root not in target.parents:
            raise CacheError(
                rebuild(f"cache {path}: {entry} is a symlink to {target}, outside the cache")
            )
    try:
        info = os.stat(entry)
    except OSError as exc:
        raise CacheError(
            rebuild(f"cache {path}: {entry} cannot be read ({exc.strerror})")
        ) from None
    return info.st_mode, info.st_size


def check_files(path: Path) -> dict[str, int]:
    """Every entry under the cache passes `check_entry`. Returns {key: bytes} of the files, keys
    relative to the cache (the listing the shard checks and storage figures use).

    One lstat per entry through os.scandir and keys joined as strings: a cache of 1,000 ImageNet
    views has ~800k files and folders. Links, and anything that is not a folder or a fit regular
    file, go through `check_entry`, which follows the link or names what is wrong."""
    root = Path(os.path.realpath(path))
    stack, files = [(str(root), "")], {}
    while stack:
        folder, under = stack.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                key = under + entry.name
                try:
                    info = None if entry.is_symlink() else entry.stat(follow_symlinks=False)
                except OSError:
                    info = None
                if info is not None and stat.S_ISDIR(info.st_mode):
                    stack.append((entry.path, key + "/"))
                elif (
                    info is not None
                    and stat.S_ISREG(info.st_mode)
                    and not _oversized(entry.name, info.st_size)
                ):
                    files[key] = info.st_size
                else:
                    # a link followed (not into), or an error
                    mode, size = check_entry(path, root, entry.path)
                    if not stat.S_ISDIR(mode):
                        files[key] = size
    return files


def _oversized(name: str, size: int) -> bool:
    return name == "zarr.json" and size > MAX_METADATA_BYTES


def check_entry(path: Path, root: Path, entry) -> tuple[int, int]:
    """(mode, size) of a folder or a regular file inside the cache `path` (real path `root`), where
    a zarr.json is at most MAX_METADATA_BYTES; CacheError otherwise: a FIFO would hang a reader, a
    device or socket is no cache file, a symlink must not lead out of the cache, and zarr reads
    metadata whole."""
    mode, size = _entry_stat(path, root, entry)
    if stat.S_ISDIR(mode):
        return mode, size
    if not stat.S_ISREG(mode):
        raise CacheError(rebuild(f"cache {path}: {entry} is not a regular file ({_kind(mode)})"))
    if _oversized(os.path.basename(entry), size):
        raise CacheError(
            rebuild(
                f"cache {path}: {entry} has {size} bytes, more than zarr metadata's {MAX_METADATA_BYTES}"
            )
        )
    return mode, size


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "a special file"
