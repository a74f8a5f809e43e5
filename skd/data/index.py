"""The dataset index: which images an ImageFolder holds, their labels, decoded sizes and file sizes.

The index is what the cache is keyed by. Its order is torchvision ImageFolder's (class folders
sorted by name, files sorted within each class), so sample ids mean the same thing everywhere.
Image sizes come from header-only reads (no pixel decode): the augmentation plan needs every
image's (height, width) up front, and a full decode of 1.28 M ImageNet images would take hours.
Sizes are in the frame the decoders deliver after EXIF rotation, as DALI does by default.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from skd.data.image_probe import probe, regular_stat, warn_oversized
from skd.errors import DatasetError, SkdWarning

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

_CHUNK = 256  # images per thread-pool task: keeps the number of futures small for 1.28 M files
_NAMED_ERRORS = 20  # unreadable files named in the error message; the rest are counted
_LAYOUT = "train/<class>/<images>"


@dataclass(frozen=True)
class Split:
    """One split's samples in sample-id order (sorted ImageFolder order), as indexing finds them or
    as a cache records them; `file_bytes` and `fingerprint` are None for samples read from a
    cache."""

    paths: list[str]  # POSIX paths relative to the dataset root, e.g. "train/n01440764/a.JPEG"
    labels: np.ndarray  # (N,) int64 index into the dataset's classes
    sizes: np.ndarray  # (N, 2) (height, width) of the decoded frame after EXIF rotation
    file_bytes: np.ndarray | None = None  # (N,) int64 file sizes
    # (N,) uint64 `tail_digest` of each file: a same-size replacement shows in it
    tails: np.ndarray | None = None
    # sha256 hex of the relative paths and file sizes, see fingerprint()
    fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.paths)


@dataclass(frozen=True)
class DatasetIndex:
    """An indexed ImageFolder: ROOT/train/<class>/<images> and optionally
    ROOT/val/<class>/<images>."""

    root: Path  # absolute
    classes: list[str]  # sorted class folder names of train/
    train: Split
    val: Split | None  # None when ROOT/val is absent or not requested
    # (path relative to root, reason) left out by on_bad="skip"
    skipped: tuple[tuple[str, str], ...] = ()


ON_BAD = ("error", "skip")


def index_dataset(
    root, *, with_val: bool = True, workers: int = 16, progress: bool = False, on_bad: str = "error"
) -> DatasetIndex:
    """Scan ROOT/train (and ROOT/val when present and `with_val`) and read every image's header.

    `on_bad="error"` raises one DatasetError listing every unreadable or truncated image, every
    image name that is not a regular file (a FIFO, device or socket: never opened) and empty class
    folders; `"skip"` leaves them out and lists them in `DatasetIndex.skipped`.
    """
    if on_bad not in ON_BAD:
        raise ValueError(f"on_bad must be one of {ON_BAD}, got {on_bad!r}")
    skip = on_bad == "skip"
    root = Path(os.path.abspath(os.path.expanduser(root)))
    classes = _class_folders(root, "train")
    skipped: list[tuple[str, str]] = []  # empty class folders first, then unreadable files
    splits = [("train", *scan_split(root, "train", classes, empty=skipped))]
    if with_val and (root / "val").is_dir():
        splits.append(("val", *scan_split(root, "val", classes, empty=skipped)))
    all_paths = [p for _, paths, _ in splits for p in paths]
    sizes, file_bytes, tails, bad = _read_headers(
        root, all_paths, workers=workers, progress=progress, desc="image headers"
    )
    if (bad or skipped) and not skip:
        raise DatasetError(_bad_files_message(root, all_paths, bad, skipped))
    keep = np.ones(len(all_paths), bool)
    for i, reason in bad:
        keep[i] = False
        skipped.append((all_paths[i], reason))
    built, start = {}, 0
    for name, paths, labels in splits:
        stop = start + len(paths)
        kept = keep[start:stop]
        paths = [p for p, k in zip(paths, kept) if k]
        if not paths:
            raise DatasetError(
                f"{root / name} has no readable images left: replace the bad files listed by --on-bad-image error"
            )
        built[name] = Split(
            paths=paths,
            labels=labels[kept],
            sizes=sizes[start:stop][kept],
            file_bytes=file_bytes[start:stop][kept],
            tails=tails[start:stop][kept],
            fingerprint=fingerprint(paths, file_bytes[start:stop][kept]),
        )
        start = stop
    return DatasetIndex(
        root=root,
        classes=classes,
        train=built["train"],
        val=built.get("val"),
        skipped=tuple(skipped),
    )


def scan_split(
    root: Path, split: str, classes: list[str] | None = None, empty: list | None = None
) -> tuple[list[str], np.ndarray]:
    """Paths (relative to `root`, sorted ImageFolder order) and int64 labels of ROOT/<split>, no
    image reads.

    With `classes` None the class list is the split's own sorted folder names; otherwise labels
    index into `classes` (the val split uses the train classes) and a folder outside it is an error.
    A class folder without images is an error, unless `empty` is a list: then it is appended there
    as (folder, reason) and the class keeps its label with no samples.
    """
    root = Path(root)
    folders = _class_folders(root, split)
    if classes is None:
        classes = folders
    label_of = {name: i for i, name in enumerate(classes)}
    paths: list[str] = []
    labels: list[np.ndarray] = []
    for name in folders:
        class_dir = root / split / name
        if name not in label_of:
            raise DatasetError(
                f"{split} class folder {class_dir} is not one of the {len(classes)} class folders of "
                f"train/: rename it to a train class or remove it"
            )
        files = _class_files(class_dir, f"{split}/{name}")
        if not files and empty is not None:
            empty.append((f"{split}/{name}", "class folder without images"))
            continue
        if not files:
            raise DatasetError(
                f"class folder {class_dir} has no images ({', '.join(IMAGE_EXTENSIONS)}): "
                f"add its images or remove the folder"
            )
        paths.extend(files)
        labels.append(np.full(len(files), label_of[name], np.int64))
    undecodable = [p for p in paths if not _is_utf8(p)]
    if undecodable:
        shown = ", ".join(str(os.fsencode(p)) for p in undecodable[:5])
        raise DatasetError(
            f"file names under {root / split} that are not UTF-8 ({len(undecodable)}): {shown}: "
            "the cache stores paths as text; rename them"
        )
    return paths, np.concatenate(labels) if labels else np.zeros(0, np.int64)


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # undecodable bytes, kept by os.fsdecode as surrogates
        return False


def fingerprint(paths: list[str], file_bytes) -> str:
    """sha256 hex over "path<TAB>size<NEWLINE>" lines: changes when a file is added, removed,
    renamed or resized, not when it is only touched or copied elsewhere."""
    sizes = np.asarray(file_bytes, np.int64).tolist()
    if len(sizes) != len(paths):
        raise ValueError(
            f"fingerprint needs one file size per path: {len(sizes)} sizes, {len(paths)} paths"
        )
    text = "".join(f"{path}\t{size}\n" for path, size in zip(paths, sizes))
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def quick_fingerprints(root: Path, with_val: bool, skipped=()) -> tuple[str, str | None]:
    """(train, val) fingerprints from a directory scan and file sizes, without opening any image.

    `skipped` are the (path, reason) pairs a `--on-bad-image skip` build left out (recorded in the
    cache).
    """
    leave_out = {path for path, _ in skipped}
    out = []
    for split in ("train", "val"):
        if split == "val" and not (with_val and (root / "val").is_dir()):
            out.append(None)
            continue
        paths, _ = scan_split(root, split, empty=[])
        paths = [p for p in paths if p not in leave_out]
        # joined as strings: a Path per file costs more than its stat (1.28M files: 6.5 -> 2.8 s)
        base = str(root)
        out.append(fingerprint(paths, [os.stat(f"{base}/{p}").st_size for p in paths]))
    return out[0], out[1]


def check_root(root: Path) -> None:
    """DatasetError unless ROOT/train holds class folders: a cheap check before anything is loaded
    or written."""
    _class_folders(Path(root), "train")


def _class_folders(root: Path, split: str) -> list[str]:
    """Sorted names of the non-hidden folders in ROOT/<split>, with a DatasetError when there are
    none."""
    if not root.is_dir():
        problem = "is not a folder" if root.exists() else "does not exist"
        raise DatasetError(
            f"dataset root {root} {problem}: pass --data ROOT pointing at a folder with {_LAYOUT}"
        )
    split_dir = root / split
    if not split_dir.is_dir():
        raise DatasetError(
            f"{split_dir} does not exist: the dataset root {root} needs a {split}/ folder "
            f"laid out as {split}/<class>/<images>"
        )
    with os.scandir(split_dir) as scan:
        entries = [e for e in scan if not e.name.startswith(".")]
    folders = sorted(e.name for e in entries if e.is_dir())
    if folders:
        return folders
    loose = sum(1 for e in entries if _is_image_name(e.name))
    if loose:
        hint = ""
        if split == "val":
            hint = (
                " (ImageNet's val images must be sorted into class folders, e.g. with valprep.sh)"
            )
        raise DatasetError(
            f"{split_dir} holds {loose} image files but no class folders: move them into {split_dir}/<class>/{hint}"
        )
    if split == "train":
        raise DatasetError(
            f"{split_dir} has no class folders: put each class's images in {split_dir}/<class>/"
        )
    raise DatasetError(
        f"{split_dir} has no images: add {split_dir}/<class>/<images> or remove the folder"
    )


def _class_files(class_dir: Path, prefix: str) -> list[str]:
    """Image paths under `class_dir` (recursively, torchvision order), as `prefix`/<relative path>.

    Folder links are followed (torchvision does) only while they stay inside the class folder and
    lead somewhere not walked yet: a link to `..` or to another class would label that class's
    images as this one, and a loop would be walked ~40 levels deep. Such links are left out with one
    warning naming them.
    """
    top = os.path.realpath(class_dir)
    walked, refused = {top}, []
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        kept = []
        # folders before links
        for d in sorted(dirnames, key=lambda d: os.path.islink(os.path.join(dirpath, d))):
            if d.startswith("."):
                continue
            real = os.path.realpath(os.path.join(dirpath, d))
            if real in walked or not real.startswith(top + os.sep):
                refused.append(os.path.join(dirpath, d))
                continue
            walked.add(real)
            kept.append(d)
        dirnames[:] = kept
        names = sorted(n for n in filenames if _is_image_name(n))
        if names:
            found.append((dirpath, names))
    if refused:
        warnings.warn(
            f"{len(refused)} folder links under {class_dir} lead out of it or back into a folder already read "
            f"(first: {refused[0]}): not followed",
            SkdWarning,
            stacklevel=3,
        )
    base = len(str(class_dir))
    paths = []
    for dirpath, names in sorted(found):
        sub = prefix + dirpath[base:].replace(os.sep, "/")
        paths.extend(f"{sub}/{name}" for name in names)
    return paths


def _is_image_name(name: str) -> bool:
    """True for a non-hidden file name with an image extension (any case)."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _reason(exc: Exception) -> str:
    """PIL's or the OS's reason for a failed read, on one line and without the file name."""
    if isinstance(exc, UnidentifiedImageError):
        text = "cannot identify image file"
    elif isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _read_headers(
    root: Path, paths: list[str], *, workers: int, progress: bool, desc: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """(N, 2) int32 decoded sizes, (N,) int64 file sizes and (N,) uint64 tail digests of
    ROOT/<path>, and the (index, reason) of every file that cannot be read, in input order."""
    count = len(paths)
    sizes = np.zeros((count, 2), np.int32)
    file_bytes = np.zeros(count, np.int64)
    tails = np.zeros(count, np.uint64)
    bad: list[tuple[int, str]] = []

    def read_chunk(start: int) -> int:
        stop = min(start + _CHUNK, count)
        for i in range(start, stop):
            path = os.path.join(root, paths[i])
            try:
                file_bytes[i] = regular_stat(path).st_size  # before any open: a FIFO would block it
                sizes[i], tails[i] = probe(path)
            # any failure is this file's problem: collect, report all at once
            except Exception as exc:
                bad.append((i, _reason(exc)))
        return stop - start

    pool = ThreadPoolExecutor(max(1, workers))
    # Here, not in the threads: catch_warnings swaps process-wide state. PIL's warning names no
    # file; the sizes
    # read tell which images it was for, and warn_oversized names them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            futures = [pool.submit(read_chunk, start) for start in range(0, count, _CHUNK)]
            with tqdm(total=count, desc=desc, unit="img", disable=not progress) as bar:
                for future in as_completed(futures):
                    bar.update(future.result())
        finally:
            # on Ctrl-C, drop the queued chunks instead of reading them
            pool.shutdown(cancel_futures=True)
    warn_oversized((os.path.join(root, path), size) for path, size in zip(paths, sizes.tolist()))
    return sizes, file_bytes, tails, sorted(bad)


def _bad_files_message(
    root: Path, paths: list[str], bad: list[tuple[int, str]], empty: list
) -> str:
    """One line naming every empty class folder and the unreadable files (the first 20, then a
    count)."""
    parts = []
    if empty:
        folders = ", ".join(str(root / folder) for folder, _ in empty)
        parts.append(f"class folders with no images ({', '.join(IMAGE_EXTENSIONS)}): {folders}")
    if bad:
        named = "; ".join(
            f"{os.path.join(root, paths[i])} ({reason})" for i, reason in bad[:_NAMED_ERRORS]
        )
        more = f"; and {len(bad) - _NAMED_ERRORS} more" if len(bad) > _NAMED_ERRORS else ""
        parts.append(f"{len(bad)} of {len(paths)} image files cannot be read: {named}{more}")
    return (
        f"dataset {root}: "
        + "; ".join(parts)
        + ": fix, add or remove them, or pass --on-bad-image skip to leave them out"
    )
