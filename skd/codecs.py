"""Logit codecs: how a row of C teacher logits is stored, and how it decodes back to float32.

Pure functions on arrays. zstd compression happens in the store; a codec only picks the dtype and
the per-row affine quantisation. Per-row affine is invisible to the spherical loss's layer norm,
so the int8 codec loses only rounding, not range.
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


@dataclass(frozen=True)
class Codec:
    """A storage format for logits rows."""

    name: str
    dtype: str  # numpy dtype name of the stored logits
    affine: bool  # True: per-row float32 scale and offset arrays accompany the logits
    levels: int = 0  # number of quantisation levels of an affine codec

    def encode(self, logits: np.ndarray) -> Encoded:
        """Float rows (n, C) to the stored form."""
        logits = np.asarray(logits, dtype=np.float32)
        if not self.affine:
            return Encoded(logits.astype(self.dtype))
        low = logits.min(axis=1)
        high = logits.max(axis=1)
        scale = ((high - low) / (self.levels - 1)).astype(np.float32)
        safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.rint((logits - low[:, None]) / safe[:, None])
        q = np.clip(q, 0, self.levels - 1).astype(self.dtype)
        return Encoded(q, scale, low.astype(np.float32))

    def decode(self, encoded: Encoded) -> np.ndarray:
        """Stored rows back to float32 (n, C): `logits * scale + offset` for affine codecs."""
        logits = np.asarray(encoded.logits).astype(np.float32)
        if not self.affine:
            return logits
        return logits * encoded.scale[:, None] + encoded.offset[:, None]

    def decode_torch(self, logits: torch.Tensor, scale: torch.Tensor | None = None,
                     offset: torch.Tensor | None = None) -> torch.Tensor:
        """The same decode in torch, so it can run on the training device after a uint8 copy."""
        out = logits.float()
        if not self.affine:
            return out
        return out * scale.float()[:, None] + offset.float()[:, None]


CODECS = {
    "fp32": Codec("fp32", "float32", affine=False),
    "fp16": Codec("fp16", "float16", affine=False),
    "int8": Codec("int8", "uint8", affine=True, levels=256),
}


def get_codec(name: str) -> Codec:
    """The codec called `name`; ValueError naming the choices otherwise."""
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}: choose one of {', '.join(CODECS)}") from None
