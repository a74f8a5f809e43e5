"""The recorded augmentation plan: windows, flips and order are valid, deterministic and chunk-independent."""

import math

import numpy as np
import torch
import torchvision.transforms as T

from skd.plan.crops import CropParams, center_boxes, crop_windows, flips, plan_view, sample_order


def sizes_for(n, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(20, 600, n), rng.integers(20, 600, n)], axis=1)


def test_windows_inside_image_with_bounded_area_and_ratio():
    sizes = sizes_for(5000)
    plan = plan_view(7, 0, sizes)
    h, w = sizes[plan.order, 0], sizes[plan.order, 1]
    y, x, ch, cw = plan.box.T
    assert (y >= 0).all() and (x >= 0).all(), "window starts outside the image"
    assert (y + ch <= h).all() and (x + cw <= w).all(), "window ends outside the image"
    assert (ch > 0).all() and (cw > 0).all(), "empty window"
    area = ch * cw / (h * w)
    ratio = cw / ch
    # Rounding to whole pixels moves area and ratio a little; small images move most.
    assert area.max() <= 1.0, f"area fraction up to {area.max():.3f}"
    big = np.minimum(h, w) >= 200
    assert area[big].min() >= 0.08 * 0.97, f"area fraction down to {area[big].min():.4f} (bound 0.08)"
    inside = ratio[big]
    fallback = area[big] > 0.999
    assert ((inside >= 0.75 * 0.97) & (inside <= 4 / 3 * 1.03) | fallback).all(), (
        f"aspect ratio range {inside.min():.3f}-{inside.max():.3f} (bounds 0.75-1.333)"
    )


def test_distribution_matches_torchvision_random_resized_crop():
    """Mean area fraction and aspect agree with torchvision's own RandomResizedCrop.get_params."""
    n, h, w = 4000, 375, 500
    ours = crop_windows(3, 0, np.arange(n), np.tile([h, w], (n, 1)))
    torch.manual_seed(0)
    img = torch.zeros(3, h, w)
    tv = np.array([T.RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(n)])
    for name, a, b in (
        ("area", ours[:, 2] * ours[:, 3] / (h * w), tv[:, 2] * tv[:, 3] / (h * w)),
        ("log-aspect", np.log(ours[:, 3] / ours[:, 2]), np.log(tv[:, 3] / tv[:, 2])),
        ("y centre", ours[:, 0] + ours[:, 2] / 2, tv[:, 0] + tv[:, 2] / 2),
    ):
        se = math.sqrt(a.var() / n + b.var() / n)
        assert abs(a.mean() - b.mean()) < 4 * se, f"{name}: ours {a.mean():.4f}, torchvision {b.mean():.4f}"


def test_centre_fallback_for_extreme_aspect():
    """A 10x1000 strip never fits a 3/4-4/3 window of >= 8% area: torchvision's fallback applies."""
    box = crop_windows(0, 0, np.arange(4), np.tile([10, 1000], (4, 1)))
    assert (box == [0, 493, 10, 13]).all(), f"fallback windows {box.tolist()}"


def test_deterministic_and_differs_across_views():
    sizes = sizes_for(1000)
    a, b = plan_view(1, 0, sizes), plan_view(1, 0, sizes)
    differ = [name for name in ("box", "order", "flip") if not np.array_equal(getattr(a, name), getattr(b, name))]
    assert not differ, f"planning view 0 of seed 1 twice gives other {differ}"
    c = plan_view(1, 1, sizes)
    d = plan_view(2, 0, sizes)
    same_order = (a.order == c.order).mean()
    assert same_order < 0.01, f"views 0 and 1 share {same_order:.1%} of positions"
    assert (a.order != d.order).any(), "seed does not change the plan"
    assert sorted(a.order.tolist()) == list(range(1000)), "order is not a permutation"
    flip_rate = a.flip.mean()
    assert 0.45 < flip_rate < 0.55, f"flip rate {flip_rate:.3f}"


def test_independent_of_chunking_and_global_rng():
    sizes = sizes_for(3000)
    ids = np.arange(3000)
    whole = crop_windows(5, 2, ids, sizes)
    torch.manual_seed(123)
    np.random.seed(123)
    pieces = np.concatenate([crop_windows(5, 2, ids[a : a + 700], sizes[a : a + 700]) for a in range(0, 3000, 700)])
    assert np.array_equal(whole, pieces), "windows depend on how samples are chunked"
    assert np.array_equal(flips(5, 2, ids[1000:]), flips(5, 2, ids)[1000:]), "flips depend on chunking"


def test_a_samples_window_and_flip_do_not_depend_on_its_position():
    """plan_view's window and flip of a sample equal those drawn for that sample alone."""
    sizes = sizes_for(2000)
    plan = plan_view(4, 3, sizes)
    positions = [0, 1, 999, 1999]
    alone = [crop_windows(4, 3, plan.order[[p]], sizes[plan.order[[p]]])[0].tolist() for p in positions]
    assert plan.box[positions].tolist() == alone, f"windows {plan.box[positions].tolist()}, alone {alone}"
    flip_alone = [int(flips(4, 3, plan.order[[p]])[0]) for p in positions]
    assert plan.flip[positions].tolist() == flip_alone, f"flips {plan.flip[positions].tolist()}, alone {flip_alone}"


def test_plans_an_imagenet_scale_view():
    """One view of 1.28M samples (its time is measured by benchmarks/scale.py --draws): every sample once, every
    window inside its image."""
    n = 1_281_167
    sizes = sizes_for(n)
    plan = plan_view(0, 0, sizes)
    assert len(plan.order) == n, f"{len(plan.order)} positions planned for {n} samples"
    missing = n - len(np.unique(plan.order))
    assert missing == 0, f"{missing} of {n} samples are not in the view's order"
    y, x, h, w = plan.box.T
    height, width = sizes[plan.order].T
    outside = int(((y < 0) | (x < 0) | (h <= 0) | (w <= 0) | (y + h > height) | (x + w > width)).sum())
    assert outside == 0, f"{outside} of {n} windows are empty or reach outside their image"


def test_center_boxes_keep_224_of_256():
    box = center_boxes(np.array([[256, 512], [500, 375]]))
    assert box.tolist() == [[16, 144, 224, 224], [86, 23, 328, 328]], f"val windows {box.tolist()}"
    first, again = sample_order(0, 0, 5).tolist(), sample_order(0, 0, 5).tolist()
    assert first == again, f"the order of 5 samples is {first}, then {again}"
    again_params = CropParams.from_dict(CropParams().to_dict())
    assert again_params == CropParams(), f"CropParams round trip gave {again_params}"
