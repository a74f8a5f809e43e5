"""What each codec would cost and lose on a cache's own rows (`skd-cache codecs`): bytes per row
after the store's compression, the KL of the SKD and Hinton targets against the stored rows, and
top-1/top-5 agreement.

Pure arithmetic on rows in memory, plus one in-memory zarr array per stored array in the store's own
layout (shards, chunks, zstd), so bytes per row are what a cache of that codec would hold on disk.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
import zarr
import zarr.storage

from skd.errors import SkdError
from skd.loss import kl_per_row, skd_kl
from skd.store.cache_store import Store
from skd.store.codecs import CODECS, Codec, Encoded, get_codec
from skd.store.creation import create_logit_arrays

CANDIDATES = (*CODECS, "topk:10", "topk:100")
AUTO = "auto"  # build --codec auto: the smallest candidate within --max-kl
# --codec auto without --max-kl: int8's error is 1.2e-5, compact's 1.8e-4 (docs/codecs.md)
DEFAULT_MAX_KL = 1e-4
FIDELITY_ROWS = 4096  # first rows of view 0 a build measures its codec on
# the SKD recipe's T and m, at which a cache's codec fidelity is recorded
TEMPERATURE, MULTIPLIER = 4.0, 2.0


@dataclass(frozen=True)
class CodecFigures:
    """One codec measured on some rows: the JSON object of `skd-cache codecs --json`."""

    codec: str
    # everything stored for a row (values, scale/offset, indices), after compression
    bytes_per_row: float
    kl_skd: float  # mean KL(SKD target of the stored row || of the decoded row), no T^2 factor
    kl_hinton: float  # mean KL(softmax(stored / T) || softmax(decoded / T))
    top1_agreement: float  # share of rows whose decoded top-1 class is the stored row's
    # mean share of the stored row's 5 best classes among the decoded row's 5 best
    top5_agreement: float

    def to_dict(self) -> dict:
        return asdict(self)


def stored_bytes(encoded: Encoded, codec: Codec, shard_rows: int, chunk_rows: int) -> int:
    """Bytes the encoded rows take in the store's own arrays (skd.store.creation's layout: sharded
    along rows, zstd-compressed chunks), laid out in memory."""
    objects: dict = {}
    group = zarr.open_group(zarr.storage.MemoryStore(objects), mode="w", zarr_format=3)
    rows, classes = len(encoded.logits), codec.classes
    create_logit_arrays(group, "views", (), rows, classes, codec, shard_rows, chunk_rows)
    for name in codec.arrays:
        group[f"views/{name}"][...] = getattr(encoded, name)
    return sum(len(value) for key, value in objects.items() if not key.endswith("zarr.json"))


def measure(
    codec: Codec,
    rows: np.ndarray,
    *,
    temperature: float,
    multiplier: float,
    shard_rows: int,
    chunk_rows: int,
) -> CodecFigures:
    """`codec`'s figures on float32 rows (n, C): stored size, and fidelity of its decoded rows to
    them."""
    codec = codec.for_classes(rows.shape[1])
    encoded = codec.encode(rows)
    decoded = torch.from_numpy(codec.decode(encoded)).double()
    exact = torch.from_numpy(rows).double()
    kl_skd = skd_kl(
        exact, decoded, multiplier=multiplier, temperature=temperature, dtype=torch.float64
    )
    kl_hinton = kl_per_row(
        torch.log_softmax(exact / temperature, dim=1),
        torch.log_softmax(decoded / temperature, dim=1),
    ).clamp_min(0.0)
    k = min(5, rows.shape[1])
    top_exact, top_decoded = exact.topk(k, dim=1).indices, decoded.topk(k, dim=1).indices
    shared = (top_exact[:, :, None] == top_decoded[:, None, :]).any(dim=2).double().mean(dim=1)
    return CodecFigures(
        codec=codec.name,
        bytes_per_row=stored_bytes(encoded, codec, shard_rows, chunk_rows) / len(rows),
        kl_skd=float(kl_skd.mean()),
        kl_hinton=float(kl_hinton.mean()),
        top1_agreement=float((top_exact[:, 0] == top_decoded[:, 0]).double().mean()),
        top5_agreement=float(shared.mean()),
    )


def codec_table(
    rows: np.ndarray,
    codecs: Sequence[str] = CANDIDATES,
    *,
    temperature: float = 4.0,
    multiplier: float = 2.0,
    shard_rows: int = 16384,
    chunk_rows: int = 1024,
) -> list[CodecFigures]:
    """Every codec of `codecs` measured on the same rows."""
    return [
        measure(
            get_codec(name),
            rows,
            temperature=temperature,
            multiplier=multiplier,
            shard_rows=shard_rows,
            chunk_rows=chunk_rows,
        )
        for name in codecs
    ]


def cache_codec_table(
    store: Store,
    rows: int,
    codecs: Sequence[str] = CANDIDATES,
    *,
    temperature: float,
    multiplier: float,
) -> tuple[int, list[CodecFigures]]:
    """(rows measured, figures): every codec on the first `rows` positions of view 0 of a cache (the
    plan's order is random, so they are a random sample of its images), decoded as stored, in the
    cache's own layout."""
    if not store.part_complete(0)[0]:
        raise SkdError(
            f"{store.path}: the first shard of view 0 is not written yet: rerun the build to finish it"
        )
    shard = store.shard_bounds(0, store.num_samples)[1]
    rows = min(rows, shard, store.num_samples)
    logits = store.read_logits(0, 0, rows)
    figures = codec_table(
        logits,
        codecs,
        temperature=temperature,
        multiplier=multiplier,
        shard_rows=store.shard_rows,
        chunk_rows=int(store.meta["chunk_rows"]),
    )
    return rows, figures


def codec_fidelity(
    codec: str,
    rows: np.ndarray,
    *,
    max_kl: float | None,
    shard_rows: int,
    chunk_rows: int,
    reference: str = "the teacher's logits",
) -> tuple[str, dict]:
    """(codec, its fidelity record for the cache's attributes) on float32 rows (`reference`: what
    they are): `codec`, or for "auto" the smallest candidate whose SKD KL is at most `max_kl` (fp32
    when none is)."""
    options = dict(
        temperature=TEMPERATURE, multiplier=MULTIPLIER, shard_rows=shard_rows, chunk_rows=chunk_rows
    )
    if codec == AUTO:
        limit = DEFAULT_MAX_KL if max_kl is None else max_kl
        chosen = smallest_within(codec_table(rows, CANDIDATES, **options), limit)
        figures = chosen or measure(get_codec("fp32"), rows, **options)
        record = {"chosen_within_kl_skd": limit}
    else:
        figures, record = measure(get_codec(codec), rows, **options), {}
    record.update(
        reference=reference,
        rows=len(rows),
        temperature=TEMPERATURE,
        multiplier=MULTIPLIER,
        **figures.to_dict(),
    )
    del record["codec"]
    return figures.codec, record


def fidelity_line(record: dict | None) -> str:
    """The recorded fidelity of a cache's codec, in words (info, stats)."""
    if not record:
        return "fidelity not recorded (a cache built before skd measured it)"
    return (
        f"KL of the SKD target {record['kl_skd']:.2g} (T={record['temperature']:g}, m={record['multiplier']:g}), "
        f"of the Hinton target {record['kl_hinton']:.2g}, top-1 agreement {record['top1_agreement']:.2%}, "
        f"on the first {record['rows']:,} rows of view 0, against {record.get('reference', 'the teacher')}"
    )


def smallest_within(figures: Sequence[CodecFigures], max_kl: float) -> CodecFigures | None:
    """The codec with the fewest bytes per row whose SKD KL is at most `max_kl` (None: none is)."""
    fitting = [f for f in figures if f.kl_skd <= max_kl]
    return min(fitting, key=lambda f: f.bytes_per_row) if fitting else None


def table_lines(
    figures: Sequence[CodecFigures], rows: int, temperature: float, multiplier: float
) -> list[str]:
    """The table as `skd-cache codecs` prints it."""
    lines = [
        f"{rows:,} rows; KL of the SKD target (T={temperature:g}, m={multiplier:g}) and of the Hinton target "
        f"(T={temperature:g}) against the stored rows",
        f"{'codec':<10} {'bytes/row':>10} {'KL skd':>10} {'KL hinton':>10} {'top-1':>7} {'top-5':>7}",
    ]
    for f in figures:
        lines.append(
            f"{f.codec:<10} {f.bytes_per_row:>10,.1f} {f.kl_skd:>10.2e} {f.kl_hinton:>10.2e} "
            f"{f.top1_agreement:>7.2%} {f.top5_agreement:>7.2%}"
        )
    return lines
