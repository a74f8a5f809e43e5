"""What an image file is, without decoding its pixels: its decoded (height, width) from the header,
a check that a JPEG is complete, and a digest of its tail that tells two files of the same byte size
apart.

The dataset index probes every image once this way; `skd-cache verify` probes the sampled ones
again.
"""

from __future__ import annotations

import hashlib
import os
import stat
import warnings

from PIL import Image

from skd.errors import SkdWarning
from skd.pipelines import exif_orientation

_JPEG_TAIL = 4096  # bytes searched for the end-of-image marker (some files carry trailing padding)
_NAMED_ERRORS = 20  # oversized images named in one warning; the rest are counted


def image_size(path) -> tuple[int, int]:
    """(height, width) of the decoded frame, from the image header; EXIF orientations 5-8 swap them.

    Anything but a regular file (or a link to one) is an OSError before it is opened: opening a FIFO
    blocks until a writer appears, and a device may have side effects.
    """
    regular_stat(path)
    with warnings.catch_warnings():  # PIL's warning names no file: one naming it follows
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        size = probe(path)[0]
    warn_oversized([(str(path), size)])
    return size


def warn_oversized(named_sizes) -> None:
    """One SkdWarning naming the images, of these (path, (height, width)), whose pixels exceed PIL's
    decompression-bomb limit: PIL decodes them (it refuses only those above twice the limit), but
    its own DecompressionBombWarning names neither the file nor the size, and comes once per image
    open."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None:
        return
    over = [
        (path, int(h), int(w))
        for path, (h, w) in named_sizes
        if max(1, int(h)) * max(1, int(w)) > limit
    ]
    if not over:
        return
    where = f"more than PIL's decompression-bomb limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS)"
    if len(over) == 1:
        path, h, w = over[0]
        text = (
            f"{path}: {h * w} pixels ({w} wide, {h} high), {where}: every decode of it takes that much memory; "
            "check that it is an image you mean to use"
        )
    else:
        named = ", ".join(f"{path} ({w} wide, {h} high)" for path, h, w in over[:_NAMED_ERRORS])
        more = f" and {len(over) - _NAMED_ERRORS} more" if len(over) > _NAMED_ERRORS else ""
        text = (
            f"{len(over)} images have {where}: {named}{more}: every decode of them takes that much memory; "
            "check that they are images you mean to use"
        )
    warnings.warn(text, SkdWarning, stacklevel=2)


def regular_stat(path) -> os.stat_result:
    """os.stat of `path` (links followed); OSError "not a regular file (fifo)" for a FIFO, device,
    socket..."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise OSError(0, f"not a regular file ({_file_kind(info.st_mode)})")
    return info


def _file_kind(mode: int) -> str:
    """What a non-regular file is, in a user's words."""
    for test, kind in (
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISDIR, "folder"),
    ):
        if test(mode):
            return kind
    return "special file"


def probe(path) -> tuple[tuple[int, int], int]:
    """((height, width), tail digest) of an image, the file opened once: PIL reads the header from
    it, then its tail is read, for a JPEG's end marker (a complete JPEG has FF D9 near its end, a
    cut-off download does not: truncation caught without decoding the pixels) and for
    `tail_digest`."""
    with open(path, "rb") as file, Image.open(file) as image:
        # TIFF: the stored size (newer PIL reports it already turned)
        tags = getattr(image, "tag_v2", None)
        width, height = (tags[256], tags[257]) if tags is not None else image.size
        if exif_orientation(image, path) in (5, 6, 7, 8):  # the image was opened from a file object
            width, height = height, width
        tail = _tail(file)
        if image.format == "JPEG" and b"\xff\xd9" not in tail:
            raise OSError(0, "truncated JPEG: no end-of-image marker")
    return (height, width), tail_digest(tail)


def tail_digest(tail: bytes) -> int:
    """A 64-bit BLAKE2b digest of a file's last 4,096 bytes (all of a shorter one), as an unsigned
    integer: the end of a JPEG's entropy-coded data differs between any two photos, so an image
    replaced by another of the same byte size is told apart without reading it whole."""
    return int.from_bytes(hashlib.blake2b(tail, digest_size=8).digest(), "little")


def file_tail_digest(path) -> int:
    """`tail_digest` of the file at `path` as it is now."""
    with open(path, "rb") as file:
        return tail_digest(_tail(file))


def _tail(file) -> bytes:
    """The last _JPEG_TAIL bytes of an open file (all of a shorter one)."""
    size = file.seek(0, os.SEEK_END)
    file.seek(max(0, size - _JPEG_TAIL))
    return file.read()
