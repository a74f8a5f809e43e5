"""The DALI pipeline: ROI-decode each recorded window, resize it, mirror and normalise.

Chain: batch-mode `external_source` (encoded bytes, anchors, shapes, flips) ->
`decoders.image_slice` -> `resize` (linear or cubic, antialiased) -> `crop_mirror_normalize`.
Windows and flips come from the caller, never from DALI's RNG, so the output of an item does
not depend on batch size or thread count. Measured on DALI 2.4 (CPU decoder):
`image_slice` applies the EXIF orientation before slicing, so windows live in the rotated frame
for orientations 1-8, and grayscale and CMYK JPEGs decode to the same RGB pixels as PIL.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import feed_ndarray

from . import Batch, DecodeError, Items

INTERP = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC}


class DaliLoader:
    """Iterates the items in order as `Batch`es; each iteration runs a fresh DALI pipeline."""

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
    ):
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"the DALI loader runs on cpu or cuda, not {device}")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.items, self.image_size, self.batch_size = items, image_size, batch_size
        self.threads, self.device = max(1, workers), device
        self.mean, self.std = [255 * m for m in mean], [255 * s for s in std]
        self.interp = INTERP[interpolation]
        self.batches = math.ceil(len(items) / batch_size)

    def __len__(self) -> int:
        return self.batches

    def _source(self, info: types.BatchInfo):
        """Batch `info.iteration`: file bytes, anchors (y, x), shapes (h, w), flips; StopIteration past the end.

        Batch mode lets the last batch be short (a per-sample source would drop it), and the file
        is read only when DALI asks for its batch, so nothing beyond the last item is touched.
        """
        start = info.iteration * self.batch_size
        stop = min(start + self.batch_size, len(self.items))
        if start >= stop:
            raise StopIteration
        boxes = self.items.boxes[start:stop].astype(np.int32)
        return (
            [np.fromfile(path, dtype=np.uint8) for path in self.items.files[start:stop]],
            list(boxes[:, :2]),
            list(boxes[:, 2:]),
            list(self.items.flips[start:stop].astype(np.int32)),
        )

    def _pipeline(self):
        gpu = self.device.type == "cuda"

        @pipeline_def(
            batch_size=self.batch_size,
            num_threads=self.threads,
            device_id=self.device.index if gpu else None,
            prefetch_queue_depth=2,
        )
        def views():
            encoded, anchor, shape, flip = fn.external_source(self._source, num_outputs=4, batch=True, batch_info=True)
            # jpeg_fancy_upsampling: the GPU decoder upsamples chroma like the CPU one (libjpeg-turbo, PIL).
            # hw_decoder_load=0: the hardware JPEG decoder takes a fixed fraction of each batch's slots,
            # so which decoder (and which rounding) an item gets would depend on the batch size.
            images = fn.decoders.image_slice(
                encoded,
                anchor,
                shape,
                device="mixed" if gpu else "cpu",
                axis_names="HW",
                normalized_anchor=False,
                normalized_shape=False,
                output_type=types.RGB,
                jpeg_fancy_upsampling=True,
                hw_decoder_load=0.0,
            )
            images = fn.resize(images, size=[self.image_size, self.image_size], interp_type=self.interp, antialias=True)
            return fn.crop_mirror_normalize(
                images, mirror=flip, mean=self.mean, std=self.std, output_layout="CHW", dtype=types.FLOAT
            )

        pipe = views()
        pipe.build()
        return pipe

    def __iter__(self) -> Iterator[Batch]:
        if not self.batches:
            return
        pipe = self._pipeline()
        # On CUDA, outputs are made ready on torch's current stream and copied there (as DALI's torch iterator does).
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        for b in range(self.batches):
            start, stop = b * self.batch_size, min((b + 1) * self.batch_size, len(self.items))
            try:
                (output,) = pipe.run(stream)
            except RuntimeError as error:  # DALI's message names the window, not the file
                raise DecodeError(
                    f"DALI could not decode one of items {start}..{stop - 1} (first "
                    f"{self.items.files[start]}): {_reason(error)}; --loader torchvision "
                    "decodes with PIL"
                ) from error
            images = torch.empty(
                (stop - start, 3, self.image_size, self.image_size), dtype=torch.float32, device=self.device
            )
            feed_ndarray(output.as_tensor(), images, cuda_stream=stream)
            yield Batch(
                images=images,
                labels=torch.tensor(self.items.labels[start:stop]).to(self.device, non_blocking=True),
                positions=torch.tensor(self.items.positions[start:stop]),
            )


def _reason(error: RuntimeError) -> str:
    """The last line of DALI's many-line report that says something (not "pipeline no longer valid")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip() and "no longer valid" not in line]
    return lines[-1] if lines else type(error).__name__
