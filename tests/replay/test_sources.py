"""The recorded views a run replays (skd/replay/sources.py): a cache's recorded source and an online source planned as
the build plans give the same steps, and a cache's views are decoded with the loader it was built with."""

import numpy as np
import pytest
from conftest import run_training, small_train_config


def max_weight_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_cached_training_equals_online_training(fp32_cache, image_root, teacher_file, tmp_path):
    """The product's central claim: same views, same per-step losses, same weights."""
    cached_losses, cached_w, _ = run_training(small_train_config(tmp_path / "cached", cache=fp32_cache))
    online_losses, online_w, _ = run_training(
        small_train_config(tmp_path / "online", teacher="resnet18", weights=str(teacher_file), data=image_root)
    )
    assert cached_losses.shape == (6, 3), f"{cached_losses.shape[0]} steps logged, expected 6"
    loss_diff = float(np.abs(cached_losses - online_losses).max())
    assert loss_diff < 1e-5, f"per-step losses differ by up to {loss_diff:.2e} (cached vs online)"
    w_diff = max_weight_diff(cached_w, online_w)
    assert w_diff < 1e-5, f"weights after 6 steps differ by up to {w_diff:.2e}"
    assert cached_losses[:, 1].min() > 0, "KD term was zero: no teacher signal reached the loss"


def test_training_decodes_with_the_loader_the_cache_was_built_with(fp32_cache, tmp_path):
    """The student sees the teacher's very pixels: with no --loader, the cache's own (torchvision here) is used."""
    default_losses, _, _ = run_training(small_train_config(tmp_path / "default", cache=fp32_cache, loader=None))
    recorded_losses, _, _ = run_training(
        small_train_config(tmp_path / "recorded", cache=fp32_cache, loader="torchvision")
    )
    from skd.errors import SkdWarning

    with pytest.warns(SkdWarning, match="built with torchvision"):
        other_losses, _, _ = run_training(small_train_config(tmp_path / "other", cache=fp32_cache, loader="dali"))
    same = float(np.abs(default_losses - recorded_losses).max())
    other = float(np.abs(other_losses - recorded_losses).max())
    assert same == 0.0, f"default loader's losses differ from the cache's loader's by {same:.2e}"
    assert other > 0.0, "dali and torchvision gave identical losses: this test cannot tell the loaders apart"
