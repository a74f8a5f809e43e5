"""The DALI pipeline: decode each recorded window, resize it, mirror and normalise.

Chain: batch-mode `external_source` (encoded bytes, anchors, shapes, flips) -> the window's pixels
-> `resize` (linear or cubic, antialiased) -> `crop_mirror_normalize`. The window's pixels come, by
`DaliOptions.decode`, from `decoders.image_slice` (roi: only the window is decoded, on the GPU where
there is one), `decoders.image` then `slice` (full), or the CPU's `image_slice` (cpu); a CPU-only
run decodes on the CPU in every mode. Windows and flips come from the caller, never from DALI's RNG,
so the output of an item does not depend on batch size or thread count. Measured on DALI 2.4 (CPU
decoder): the decoders apply the EXIF orientation before slicing, so windows live in the rotated
frame for orientations 1-8, and grayscale and CMYK JPEGs decode to the same RGB pixels as PIL.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import feed_ndarray

from . import Batch, DaliOptions, DecodeError, Items, PixelOps

INTERP = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC}
DEFAULT_READ_AHEAD = 3  # batches of files read ahead of the one DALI asks for
# what FileReaders use (benchmarks/build_pipelining.py sets 0 to compare)
READ_AHEAD = DEFAULT_READ_AHEAD


def _read(path: str) -> np.ndarray:
    return np.frombuffer(Path(path).read_bytes(), dtype=np.uint8)  # the read releases the GIL


class FileReader:
    """The encoded files of each batch, read on a few threads up to READ_AHEAD batches before DALI
    asks for them: reading overlaps decoding and the teacher instead of running inside `pipe.run()`
    on its thread."""

    def __init__(self, files: Sequence[str], batch_size: int, threads: int):
        self.files, self.batch_size = files, batch_size
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="skd-read")
        self.pending: dict[int, list[Future]] = {}

    def batch(self, b: int) -> list[np.ndarray]:
        for ahead in range(b, b + READ_AHEAD + 1):
            start = ahead * self.batch_size
            if ahead not in self.pending and start < len(self.files):
                self.pending[ahead] = [
                    self.pool.submit(_read, f) for f in self.files[start : start + self.batch_size]
                ]
        return [future.result() for future in self.pending.pop(b)]

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class _Feed:
    """The external source of a pipeline: the batches of whichever loader iterates it now."""

    loader: DaliLoader | None = None

    def __call__(self, info: types.BatchInfo):
        return self.loader._source(info)


# The pipelines of this process not iterated at the moment, by configuration: a loader of the same
# configuration
# (each view of a build, each epoch of training, with the same batch size and input recipe) takes
# one instead of
# building and warming up another. At most MAX_IDLE are kept (each holds its decoder's buffers).
MAX_IDLE = 2
_idle: dict[tuple, tuple] = {}
# how many this process built (tests/pipelines/test_dali_pipeline.py counts them)
built = {"pipelines": 0}


class DaliLoader:
    """Iterates the items in order as `Batch`es, through a DALI pipeline of its configuration that
    this process built once (one that finished its last iteration is reset and reused; one left part
    way is dropped)."""

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
        dali: DaliOptions,
        pixel_ops: PixelOps | None = None,
    ):
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"the DALI loader runs on cpu or cuda, not {device}")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.items, self.image_size, self.batch_size = items, image_size, batch_size
        self.threads, self.device, self.dali = max(1, workers), device, dali
        self.mean, self.std = [255 * m for m in mean], [255 * s for s in std]
        # applied in torch to DALI's 8-bit views, then normalised in torch
        self.pixel_ops = pixel_ops
        self.interp = INTERP[interpolation]
        self.batches = math.ceil(len(items) / batch_size)
        self.reader: FileReader | None = None

    def __len__(self) -> int:
        return self.batches

    def _source(self, info: types.BatchInfo):
        """Batch `info.iteration`: file bytes, anchors (y, x), shapes (h, w), flips; StopIteration
        past the end.

        Batch mode lets the last batch be short (a per-sample source would drop it); files are read
        ahead by the FileReader, never beyond the last item.
        """
        start = info.iteration * self.batch_size
        stop = min(start + self.batch_size, len(self.items))
        if start >= stop:
            raise StopIteration
        boxes = self.items.boxes[start:stop].astype(np.int32)
        return (
            self.reader.batch(info.iteration),
            list(boxes[:, :2]),
            list(boxes[:, 2:]),
            list(self.items.flips[start:stop].astype(np.int32)),
        )

    def _windows(self, encoded, anchor, shape):
        """Each window's RGB pixels, decoded as `self.dali.decode` says (on the GPU where there is
        one)."""
        gpu = self.device.type == "cuda"
        decoder = "mixed" if gpu and self.dali.decode != "cpu" else "cpu"
        # jpeg_fancy_upsampling: the GPU decoder upsamples chroma like the CPU one (libjpeg-turbo,
        # PIL).
        common = dict(
            device=decoder,
            output_type=types.RGB,
            jpeg_fancy_upsampling=True,
            hw_decoder_load=self.dali.hw_decoder_load,
        )
        window = dict(axis_names="HW", normalized_anchor=False, normalized_shape=False)
        if self.dali.decode == "full":
            images = fn.decoders.image(encoded, **common)
            return fn.slice(images, anchor, shape, **window)
        images = fn.decoders.image_slice(encoded, anchor, shape, **common, **window)
        return images.gpu() if gpu and decoder == "cpu" else images

    def _pipeline(self) -> tuple:
        """A new pipeline of this loader's configuration, and the feed its external source reads."""
        gpu, feed = self.device.type == "cuda", _Feed()

        @pipeline_def(
            batch_size=self.batch_size,
            num_threads=self.threads,
            device_id=self.device.index if gpu else None,
            prefetch_queue_depth=2,
        )
        def views():
            encoded, anchor, shape, flip = fn.external_source(
                feed, num_outputs=4, batch=True, batch_info=True
            )
            images = self._windows(encoded, anchor, shape)
            images = fn.resize(
                images,
                size=[self.image_size, self.image_size],
                interp_type=self.interp,
                antialias=True,
            )
            if self.pixel_ops is not None:  # 8-bit views: the ops come next, in torch
                return fn.crop_mirror_normalize(
                    images, mirror=flip, output_layout="CHW", dtype=types.UINT8
                )
            return fn.crop_mirror_normalize(
                images,
                mirror=flip,
                mean=self.mean,
                std=self.std,
                output_layout="CHW",
                dtype=types.FLOAT,
            )

        pipe = views()
        pipe.build()
        built["pipelines"] += 1
        return pipe, feed

    def __iter__(self) -> Iterator[Batch]:
        if not self.batches:
            return
        if self.device.type == "cuda" and self.dali.decode == "roi":
            from .dali_smoke import check_roi_decoder

            check_roi_decoder(self.device.index)
        key = (
            self.batch_size,
            self.threads,
            str(self.device),
            self.image_size,
            self.interp,
            *self.mean,
            *self.std,
        )
        key += (self.dali, self.pixel_ops is not None)
        pipe, feed = _idle.pop(key, None) or self._pipeline()
        feed.loader = self
        self.reader = FileReader(self.items.files, self.batch_size, min(8, max(2, self.threads)))
        finished = False
        try:
            yield from self._batches(pipe)
            finished = True
        finally:
            self.reader.close()
            feed.loader = None
            # DALI asked for the batch past the last, so the pipeline is at the end of an epoch
            if finished:
                pipe.reset()
                _idle[key] = (pipe, feed)
                while len(_idle) > MAX_IDLE:
                    _idle.pop(next(iter(_idle)))

    def _batches(self, pipe) -> Iterator[Batch]:
        # On CUDA, outputs are made ready on torch's current stream and copied there (as DALI's
        # torch iterator does).
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        for b in range(self.batches):
            start, stop = b * self.batch_size, min((b + 1) * self.batch_size, len(self.items))
            try:
                (output,) = pipe.run(stream)
            except RuntimeError as error:  # DALI's message names the window, not the file
                other = (
                    {"roi": "full or cpu", "full": "cpu"}.get(self.dali.decode)
                    if self.device.type == "cuda"
                    else None
                )
                raise DecodeError(
                    f"DALI could not decode one of items {start}..{stop - 1} (first "
                    f"{self.items.files[start]}): {_reason(error)}; "
                    + (f"--dali-decode {other} decodes otherwise, " if other else "")
                    + "--loader torchvision decodes with PIL"
                ) from error
            dtype = torch.float32 if self.pixel_ops is None else torch.uint8
            images = torch.empty(
                (stop - start, 3, self.image_size, self.image_size), dtype=dtype, device=self.device
            )
            feed_ndarray(output.as_tensor(), images, cuda_stream=stream)
            if self.pixel_ops is not None:
                images = self._after_ops(images, start)
            yield Batch(
                images=images,
                labels=torch.tensor(self.items.labels[start:stop]).to(
                    self.device, non_blocking=True
                ),
                positions=torch.tensor(self.items.positions[start:stop]),
            )

    def _after_ops(self, views: torch.Tensor, start: int) -> torch.Tensor:
        """8-bit views through each item's pixel ops, then normalised as crop_mirror_normalize
        does."""
        for row in range(len(views)):
            views[row] = self.pixel_ops(start + row, views[row])
        mean = torch.tensor(self.mean, dtype=torch.float32, device=views.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=views.device).view(1, 3, 1, 1)
        return (views.float() - mean) / std


def _reason(error: RuntimeError) -> str:
    """The last line of DALI's many-line report that says something (not "pipeline no longer
    valid")."""
    lines = [
        line.strip()
        for line in str(error).splitlines()
        if line.strip() and "no longer valid" not in line
    ]
    return lines[-1] if lines else type(error).__name__
