"""The reference pipeline: PIL decode, EXIF rotation, crop the window, bilinear or bicubic resize,
flip, normalise.

Runs wherever torch runs (no DALI); the DALI pipeline is checked against it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from skd.errors import SkdWarning

from . import Batch, Items, PixelOps, exif_orientation

RESAMPLING = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
# images this process has warned about (one warning per image, not per view)
_NAMED_OVERSIZED: set[str] = set()


def load_window(
    path: str, box: Sequence[int], flip: bool, image_size: int, interpolation: str
) -> torch.Tensor:
    """One view as an 8-bit (3, S, S) tensor: the window cropped, resized and mirrored where
    recorded.

    `box` is (y, x, h, w) in the EXIF-rotated frame, the frame DALI's decoders produce.
    PIL's BILINEAR resize filters with a support scaled to the downscale factor (antialiased),
    which matches DALI's linear resize with antialias=True to a fraction of a grey level.
    """
    y, x, h, w = (int(v) for v in box)
    with _open(path) as image:
        image = _rgb(_upright(image))
    width, height = image.size
    if y < 0 or x < 0 or h <= 0 or w <= 0 or y + h > height or x + w > width:
        raise ValueError(
            f"window (y={y}, x={x}, h={h}, w={w}) is outside {path} ({height}x{width} after EXIF rotation)"
        )
    view = image.crop((x, y, x + w, y + h)).resize(
        (image_size, image_size), RESAMPLING[interpolation]
    )
    tensor = torch.from_numpy(np.asarray(view, dtype=np.uint8).copy()).permute(2, 0, 1)
    return tensor.flip(-1) if flip else tensor


def normalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """An 8-bit (3, S, S) image as float32, scaled to [0, 1], minus `mean`, over `std`."""
    tensor = image.to(torch.float32).div_(255)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return tensor.sub_(mean_t).div_(std_t)


def _open(path: str) -> Image.Image:
    """Image.open, with PIL's DecompressionBombWarning (which names neither the file nor its size,
    and comes at every open) replaced by one SkdWarning naming the image, once per image in this
    process."""
    # DataLoader workers are processes: no other thread shares this state
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(path)
    limit, (width, height) = Image.MAX_IMAGE_PIXELS, image.size
    if (
        limit is not None
        and max(1, width) * max(1, height) > limit
        and path not in _NAMED_OVERSIZED
    ):
        _NAMED_OVERSIZED.add(path)
        warnings.warn(
            f"{path}: {width * height} pixels ({width} wide, {height} high), more than PIL's "
            f"decompression-bomb limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS): every decode of it "
            "takes that much memory; check that it is an image you mean to use",
            SkdWarning,
            stacklevel=3,
        )
    return image


def _upright(image: Image.Image) -> Image.Image:
    """The frame DALI decodes: the EXIF orientation applied; an orientation only XMP states is
    not."""
    return image if exif_orientation(image) == 1 else ImageOps.exif_transpose(image)


def _rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. 16-bit grey (PNG) is scaled by 1/257 as DALI does; PIL's own convert clips it to
    white."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I"):
        grey = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(grey / 257), 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


class WindowDataset(Dataset):
    """Item i = (view tensor, label, position) of the i-th entry of `items`."""

    def __init__(
        self,
        items: Items,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str,
        pixel_ops: PixelOps | None = None,
    ):
        self.items, self.image_size, self.mean, self.std = items, image_size, mean, std
        self.interpolation, self.pixel_ops = interpolation, pixel_ops

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        items = self.items
        image = load_window(
            items.files[i],
            items.boxes[i],
            bool(items.flips[i]),
            self.image_size,
            self.interpolation,
        )
        if self.pixel_ops is not None:
            image = self.pixel_ops(i, image)
        return normalize(image, self.mean, self.std), int(items.labels[i]), int(items.positions[i])


class TorchvisionLoader:
    """A torch DataLoader over the items, in order, short last batch kept, batches moved to
    `device`."""

    def __init__(
        self,
        items: Items,
        *,
        image_size: int,
        batch_size: int,
        workers: int,
        device: torch.device,
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str,
        pixel_ops: PixelOps | None = None,
    ):
        self.device = device
        self.batches = math.ceil(len(items) / batch_size)
        dataset = WindowDataset(items, image_size, mean, std, interpolation, pixel_ops)
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            drop_last=False,
            num_workers=workers,
            pin_memory=device.type == "cuda",
        )

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[Batch]:
        for images, labels, positions in self.loader:
            yield Batch(
                images=images.to(self.device, non_blocking=True),
                labels=labels.to(self.device, non_blocking=True),
                positions=positions,
            )
