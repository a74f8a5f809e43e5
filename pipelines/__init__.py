"""Input pipelines: decode recorded windows (y, x, h, w) and flips into normalised batches.

One contract, two implementations: DALI (default, fast) and torchvision (reference, and the
fallback where DALI is missing). The cache build (teacher) and training (student) both go through
`make_loader`, so the student replays exactly the views the teacher saw.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from skd.errors import DeviceError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LOADERS = ("dali", "torchvision")
INTERPOLATIONS = ("bilinear", "bicubic")
DALI_DECODES = ("roi", "full", "cpu")
# The share of JPEGs DALI's GPU decoder hands to the hardware JPEG decoder of A100/H100-class GPUs:
# DALI's default
# (decoders.image, and restored for the nvImageCodec decoder by DALI PR #6366, measured best for
# ImageNet training).
HW_DECODER_LOAD = 0.65


@dataclass(frozen=True)
class DaliOptions:
    """How the DALI loader decodes on a GPU (--dali-decode, --hw-decoder-load); a CPU-only run
    decodes on the CPU.

    decode: `roi` decodes only each window on the GPU (decoders.image_slice); `full` decodes the
    whole image on the GPU, then slices the window (the fallback where GPU ROI decoding fails);
    `cpu` decodes the window with the CPU decoder and resizes it on the GPU. hw_decoder_load: the
    hardware decoder's share of each batch's JPEGs; 0 leaves it idle, and then an item's pixels do
    not depend on which batch slot it lands in.
    """

    decode: str = "roi"
    hw_decoder_load: float = HW_DECODER_LOAD

    def __post_init__(self):
        if self.decode not in DALI_DECODES:
            raise ValueError(
                f"--dali-decode {self.decode!r}: choose one of {', '.join(DALI_DECODES)}"
            )
        if not 0 <= self.hw_decoder_load <= 1:
            raise ValueError(
                f"--hw-decoder-load {self.hw_decoder_load}: give a share between 0 and 1"
            )


_dali_options = DaliOptions()


def set_dali_options(options: DaliOptions) -> None:
    """The DALI options every loader made from now on in this process uses (the commands'
    --dali-decode)."""
    global _dali_options
    _dali_options = options


def dali_options() -> DaliOptions:
    return _dali_options


@dataclass(frozen=True)
class Recipe:
    """How a model wants its input: each window resampled to size x size with `interpolation`
    (antialiased), then normalised with `mean` and `std` (RGB, on the 0-1 scale)."""

    size: int
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def options(self) -> dict:
        """The keyword arguments of `make_loader` that this recipe sets."""
        return dict(
            image_size=self.size, interpolation=self.interpolation, mean=self.mean, std=self.std
        )


EXIF_ORIENTATION = 0x0112  # values 5-8 turn the image by 90 degrees
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def exif_orientation(image: Image.Image, path=None) -> int:
    """The EXIF orientation DALI's decoders apply (1 when absent or unreadable), without decoding
    pixels.

    EXIF only: PIL's getexif() also takes XMP's tiff:Orientation, which DALI ignores, and decodes a
    whole PNG to find an eXIf chunk stored after the pixel data (here the chunk headers of the file
    at `path`, default the image's own file name, are walked).
    """
    tags = getattr(image, "tag_v2", None)  # TIFF keeps the tag in the image's own directory
    if tags is not None:
        return tags.get(EXIF_ORIENTATION, 1)
    raw = image.info.get("exif")
    if not raw and image.format == "PNG" and (path or image.filename):
        raw = _png_exif_chunk(path or image.filename)
    if not raw:
        return 1
    exif = Image.Exif()
    try:
        exif.load(raw)
    except Exception:  # PIL raises SyntaxError, struct.error, ValueError... on corrupt EXIF
        return 1
    return exif.get(EXIF_ORIENTATION, 1)


def _png_exif_chunk(path) -> bytes | None:
    """The data of a PNG's eXIf chunk wherever it lies, reading chunk headers only."""
    # unbuffered: each header read is 8 bytes, not a refilled buffer
    with open(path, "rb", buffering=0) as f:
        if f.read(8) != PNG_SIGNATURE:
            return None
        while len(head := f.read(8)) == 8:
            length, kind = struct.unpack(">I4s", head)
            if kind == b"eXIf":
                return f.read(length)
            if kind == b"IEND":
                return None
            f.seek(length + 4, 1)  # the data and its CRC
    return None


@dataclass
class Batch:
    """One batch of views, in the order given to `make_loader`.

    `images` and `labels` are on the requested device; `positions` stays on the CPU because it
    indexes host-side arrays (the cache's rows).
    """

    images: torch.Tensor  # (B, 3, S, S) float32, normalised, NCHW
    labels: torch.Tensor  # (B,) int64
    positions: torch.Tensor  # (B,) int64: the caller's position ids of these items
    # (B,) weight of each row's own image once mixed (skd.replay.recorded_ops)
    mix_lambda: torch.Tensor | None = None


class PixelOps(Protocol):
    """Item i's 8-bit (3, S, S) view -> the same after per-item pixel operations (uint8, same
    shape)."""

    def __call__(self, index: int, image: torch.Tensor) -> torch.Tensor: ...


class DecodeError(OSError):
    """An image the loader cannot decode (an OSError, as an unreadable file is): one line naming the
    batch."""


@dataclass(frozen=True)
class Items:
    """The validated, array-typed description of what to load, shared by both implementations."""

    files: tuple[str, ...]
    boxes: np.ndarray  # (M, 4) int64 (y, x, h, w)
    flips: np.ndarray  # (M,) uint8
    labels: np.ndarray  # (M,) int64
    positions: np.ndarray  # (M,) int64

    def __len__(self) -> int:
        return len(self.files)


def read_error(exc: OSError) -> str:
    """One line for an image the loader could not read: a DataLoader worker re-raises with the
    original message last."""
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def make_items(files, boxes, flips, labels, positions) -> Items:
    """Check shapes and lengths once, so both loaders fail the same way on bad input."""
    boxes = np.asarray(boxes, dtype=np.int64)
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (M, 4) windows (y, x, h, w), got shape {boxes.shape}")
    items = Items(
        files=tuple(str(f) for f in files),
        boxes=boxes,
        flips=np.asarray(flips, dtype=np.uint8).reshape(-1),
        labels=np.asarray(labels, dtype=np.int64).reshape(-1),
        positions=np.asarray(positions, dtype=np.int64).reshape(-1),
    )
    lengths = {
        name: len(getattr(items, name))
        for name in ("files", "boxes", "flips", "labels", "positions")
    }
    if len(set(lengths.values())) != 1:
        raise ValueError(
            f"files, boxes, flips, labels and positions must have one entry per item, got {lengths}"
        )
    if (items.boxes[:, 2:] <= 0).any():
        raise ValueError("every window must have a positive height and width")
    return items


def make_loader(
    kind: str,
    *,
    files: Sequence[str],
    boxes,
    flips,
    labels,
    positions,
    image_size: int,
    batch_size: int,
    workers: int = 2,
    device="cpu",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = "bilinear",
    dali: DaliOptions | None = None,
    pixel_ops: PixelOps | None = None,
) -> Iterable[Batch]:
    """Batches of the given views, in the given order, the short last batch included.

    files: absolute image paths, one per item, in delivery order; boxes: (M, 4) int (y, x, h, w)
    pixel windows in the decoded, EXIF-rotated frame; flips: (M,) 1 = mirror after cropping; labels:
    (M,); positions: (M,) int64 ids handed back with each item. The result has `len()` = number of
    batches. An item's tensor does not depend on batch_size or workers (nor, on a GPU with
    hw_decoder_load 0, on the batch slot). dali: how DALI decodes (default: this process's
    `dali_options()`). pixel_ops(i, image): what item i's 8-bit (3, S, S) view becomes after the
    flip, before normalisation (the plan's recorded RandAugment ops); it must be picklable, for the
    torchvision loader's worker processes.
    """
    if kind not in LOADERS:
        raise ValueError(f"unknown loader {kind!r}; choose one of {', '.join(LOADERS)}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"unknown interpolation {interpolation!r}; choose one of {', '.join(INTERPOLATIONS)}"
        )
    if batch_size < 1 or image_size < 1 or workers < 0:
        raise ValueError(
            f"need batch_size >= 1, image_size >= 1, workers >= 0; got {batch_size}, {image_size}, {workers}"
        )
    items = make_items(files, boxes, flips, labels, positions)
    options = dict(
        image_size=int(image_size),
        batch_size=int(batch_size),
        workers=int(workers),
        device=torch.device(device),
        mean=tuple(mean),
        std=tuple(std),
        interpolation=interpolation,
        pixel_ops=pixel_ops,
    )
    if kind == "torchvision":
        from .torchvision_pipeline import TorchvisionLoader

        return TorchvisionLoader(items, **options)
    try:
        from .dali_pipeline import DaliLoader
    except ImportError as error:
        raise DeviceError(f"DALI cannot be imported ({error}); use --loader torchvision") from error
    return DaliLoader(items, dali=dali or _dali_options, **options)
