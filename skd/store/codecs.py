"""Logit codecs: how a row of C teacher logits is stored, and how it decodes back to float32.

Pure functions on arrays. zstd compression happens in the store; a codec only picks the dtype and
the per-row affine quantisation. Per-row affine is invisible to the spherical loss's layer norm,
so the int8 codec loses only rounding, not range.

`compact` keeps the same stored form (uint8 levels, float32 scale and offset per row) but sets the
step from the row's standard deviation (0.13 std) instead of its range: after the layer norm every
row then carries the same rounding error, KL(exact || decoded) ~= (0.13 m / T)^2 / 24 = 1.8e-4 at
T=4, m=2 whatever the teacher's confidence, and a row uses ~100 of the 256 levels, about 5 bits of
entropy per value, which zstd in the store turns into ~640 B per row of 1000 classes (int8: ~900 B,
1.2e-5).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import torch


class Encoded(NamedTuple):
    """Stored form of some rows: `logits` in the codec's dtype, `scale`/`offset` for affine codecs;
    for top-k codecs `logits` are the K largest (n, K), `index` their classes (n, K) and `offset`
    the value of every other class (n,)."""

    logits: np.ndarray
    scale: np.ndarray | None = None
    offset: np.ndarray | None = None
    index: np.ndarray | None = None


AFFINE_LIMIT = 1e18
TOPK_INDEX_DTYPE = "uint16"  # class indices of top-k codecs: up to 65,536 classes


@dataclass(frozen=True)
class Codec:
    """A storage format for logits rows."""

    name: str
    dtype: str  # numpy dtype name of the stored logits
    affine: bool  # True: per-row float32 scale and offset arrays accompany the logits
    # number of quantisation levels of an affine codec (at most, when `step` is set)
    levels: int = 0
    # affine step as a fraction of the row's std; 0: the row's range / (levels - 1)
    step: float = 0.0
    # top-k codecs: classes kept per row (the rest decode to one value per row); 0: whole rows
    top: int = 0
    classes: int = 0  # classes of a whole row (a top-k decode needs it; `for_classes` sets it)

    @property
    def arrays(self) -> tuple[str, ...]:
        """The stored arrays of this codec, as the store names them (`views/<name>`,
        `val/<name>`)."""
        if self.top:
            return ("logits", "offset", "index")
        return ("logits", "scale", "offset") if self.affine else ("logits",)

    def array_specs(self, classes: int) -> dict[str, tuple[tuple, str]]:
        """{stored array: (shape of one row's entry, dtype)} for rows of `classes` logits."""
        specs = {"logits": ((self.width(classes),), self.dtype)}
        if self.top:
            return {
                **specs,
                "offset": ((), "float32"),
                "index": ((self.width(classes),), TOPK_INDEX_DTYPE),
            }
        if self.affine:
            return {**specs, "scale": ((), "float32"), "offset": ((), "float32")}
        return specs

    def width(self, classes: int) -> int:
        """Stored values per row of `classes` logits."""
        return min(self.top, classes) if self.top else classes

    def for_classes(self, classes: int) -> Codec:
        """This codec for rows of `classes` logits."""
        return replace(self, classes=classes)

    @property
    def limit(self) -> float:
        """Largest logit magnitude the stored form keeps: fp16 and top-k 65504 (beyond it inf);
        affine 1e18 (beyond about 1.8e19 a row's float32 std overflows and the row is stored as
        NaN)."""
        return AFFINE_LIMIT if self.affine else float(np.finfo(self.dtype).max)

    def encode(self, logits: np.ndarray) -> Encoded:
        """Float rows (n, C) to the stored form."""
        logits = np.asarray(logits, dtype=np.float32)
        if self.top:
            return self._encode_top(logits)
        if not self.affine:
            return Encoded(logits.astype(self.dtype))
        low = logits.min(axis=1)
        high = logits.max(axis=1)
        scale = ((high - low) / (self.levels - 1)).astype(np.float32)
        # a step of `step` std, but never so fine that the row's range overflows the levels
        if self.step:
            scale = np.maximum(scale, (self.step * logits.std(axis=1)).astype(np.float32))
        safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.rint((logits - low[:, None]) / safe[:, None])
        q = np.clip(q, 0, self.levels - 1).astype(self.dtype)
        return Encoded(q, scale, low.astype(np.float32))

    def _encode_top(self, logits: np.ndarray) -> Encoded:
        """The K largest logits of each row, largest first (fp16), their classes, and the value the
        other classes decode to: the mean of the rest, which keeps the row's mean, so the layer norm
        centres the row as before."""
        n, classes = logits.shape
        k = self.width(classes)
        index = np.argpartition(-logits, k - 1, axis=1)[:, :k]
        values = np.take_along_axis(logits, index, 1)
        order = np.argsort(-values, axis=1, kind="stable")
        index, values = np.take_along_axis(index, order, 1), np.take_along_axis(values, order, 1)
        rest = classes - k
        total = logits.sum(1, dtype=np.float64) - values.sum(1, dtype=np.float64)
        offset = (total / rest if rest else np.zeros(n)).astype(np.float32)
        return Encoded(values.astype(self.dtype), None, offset, index.astype(TOPK_INDEX_DTYPE))

    def decode(self, encoded: Encoded) -> np.ndarray:
        """Stored rows back to float32 (n, C): `logits * scale + offset` for affine codecs; for
        top-k codecs `offset` everywhere but the stored classes."""
        if self.top:
            out = np.repeat(np.asarray(encoded.offset, np.float32)[:, None], self.classes, axis=1)
            index = np.asarray(encoded.index, np.int64)
            np.put_along_axis(out, index, np.asarray(encoded.logits, np.float32), axis=1)
            return out
        out = np.asarray(encoded.logits).astype(np.float32)  # a new array: scaled in place below
        if not self.affine:
            return out
        out *= np.asarray(encoded.scale, np.float32)[:, None]
        out += np.asarray(encoded.offset, np.float32)[:, None]
        return out

    def decode_torch(
        self,
        logits: torch.Tensor,
        scale: torch.Tensor | None = None,
        offset: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The same decode in torch, so it can run on the training device after a uint8 copy.

        Affine codecs: one new float32 tensor, scaled and shifted in place (a fused addcmul on the
        uint8 tensor takes torch's unvectorised mixed-dtype path and is 2-7x slower on a CPU).
        """
        if self.top:
            out = offset.float()[:, None].repeat(1, self.classes)
            return out.scatter_(1, index.long(), logits.float())
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


TOPK_PREFIX = "topk:"


def get_codec(name: str, classes: int = 0) -> Codec:
    """The codec called `name` (one of CODECS, or `topk:K`), for rows of `classes` logits (0: not
    known yet); ValueError naming the choices otherwise."""
    if name.startswith(TOPK_PREFIX):
        k = name[len(TOPK_PREFIX) :]
        if not k.isdigit() or not 1 <= int(k) <= 65536:
            raise ValueError(
                f"codec {name!r}: topk:K keeps the K largest logits of a row, K from 1 to 65536"
            )
        return Codec(f"topk:{int(k)}", "float16", affine=False, top=int(k), classes=classes)
    try:
        return CODECS[name].for_classes(classes)
    except KeyError:
        raise ValueError(
            f"unknown codec {name!r}: choose one of {', '.join(CODECS)} or topk:K (e.g. topk:10)"
        ) from None
