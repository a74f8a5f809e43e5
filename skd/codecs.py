"""Logit codecs: how a row of C teacher logits is stored, and how it decodes back to float32.

Pure functions on arrays. zstd compression happens in the store; a codec only picks the dtype and
the per-row affine quantisation. Per-row affine is invisible to the spherical loss's layer norm,
so the int8 codec loses only rounding, not range.

`compact` keeps the same stored form (uint8 levels, float32 scale and offset per row) but sets the
step from the row's standard deviation (0.13 std) instead of its range: after the layer norm every row
then carries the same rounding error, KL(exact || decoded) ~= (0.13 m / T)^2 / 24 = 1.8e-4 at T=4, m=2
whatever the teacher's confidence, and a row uses ~100 of the 256 levels, about 5 bits of entropy
per value, which zstd in the store turns into ~640 B per row of 1000 classes (int8: ~900 B, 1.2e-5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch


class Encoded(NamedTuple):
    """Stored form of some rows: `logits` in the codec's dtype, `scale`/`offset` for affine codecs."""

    logits: np.ndarray
    scale: np.ndarray | None = None
    offset: np.ndarray | None = None


AFFINE_LIMIT = 1e18


@dataclass(frozen=True)
class Codec:
    """A storage format for logits rows."""

    name: str
    dtype: str  # numpy dtype name of the stored logits
    affine: bool  # True: per-row float32 scale and offset arrays accompany the logits
    levels: int = 0  # number of quantisation levels of an affine codec (at most, when `step` is set)
    step: float = 0.0  # affine step as a fraction of the row's std; 0: the row's range / (levels - 1)

    @property
    def limit(self) -> float:
        """Largest logit magnitude the stored form keeps: fp16 65504 (beyond it inf); affine 1e18 (beyond
        about 1.8e19 a row's float32 std overflows and the row is stored as NaN)."""
        return AFFINE_LIMIT if self.affine else float(np.finfo(self.dtype).max)

    def encode(self, logits: np.ndarray) -> Encoded:
        """Float rows (n, C) to the stored form."""
        logits = np.asarray(logits, dtype=np.float32)
        if not self.affine:
            return Encoded(logits.astype(self.dtype))
        low = logits.min(axis=1)
        high = logits.max(axis=1)
        scale = ((high - low) / (self.levels - 1)).astype(np.float32)
        if self.step:  # a step of `step` std, but never so fine that the row's range overflows the levels
            scale = np.maximum(scale, (self.step * logits.std(axis=1)).astype(np.float32))
        safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.rint((logits - low[:, None]) / safe[:, None])
        q = np.clip(q, 0, self.levels - 1).astype(self.dtype)
        return Encoded(q, scale, low.astype(np.float32))

    def decode(self, encoded: Encoded) -> np.ndarray:
        """Stored rows back to float32 (n, C): `logits * scale + offset` for affine codecs."""
        out = np.asarray(encoded.logits).astype(np.float32)  # a new array: scaled in place below
        if not self.affine:
            return out
        out *= np.asarray(encoded.scale, np.float32)[:, None]
        out += np.asarray(encoded.offset, np.float32)[:, None]
        return out

    def decode_torch(
        self, logits: torch.Tensor, scale: torch.Tensor | None = None, offset: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The same decode in torch, so it can run on the training device after a uint8 copy.

        Affine codecs: one new float32 tensor, scaled and shifted in place (a fused addcmul on the
        uint8 tensor takes torch's unvectorised mixed-dtype path and is 2-7x slower on a CPU).
        """
        if not self.affine:
            return logits.float()
        out = logits.to(torch.float32, copy=True)
        return out.mul_(scale.float()[:, None]).add_(offset.float()[:, None])


CODECS = {
    "fp32": Codec("fp32", "float32", affine=False),
    "fp16": Codec("fp16", "float16", affine=False),
    "int8": Codec("int8", "uint8", affine=True, levels=256),
    "compact": Codec("compact", "uint8", affine=True, levels=256, step=0.13),
}


def get_codec(name: str) -> Codec:
    """The codec called `name`; ValueError naming the choices otherwise."""
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}: choose one of {', '.join(CODECS)}") from None
