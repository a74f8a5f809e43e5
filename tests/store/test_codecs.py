"""Logit codecs: exactness of fp32, error bounds of fp16, int8 and compact, KL bounds after the layer norm."""

import numpy as np
import pytest
import torch

from skd.loss import skd_kl
from skd.store.codecs import Encoded, get_codec


def teacher_like(n=64, c=1000, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 2.5, (n, c)) + rng.normal(0, 1, (n, 1))).astype(np.float32)


def test_fp32_is_exact():
    x = teacher_like()
    codec = get_codec("fp32")
    assert np.array_equal(codec.decode(codec.encode(x)), x), "fp32 codec changed values"


def test_int8_error_within_one_quantisation_step():
    x = teacher_like()
    codec = get_codec("int8")
    enc = codec.encode(x)
    assert enc.logits.dtype == np.uint8 and enc.scale.dtype == np.float32, (
        f"int8 stores {enc.logits.dtype} levels and {enc.scale.dtype} scales"
    )
    err = np.abs(codec.decode(enc) - x)
    step = (x.max(1) - x.min(1)) / 255
    worst = (err / step[:, None]).max()
    assert worst <= 0.5 + 1e-3, f"int8 error reaches {worst:.3f} steps (bound: half a step)"
    assert np.allclose(codec.decode(enc).min(1), x.min(1), atol=1e-5), "row minimum not preserved"


def test_int8_constant_row():
    codec = get_codec("int8")
    x = np.full((2, 10), 3.5, np.float32)
    assert np.array_equal(codec.decode(codec.encode(x)), x), "constant rows must decode exactly"


def test_fp16_relative_error():
    x = teacher_like()
    codec = get_codec("fp16")
    err = np.abs(codec.decode(codec.encode(x)) - x).max()
    assert err < 1e-2, f"fp16 max error {err}"


@pytest.mark.parametrize("name", ["fp32", "fp16", "int8", "compact"])
def test_torch_decode_matches_numpy(name):
    codec = get_codec(name)
    enc = codec.encode(teacher_like(8, 50))
    t = codec.decode_torch(*(None if a is None else torch.from_numpy(a) for a in enc))
    assert t.dtype == torch.float32 and t.shape == (8, 50), f"{name}: torch decodes {t.dtype} {tuple(t.shape)}"
    # one float32 rounding apart at most (a fused multiply-add may round once where numpy rounds twice)
    assert np.allclose(t.numpy(), codec.decode(enc), rtol=1e-6, atol=1e-6), f"{name}: torch and numpy decodes differ"


def test_unknown_codec_names_choices():
    with pytest.raises(ValueError, match="fp32, fp16, int8, compact"):
        get_codec("int4")
    scale = Encoded(np.zeros(1)).scale
    assert scale is None, f"an Encoded of logits alone has scale {scale}"


def kl_after_layer_norm(exact: np.ndarray, decoded: np.ndarray) -> np.ndarray:
    """Per-row KL between the SKD targets (T 4, m 2) of the exact and the decoded rows, in float64: the loss's own
    layer-normalised KL (skd.loss.skd_kl)."""
    kl = skd_kl(
        torch.from_numpy(exact), torch.from_numpy(decoded), multiplier=2.0, temperature=4.0, dtype=torch.float64
    )
    return kl.numpy()


def peaked_teacher_like(n=256, c=1000, seed=1):
    """Rows with one confident class (up to 12 std above the bulk): where a range-based step is coarse."""
    x = teacher_like(n, c, seed)
    rng = np.random.default_rng(seed)
    x[np.arange(n), rng.integers(0, c, n)] += rng.uniform(0, 30, n).astype(np.float32)
    return x


def test_compact_error_within_half_a_step_of_a_tenth_of_the_std():
    x = peaked_teacher_like()
    codec = get_codec("compact")
    enc = codec.encode(x)
    dtypes = (enc.logits.dtype, enc.scale.dtype, enc.offset.dtype)
    assert dtypes == (np.uint8, np.float32, np.float32), f"compact stores levels, scale, offset as {dtypes}"
    step = np.maximum(0.13 * x.std(1), (x.max(1) - x.min(1)) / 255)
    assert np.allclose(enc.scale, step, rtol=1e-5), "compact's step is 0.13 std unless the range needs more"
    err = np.abs(codec.decode(enc) - x)
    assert (err <= 0.5 * step[:, None] * (1 + 1e-4) + 1e-6).all(), "compact error above half a step"


def test_compact_kl_bound_and_fewer_levels_than_int8():
    x = peaked_teacher_like()
    compact, int8 = get_codec("compact"), get_codec("int8")
    kl = kl_after_layer_norm(x, compact.decode(compact.encode(x)))
    # uniform rounding of step k*std: KL ~= (k m / T)^2 / 24 = 1.76e-4 for every row
    assert kl.mean() <= 2e-4 and kl.max() <= 3e-4, f"compact KL mean {kl.mean():.3g}, max {kl.max():.3g}"
    assert kl_after_layer_norm(x, int8.decode(int8.encode(x))).mean() <= 2e-5, "int8 KL above 2e-5"
    levels = compact.encode(x).logits.max(1)
    assert np.median(levels) < 128, "compact should use about half the levels (about a bit less entropy)"


def test_compact_constant_and_tiny_rows():
    codec = get_codec("compact")
    x = np.stack([np.full(10, -2.25, np.float32), np.linspace(0, 1e-6, 10, dtype=np.float32)])
    dec = codec.decode(codec.encode(x))
    assert np.array_equal(dec[0], x[0]), "constant rows must decode exactly"
    tiny = float(np.abs(dec[1] - x[1]).max())
    assert tiny <= 1e-7, f"a row spanning 1e-6 decodes up to {tiny:.2e} off"


def test_compact_decode_is_the_affine_stored_form():
    """Stats and the GPU path read compact exactly like int8: logits * scale + offset."""
    codec = get_codec("compact")
    enc = codec.encode(teacher_like(4, 30))
    assert codec.affine and codec.dtype == "uint8", f"compact: affine {codec.affine}, dtype {codec.dtype}"
    manual = enc.logits.astype(np.float32) * enc.scale[:, None] + enc.offset[:, None]
    apart = float(np.abs(codec.decode(enc) - manual).max())
    assert np.allclose(codec.decode(enc), manual, rtol=1e-6, atol=1e-6), f"decode is {apart:.2e} from the affine form"


def test_topk_rows_rebuild_to_the_top_k_in_fp16_and_the_rest_to_its_mean():
    x = teacher_like(32, 1000)
    codec = get_codec("topk:10", classes=1000)
    enc = codec.encode(x)
    stored = (enc.logits.shape, enc.logits.dtype, enc.index.dtype)
    assert stored == ((32, 10), np.float16, np.uint16), f"topk:10 stores logits {stored[:2]}, classes {stored[2]}"
    decoded = codec.decode(enc)
    best = np.argsort(-x, axis=1, kind="stable")[:, :10]
    kept = np.take_along_axis(decoded, best, 1)
    want = np.take_along_axis(x, best, 1).astype(np.float16).astype(np.float32)
    assert np.array_equal(kept, want), f"top-10 decode off by {np.abs(kept - want).max():.3g} from the fp16 values"
    rest = np.ones_like(x, bool)
    np.put_along_axis(rest, best, False, 1)
    means = np.array([x[i][rest[i]].mean() for i in range(32)], np.float32)
    gap = np.abs(np.where(rest, decoded - means[:, None], 0)).max()
    assert gap < 1e-5, f"the other 990 classes decode {gap:.3g} away from their mean"
    torch_decoded = codec.decode_torch(*(None if a is None else torch.from_numpy(a) for a in enc))
    assert torch.equal(torch_decoded, torch.from_numpy(decoded)), "torch and numpy top-k decodes differ"


def test_topk_names_are_checked_and_k_is_capped_by_the_classes():
    for bad in ("topk:0", "topk:x", "topk:70000"):
        with pytest.raises(ValueError, match="topk:K keeps the K largest"):
            get_codec(bad)
    codec = get_codec("topk:100", classes=7)
    x = teacher_like(4, 7)
    assert np.allclose(codec.decode(codec.encode(x)), x, atol=1e-2), "top-100 of 7 classes is every class"
