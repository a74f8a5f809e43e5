"""Counter-based draws: a value depends on (seed, view, stream, id) only, never on what is drawn with it."""

import numpy as np
import torch

from skd.plan import draws
from skd.plan.crops import TRIES

IMAGENET = 1_281_167


def test_drawing_at_once_equals_drawing_in_pieces():
    """Ids 0..N-1 drawn at once, in pieces of 700 and in shuffled order give the same values, id for id."""
    n = 10_000
    ids = np.arange(n)
    shuffled = np.random.default_rng(0).permutation(n)
    for name, draw in (
        ("uniform", lambda i: draws.uniform(3, 1, draws.FLIP, i)),
        ("4 uniforms", lambda i: draws.uniform(3, 1, draws.CROP, i, count=4)),
        ("beta", lambda i: draws.beta(3, 1, draws.MIXUP_LAMBDA, i, 0.4)),
    ):
        whole = draw(ids)
        pieces = np.concatenate([draw(ids[a : a + 700]) for a in range(0, n, 700)])
        assert np.array_equal(whole, pieces), f"{name}: {int((whole != pieces).sum())} values depend on the piece"
        by_shuffled = draw(shuffled)
        assert np.array_equal(whole[shuffled], by_shuffled), f"{name}: values depend on the order ids are drawn in"


def test_values_are_numpys_philox_keyed_by_seed_view_and_stream():
    """The scheme as a reader outside skd would rebuild it: block b of Philox(key, counter (0, b, 0, 0))."""
    seed, view, stream, sample = 7, 2, draws.FLIP, draws.BLOCK + 5
    key = np.array([seed, view << 32 | stream], dtype=np.uint64)
    counter = np.array([0, 1, 0, 0], dtype=np.uint64)
    expected = np.random.Generator(np.random.Philox(counter=counter, key=key)).random(draws.BLOCK)[5]
    got = draws.uniform(seed, view, stream, [sample])[0]
    assert got == expected, f"sample {sample}: {got!r}, Philox block 1 gives {expected!r}"


def test_seed_view_and_stream_each_change_the_values():
    ids = np.arange(1000)
    base = draws.uniform(1, 0, draws.ORDER, ids)
    for name, other in (
        ("seed", draws.uniform(2, 0, draws.ORDER, ids)),
        ("view", draws.uniform(1, 1, draws.ORDER, ids)),
        ("stream", draws.uniform(1, 0, draws.FLIP, ids)),
    ):
        shared = int((base == other).sum())
        assert shared == 0, f"another {name} repeats {shared} of 1000 values"
    assert 0 <= base.min() and base.max() < 1, f"uniforms span {base.min()}-{base.max()}, outside [0, 1)"
    assert abs(base.mean() - 0.5) < 0.05, f"mean uniform {base.mean():.3f}"


def test_streams_are_distinct_and_leave_room_for_every_crop_try():
    streams = {name: value for name, value in vars(draws).items() if name.isupper() and name != "BLOCK"}
    crop_tries = set(range(draws.CROP, draws.CROP + TRIES))
    others = [value for name, value in streams.items() if name != "CROP"]
    assert len(set(others)) == len(others), f"two uses share a stream: {streams}"
    assert not crop_tries & set(others), f"crop tries {sorted(crop_tries)} overlap another stream: {streams}"


def test_global_generators_are_neither_used_nor_moved():
    np.random.seed(5)
    torch.manual_seed(5)
    numpy_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state()
    first = draws.uniform(0, 0, draws.ORDER, np.arange(100))
    assert np.array_equal(numpy_state, np.random.get_state()[1]), "numpy's global generator moved"
    assert torch.equal(torch_state, torch.get_rng_state()), "torch's global generator moved"
    np.random.seed(99)
    torch.manual_seed(99)
    again = draws.uniform(0, 0, draws.ORDER, np.arange(100))
    assert np.array_equal(first, again), f"{int((first != again).sum())} of 100 values follow the global seeds"


def test_the_draws_of_a_whole_imagenet_view_are_those_of_each_sample_alone():
    """Order, flip and ten crop tries of four values over 1.28M samples, the draws of one full view (their time is
    measured by benchmarks/scale.py --draws): within [0, 1), and the last samples' values, drawn for them alone,
    equal theirs in the whole view."""
    ids = np.arange(IMAGENET)
    last = ids[-1000:]
    streams = [("order", draws.ORDER, None), ("flip", draws.FLIP, None)]
    streams += [(f"crop try {t}", draws.CROP + t, 4) for t in range(TRIES)]
    for name, stream, count in streams:
        whole = draws.uniform(0, 0, stream, ids, count=count)
        assert len(whole) == IMAGENET, f"{name}: {len(whole)} rows drawn for {IMAGENET} samples"
        assert 0 <= whole.min() and whole.max() < 1, f"{name}: values span {whole.min()}-{whole.max()}, not [0, 1)"
        alone = draws.uniform(0, 0, stream, last, count=count)
        differ = int((whole[-1000:] != alone).sum())
        assert differ == 0, f"{name}: {differ} values of the last 1000 samples differ when drawn for them alone"
