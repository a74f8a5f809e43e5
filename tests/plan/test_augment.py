"""Recorded strong augmentation: timm's RandAugment and RandomErasing distributions, drawn per sample id,
applied with torchvision.transforms.v2.functional exactly as a reader outside skd would rebuild them."""

import math
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from torchvision.transforms import InterpolationMode

from skd.errors import CacheError, OptionError
from skd.plan import mixing
from skd.plan.augment import AugmentParams, apply_ops, erase, plan_augment
from tests.jpegs import photo_like

SPEC = "rand-m9-n2-mstd0.5-inc1"
NEAREST = InterpolationMode.NEAREST
# timm's op name -> the recorded name and the recorded argument from timm's level_fn output
TIMM_RECORDED = {
    "PosterizeIncreasing": ("Posterize", lambda a: a),
    "SolarizeIncreasing": ("Solarize", lambda a: a),
    "ColorIncreasing": ("Color", lambda a: a - 1),
    "ContrastIncreasing": ("Contrast", lambda a: a - 1),
    "BrightnessIncreasing": ("Brightness", lambda a: a - 1),
    "SharpnessIncreasing": ("Sharpness", lambda a: a - 1),
    "TranslateXRel": ("TranslateX", lambda a: a),
    "TranslateYRel": ("TranslateY", lambda a: a),
}


def timm_rand_augment(spec: str, images: int, layers: int) -> tuple[np.ndarray, np.ndarray]:
    """timm's own RandAugment run on `images` dummy images, each layer wrapped to open a slot and each image op
    replaced by a recorder of its arguments: (recorded op names, recorded arguments), each (images, layers),
    "Identity" where timm skipped the layer (its p)."""
    transform = rand_augment_transform(spec, None)
    slots = []

    class Layer:
        def __init__(self, op):
            self.op = op

        def __call__(self, img):
            slots.append(["Identity", 0.0])
            return self.op(img)

    for op in transform.ops:
        recorded, convert = TIMM_RECORDED.get(op.name, (op.name, lambda a: a))
        op.aug_fn = lambda img, *args, _name=recorded, _convert=convert, **kw: slots[-1].__setitem__(
            slice(None), [_name, _convert(args[0]) if args else 0.0]
        )
    transform.ops = [Layer(op) for op in transform.ops]
    names = np.empty((images, layers), dtype=object)
    arguments = np.empty((images, layers))
    state, np_state = random.getstate(), np.random.get_state()
    random.seed(1)
    np.random.seed(1)
    try:
        for i in range(images):
            slots.clear()
            transform(None)
            names[i], arguments[i] = zip(*slots)
    finally:
        random.setstate(state)
        np.random.set_state(np_state)
    return names, arguments


def variance_bound(a: np.ndarray, b: np.ndarray) -> float:
    """Five standard errors of the difference of two sample variances (from each sample's fourth moment)."""
    errors = [(np.mean((x - x.mean()) ** 4) - np.var(x) ** 2) / max(len(x), 1) for x in (a, b)]
    return 5 * math.sqrt(max(sum(errors), 0.0)) + 1e-12


def clipped_normal_moments(mean: float, std: float, low: float, high: float) -> tuple[float, float]:
    """Mean and std of clip(N(mean, std), low, high) by numerical integration: timm's noisy magnitude."""
    x = np.linspace(mean - 12 * std, mean + 12 * std, 400_001)
    density = np.exp(-0.5 * ((x - mean) / std) ** 2)
    density /= density.sum()
    clipped = np.clip(x, low, high)
    first = float((clipped * density).sum())
    return first, math.sqrt(float((clipped**2 * density).sum()) - first**2)


def test_op_statistics_match_timms_rand_augment():
    """20,000 images of rand-m9-n2-mstd0.5-inc1: each of timm's 15 ops is chosen for 1/15 of the layers and
    applied to half of those (timm's p=0.5); the level behind Rotate, Shear and Translate has the mean and std
    of gauss(9, 0.5) clipped to [0, 10]; every op's frequency and argument mean/std match timm's own
    RandAugment run with recorders in place of its image ops."""
    n, layers = 20_000, 2
    params = AugmentParams(aa=SPEC)
    record = plan_augment(5, 0, np.arange(n), params)
    stored = (record.op.shape, record.op.dtype, record.magnitude.dtype)
    assert stored == ((n, layers), np.uint8, np.float32), f"ops {stored[:2]}, magnitudes {stored[2]}"
    names = np.array(params.ops, dtype=object)[record.op]
    slots = n * layers
    applied = float((record.op > 0).mean())
    tolerance = 5 * math.sqrt(0.25 / slots)
    assert abs(applied - 0.5) < tolerance, f"applied share {applied:.4f}, timm's p 0.5 (tolerance {tolerance:.4f})"
    expected, sigma = slots * 0.5 / 15, math.sqrt(slots * (0.5 / 15) * (1 - 0.5 / 15))
    for name in params.ops[1:]:
        count = int((names == name).sum())
        assert abs(count - expected) < 5 * sigma, f"{name}: {count} of {slots} layers, expected {expected:.0f}"

    level_mean, level_std = clipped_normal_moments(9, 0.5, 0, 10)
    level_scale = {"Rotate": 30, "ShearX": 0.3, "ShearY": 0.3, "TranslateX": 0.45, "TranslateY": 0.45}
    levels = np.concatenate([np.abs(record.magnitude[names == k]) / s * 10 for k, s in level_scale.items()])
    assert abs(levels.mean() - level_mean) < 5 * level_std / math.sqrt(len(levels)), (
        f"level mean {levels.mean():.4f} over {len(levels)} signed-op layers, clipped gauss(9, 0.5) {level_mean:.4f}"
    )
    assert abs(levels.std() / level_std - 1) < 0.05, f"level std {levels.std():.4f}, expected {level_std:.4f}"
    negative = float((record.magnitude[names == "Rotate"] < 0).mean())
    assert abs(negative - 0.5) < 0.05, f"Rotate negated in {negative:.3f} of its layers, timm's 0.5"

    timm_names, timm_arguments = timm_rand_augment(SPEC, n, layers)
    for name in params.ops:
        ours, theirs = record.magnitude[names == name], timm_arguments[timm_names == name]
        assert abs(len(ours) - len(theirs)) < 5 * math.sqrt(len(ours) + len(theirs)), (
            f"{name}: {len(ours)} layers here, {len(theirs)} in timm's RandAugment"
        )
        bound = 5 * math.sqrt(np.var(ours) / len(ours) + np.var(theirs) / len(theirs)) + 1e-6
        assert abs(ours.mean() - theirs.mean()) <= bound, (
            f"{name}: argument mean {ours.mean():.4f} here, {theirs.mean():.4f} in timm (tolerance {bound:.4f})"
        )
        assert abs(np.var(ours) - np.var(theirs)) <= variance_bound(ours, theirs), (
            f"{name}: argument std {ours.std():.4f} here, {theirs.std():.4f} in timm"
        )


def test_erasing_statistics_match_timms_random_erasing():
    """20,000 images with --reprob 0.25: a quarter erased, the log aspect ratio symmetric about 0, and the erased
    area and log aspect ratio match timm's RandomErasing erasing ones-images at 224 (its boxes: the zeroed pixels)."""
    n, side, reprob = 20_000, 224, 0.25
    record = plan_augment(2, 0, np.arange(n), AugmentParams(reprob=reprob))
    erased = record.erase_box.any(axis=(1, 2))
    share = float(erased.mean())
    assert abs(share - reprob) < 5 * math.sqrt(reprob * (1 - reprob) / n), f"erased share {share:.4f}, reprob 0.25"
    y0, x0, y1, x1 = mixing.box_pixels(record.erase_box[erased, 0], side).T
    ours_area, ours_ratio = (y1 - y0) * (x1 - x0) / side**2, np.log((y1 - y0) / (x1 - x0))

    state = torch.get_rng_state(), random.getstate()
    random.seed(3)
    try:
        timm = RandomErasing(probability=1.0, mode="const", device="cpu")
        areas, ratios = [], []
        for _ in range(3000):
            image = timm(torch.ones(3, side, side))
            rows, cols = (image[0] == 0).any(dim=1).sum().item(), (image[0] == 0).any(dim=0).sum().item()
            if rows:
                areas.append(rows * cols / side**2)
                ratios.append(math.log(rows / cols))
    finally:
        torch.set_rng_state(state[0])
        random.setstate(state[1])
    for what, ours, theirs in (("area", ours_area, areas), ("log aspect", ours_ratio, ratios)):
        bound = 5 * math.sqrt(np.var(ours) / len(ours) + np.var(theirs) / len(theirs))
        assert abs(np.mean(ours) - np.mean(theirs)) < bound, (
            f"erased {what}: mean {np.mean(ours):.4f} here, {np.mean(theirs):.4f} in timm (tolerance {bound:.4f})"
        )
    symmetric = 5 * ours_ratio.std() / math.sqrt(len(ours_ratio))
    assert abs(ours_ratio.mean()) < symmetric, f"log aspect mean {ours_ratio.mean():.4f}, timm's range is symmetric"
    assert 0.02 - 0.01 <= ours_area.min() and ours_area.max() <= 1 / 3 + 0.01, (
        f"erased areas {ours_area.min():.4f}..{ours_area.max():.4f}, timm's range 0.02..1/3"
    )


def test_a_samples_record_depends_on_seed_view_and_id_only():
    """Ids planned all at once, in two halves and shuffled give the same record id for id; another view or
    seed gives different ops and boxes; --recount 3 gives 1 to 3 boxes with N(0, 1) fills for --remode rand."""
    params = AugmentParams(aa=SPEC, reprob=0.5, remode="rand", recount=3)
    n = 10_000  # more than two counter blocks
    ids = np.arange(n)
    whole = plan_augment(7, 1, ids, params)
    halves = [plan_augment(7, 1, ids[: n // 2], params), plan_augment(7, 1, ids[n // 2 :], params)]
    shuffled = np.random.default_rng(0).permutation(n)
    by_shuffled = plan_augment(7, 1, shuffled, params)
    for field in ("op", "magnitude", "erase_box", "erase_value"):
        value = getattr(whole, field)
        joined = np.concatenate([getattr(h, field) for h in halves])
        assert np.array_equal(value, joined), f"{field}: {int((value != joined).sum())} values depend on the batch"
        assert np.array_equal(value[shuffled], getattr(by_shuffled, field)), f"{field} depends on the id order"
    for name, other in (("view 2", plan_augment(7, 2, ids, params)), ("seed 8", plan_augment(8, 1, ids, params))):
        same_ops = float((other.op == whole.op).all(axis=1).mean())
        same_boxes = float((other.erase_box == whole.erase_box).all(axis=(1, 2)).mean())
        # by chance: a layer agrees in 0.27 (both skipped, or the same op), a row in 0.07; boxes in 0.25 (unerased)
        assert same_ops < 0.15 and same_boxes < 0.3, (
            f"{name}: {same_ops:.0%} of ops rows and {same_boxes:.0%} of box rows equal to seed 7 view 1's"
        )
    assert set(np.unique(whole.erase_box.any(axis=2).sum(axis=1))) == {0, 1, 2, 3}, "counts 1..3 as --recount 3"
    fills = whole.erase_value[whole.erase_box.any(axis=2)]
    assert abs(fills.mean()) < 0.05 and abs(fills.std() - 1) < 0.05, (
        f"--remode rand fills: mean {fills.mean():.3f}, std {fills.std():.3f} over {fills.size}, timm's N(0, 1)"
    )
    assert not whole.erase_value[~whole.erase_box.any(axis=2)].any(), "a box never placed has a non-zero fill"


@pytest.fixture(scope="module")
def image():
    return torch.from_numpy(photo_like(96, 96, 4)).permute(2, 0, 1).contiguous()


def affine(im, **kwargs):
    """The written-out v2 affine of torchvision's RandAugment: nearest, fill 0, no rotation or scaling."""
    kwargs = {"angle": 0.0, "translate": [0, 0], "scale": 1.0, "shear": [0.0, 0.0], **kwargs}
    return F.affine(im, interpolation=NEAREST, fill=0, **kwargs)


# (op, recorded magnitude, the torchvision call from the contract given the float32 magnitude m)
OP_CASES = [
    ("ShearX", -0.27, lambda im, m: affine(im, shear=[math.degrees(math.atan(m)), 0.0], center=[0, 0])),
    ("ShearY", 0.21, lambda im, m: affine(im, shear=[0.0, math.degrees(math.atan(m))], center=[0, 0])),
    ("TranslateX", 0.405, lambda im, m: affine(im, translate=[39, 0])),  # int(round(0.405 * 96))
    ("TranslateY", -0.3, lambda im, m: affine(im, translate=[0, -29])),  # int(round(-0.3 * 96))
    ("Rotate", -26.5, lambda im, m: F.rotate(im, m, interpolation=NEAREST, fill=0)),
    ("Color", -0.81, lambda im, m: F.adjust_saturation(im, 1 + m)),
    ("Contrast", 0.6, lambda im, m: F.adjust_contrast(im, 1 + m)),
    ("Posterize", 1, lambda im, m: F.posterize(im, 1)),
    ("Solarize", 26, lambda im, m: F.solarize(im, 26)),
    ("SolarizeAdd", 99, lambda im, m: torch.where(im < 128, (im.int() + 99).clamp(max=255), im.int()).byte()),
]


@pytest.mark.parametrize("name, magnitude, expected", OP_CASES, ids=[case[0] for case in OP_CASES])
def test_apply_ops_equals_torchvision_written_out(image, name, magnitude, expected):
    """A recorded op applied at a 96-pixel side equals the torchvision.transforms.v2.functional call a reader
    would write from the contract (translate: int(round(m * 96)) pixels), and changes the image."""
    params = AugmentParams(aa=SPEC)
    stored = np.float32(magnitude)
    got = apply_ops(image, [params.ops.index(name)], [stored], params.ops)
    want = expected(image, float(stored))
    assert got.dtype == torch.uint8 and got.shape == image.shape, f"{name}: {got.dtype} {tuple(got.shape)}"
    differs = float((got != want).float().mean())
    assert differs == 0, f"{name} {magnitude}: {differs:.2%} of values differ from the written-out torchvision call"
    changed = float((got != image).float().mean())
    assert changed > 0.05, f"{name} {magnitude} changed only {changed:.2%} of the values"


def test_shear_is_about_the_top_left_corner_and_identity_changes_nothing(image):
    """ShearX keeps the top row and ShearY the left column (shear about the top-left corner); Identity (index 0)
    and a layer sequence of Identities leave the image bit for bit; two layers apply in order."""
    ops = AugmentParams(aa=SPEC).ops
    sheared_x = apply_ops(image, [ops.index("ShearX")], [0.3], ops)
    sheared_y = apply_ops(image, [ops.index("ShearY")], [-0.3], ops)
    assert torch.equal(sheared_x[:, 0], image[:, 0]), "ShearX moved the top row"
    assert torch.equal(sheared_y[:, :, 0], image[:, :, 0]), "ShearY moved the left column"
    assert torch.equal(apply_ops(image, [0, 0], [0.0, 0.0], ops), image), "Identity changed the image"
    both = apply_ops(image, [ops.index("Rotate"), ops.index("Invert")], [10.0, 0.0], ops)
    assert torch.equal(both, F.invert(F.rotate(image, 10.0, interpolation=NEAREST, fill=0))), "layers out of order"


def test_erase_fills_exactly_the_boxes_pixels():
    """Each box's pixels floor(f * S + 0.5) (skd.plan.mixing.box_pixels) take its per-channel value, later boxes
    over earlier ones; every other pixel, an all-zero box's row and the input tensor stay as they were."""
    size, generator = 37, torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, size, size, generator=generator)
    before = images.clone()
    boxes = torch.tensor(
        [
            [[0.1, 0.2, 0.5, 0.9], [0.0, 0.0, 0.0, 0.0]],
            [[0.0, 0.0, 1.0, 0.3], [0.2, 0.1, 0.6, 0.5]],  # overlapping: the second wins where they meet
            [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
            [[0.33, 0.67, 0.999, 0.7], [0.0, 0.0, 0.0, 0.0]],
        ]
    )
    values = torch.randn(4, 2, 3, generator=generator)
    got = erase(images, boxes, values)
    want = images.clone()
    for b in range(4):
        for r in range(2):
            y0, x0, y1, x1 = mixing.box_pixels(boxes[b, r], size).tolist()
            want[b, :, y0:y1, x0:x1] = values[b, r][:, None, None]
    changed = int((got != images).any(dim=1).sum())
    assert torch.equal(got, want), f"{int((got != want).sum())} values differ from filling the boxes by hand"
    assert torch.equal(images, before), "erase changed its input"
    assert changed == int((want != images).any(dim=1).sum()) > 0, f"{changed} pixels erased"


def test_record_round_trips_through_its_attributes():
    """to_dict/from_dict keep the options, and the dict names the ops a reader needs for the indices."""
    params = AugmentParams(aa=SPEC, reprob=0.25, remode="rand", recount=2)
    d = params.to_dict()
    assert AugmentParams.from_dict(d) == params and d["ops"][0] == "Identity", f"round trip: {d}"
    assert params.enabled and params.layers == 2 and not AugmentParams().enabled, "enabled/layers"
    with pytest.raises(CacheError, match="differ"):
        AugmentParams.from_dict({**d, "ops": d["ops"][:-1]})


@pytest.mark.parametrize(
    "params, option",
    [
        (AugmentParams(aa="rand-x"), "--aa"),
        (AugmentParams(aa="augmix-m3"), "--aa"),
        (AugmentParams(aa="rand-m9.5"), "--aa"),
        (AugmentParams(reprob=2.0), "--reprob"),
        (AugmentParams(remode="pixel"), "--remode"),
        (AugmentParams(remode="noise"), "--remode"),
        (AugmentParams(recount=0), "--recount"),
    ],
)
def test_bad_options_are_one_line_naming_the_option(params, option):
    """Each unusable option is an OptionError whose one line starts with the option."""
    with pytest.raises(OptionError) as caught:
        plan_augment(0, 0, np.arange(4), params)
    message = str(caught.value)
    assert message.startswith(option) and "\n" not in message, f"{params}: {message!r}"
    if params.remode == "pixel":
        assert "size" in message, f"--remode pixel should say why: {message!r}"


def test_trivial_augment_draws_torchvisions_ops_and_magnitude_bins():
    """--aa trivial: one op per image, uniform over TrivialAugmentWide's 14, at one of its 31 bins (signed ops
    either sign); Translate's pixels of a 224-px view as a fraction of the side."""
    from torchvision.transforms import TrivialAugmentWide

    params = AugmentParams(aa="trivial")
    record = plan_augment(0, 0, np.arange(28_000), params)
    space = TrivialAugmentWide()._augmentation_space(31)
    assert params.layers == 1 and record.op.shape == (28_000, 1), f"layers {params.layers}, ops {record.op.shape}"
    counts = {params.ops[i]: int(c) for i, c in zip(*np.unique(record.op, return_counts=True))}
    assert set(counts) == set(space), f"ops drawn {sorted(counts)}, torchvision's {sorted(space)}"
    assert max(abs(c - 2000) for c in counts.values()) < 200, f"not uniform over 14 ops: {counts}"
    for name, (bins, signed) in space.items():
        drawn = record.magnitude[record.op[:, 0] == params.ops.index(name), 0].astype(np.float64)
        if name.startswith("Translate"):
            drawn = drawn * 224
        allowed = np.atleast_1d(bins.numpy()).astype(np.float64)
        gap = np.abs(np.abs(drawn)[:, None] - np.abs(allowed)[None, :]).min(axis=1).max()
        assert gap < 1e-3, f"{name}: a magnitude {gap:.3g} from torchvision's bins"
        assert (drawn < 0).any() == (signed and allowed.max() > 0), f"{name}: signs {np.unique(np.sign(drawn))}"
