"""Counter-based random draws: every random number the plan uses, a pure function of (seed, view,
stream, id).

An id is a sample id (order, crop windows, flips) or a pair index (mixing). Ids are cut into blocks
of `BLOCK` consecutive ids; block b of a stream is drawn by numpy's Philox, a counter-based
generator, keyed by (seed, view, stream) with its counter starting at block b. A value therefore
depends on its id only, never on which other ids are drawn with it: planning all samples at once, in
pieces, per batch or per process gives the same numbers, and no library's global generator is
touched. Any distribution numpy's Generator offers is drawn this way (uniforms, Beta, standard
normals), one block of values at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# ids per counter block: making a generator costs about as much as drawing a few hundred values
BLOCK = 4096

# Streams: one per use of randomness, so that no two uses share numbers. Stream numbers stay below
# 2**32.
ORDER = 0  # sample order: one uniform key per sample, sorted
FLIP = 1  # horizontal flip: one uniform per sample
# RandomResizedCrop try t draws stream CROP + t (up to 30 tries): (area, log-ratio, y, x) per sample
CROP = 2
MIX_CHOICE = 32  # per pair: (mixed at all?, CutMix rather than MixUp?)
CUTMIX_CENTRE = 33  # per pair: CutMix box centre (y, x) as fractions of the view
MIXUP_LAMBDA = 34  # per pair: MixUp's Beta(alpha, alpha) lambda
CUTMIX_LAMBDA = 35  # per pair: CutMix's Beta(alpha, alpha) lambda
# RandAugment, per sample and layer: (which op, applied?, negated?, uniform level for mstd > 100)
AUG_OP = 40
AUG_LEVEL = 41  # RandAugment, per sample and layer: the standard normal of the magnitude noise
ERASE = 42  # random erasing, per sample: (erased at all?, how many boxes)
ERASE_VALUE = 43  # random erasing 'rand', per sample, box and channel: the standard normal fill
# random erasing try t draws stream ERASE_TRY + t (10 tries, up to 53): (area, log-ratio, y, x) per
# box
ERASE_TRY = 44


def _generator(seed: int, view: int, stream: int, block: int) -> np.random.Generator:
    """Philox with key (seed, view and stream in one 64-bit word) and its counter at the start of
    `block`.

    Drawing advances the counter's lowest 64-bit word only, so blocks never overlap.
    """
    key = np.array([seed % 2**64, (view % 2**32) << 32 | stream], dtype=np.uint64)
    counter = np.array([0, block, 0, 0], dtype=np.uint64)
    return np.random.Generator(np.random.Philox(counter=counter, key=key))


def _by_id(
    seed: int,
    view: int,
    stream: int,
    ids: np.ndarray,
    fill_block: Callable[[np.random.Generator, np.ndarray], object],
    per_id: tuple[int, ...],
) -> np.ndarray:
    """The values of `ids`, shape (n, *per_id): each touched block drawn whole, then indexed by id.

    `fill_block(generator, out)` writes one block's values into `out`, shape (BLOCK, *per_id).
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    block_of_id = ids // BLOCK
    touched = np.zeros(block_of_id.max() + 1 if len(ids) else 0, dtype=bool)
    # marks, not np.unique: ids in view order are a permutation, and sorting costs
    touched[block_of_id] = True
    table_row = np.cumsum(touched) - 1
    table = np.empty((int(touched.sum()) * BLOCK, *per_id))
    for row, block in enumerate(np.flatnonzero(touched)):
        fill_block(
            _generator(seed, view, stream, int(block)), table[row * BLOCK : (row + 1) * BLOCK]
        )
    return table[table_row[block_of_id] * BLOCK + ids % BLOCK]


def uniform(
    seed: int, view: int, stream: int, ids: np.ndarray, count: int | None = None
) -> np.ndarray:
    """Uniform [0, 1) floats for each id: shape (n,), or (n, count) when each id needs `count`
    values."""
    per_id = () if count is None else (count,)
    return _by_id(seed, view, stream, ids, lambda g, out: g.random(out=out), per_id)


def beta(seed: int, view: int, stream: int, ids: np.ndarray, alpha: float) -> np.ndarray:
    """Beta(alpha, alpha) for each id, shape (n,)."""
    return _by_id(
        seed, view, stream, ids, lambda g, out: np.copyto(out, g.beta(alpha, alpha, BLOCK)), ()
    )


def normal(
    seed: int, view: int, stream: int, ids: np.ndarray, count: int | None = None
) -> np.ndarray:
    """Standard normal floats for each id: shape (n,), or (n, count) when each id needs `count`
    values."""
    per_id = () if count is None else (count,)
    return _by_id(seed, view, stream, ids, lambda g, out: g.standard_normal(out=out), per_id)
