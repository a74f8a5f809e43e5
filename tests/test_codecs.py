"""Logit codecs: exactness of fp32, error bounds of fp16 and int8."""
import numpy as np
import pytest
import torch

from skd.codecs import Encoded, get_codec


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
    assert enc.logits.dtype == np.uint8 and enc.scale.dtype == np.float32
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


@pytest.mark.parametrize("name", ["fp32", "fp16", "int8"])
def test_torch_decode_matches_numpy(name):
    codec = get_codec(name)
    enc = codec.encode(teacher_like(8, 50))
    t = codec.decode_torch(*(None if a is None else torch.from_numpy(a) for a in enc))
    assert np.allclose(t.numpy(), codec.decode(enc), atol=1e-6), f"{name}: torch and numpy decodes differ"


def test_unknown_codec_names_choices():
    with pytest.raises(ValueError, match="fp32, fp16, int8"):
        get_codec("int4")
    assert Encoded(np.zeros(1)).scale is None
