"""Consistent mixing: planned lambdas and boxes follow timm's MixUp/CutMix, and applying them is batch-independent."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import build_args, small_train_config, train_args
from handmade import load_view

from skd.errors import OptionError, SkdError
from skd.plan.mixing import MixParams, box_pixels, mix_batch, plan_mixing, soft_labels

BOTH = MixParams(mixup_alpha=0.8, cutmix_alpha=1.0)


def cutmix_rows(box):
    return (box != 0).any(axis=1)


@pytest.mark.parametrize("alpha", [0.2, 0.8])
def test_mixup_lambda_follows_beta(alpha):
    """Over 10,000 pairs the lambdas have Beta(a, a)'s mean 1/2 and variance 1/(4(2a + 1)), within 5 standard errors."""
    lam, box = plan_mixing(11, 0, 20_000, MixParams(mixup_alpha=alpha), 224)
    pairs = lam[0::2].astype(np.float64)
    n = len(pairs)
    var = 1 / (4 * (2 * alpha + 1))
    kurtosis = 3 - 6 / (2 * alpha + 3)  # of a symmetric Beta(a, a)
    mean_err = 5 * math.sqrt(var / n)
    var_err = 5 * var * math.sqrt((kurtosis - 1) / n)
    assert not box.any(), f"{int(cutmix_rows(box).sum())} MixUp-only rows carry a CutMix box"
    assert 0 <= pairs.min() and pairs.max() <= 1, f"lambda range {pairs.min()}-{pairs.max()} leaves [0, 1]"
    assert abs(pairs.mean() - 0.5) < mean_err, f"mean lambda {pairs.mean():.4f}, Beta mean 0.5 +- {mean_err:.4f}"
    assert abs(pairs.var() - var) < var_err, f"lambda variance {pairs.var():.5f}, Beta {var:.5f} +- {var_err:.5f}"


@pytest.mark.parametrize("size", [224, 37])
def test_cutmix_lambda_is_the_pasted_pixel_area(size):
    """At the plan's size, 1 - lambda is the pasted pixel area over size^2, up to float32 rounding of lambda."""
    lam, box = plan_mixing(5, 2, 4000, MixParams(cutmix_alpha=1.0), size)
    cut = cutmix_rows(box)
    y0, x0, y1, x1 = box_pixels(box, size).T
    area = (y1 - y0) * (x1 - x0) / size**2
    error = np.abs((1.0 - area) - lam.astype(np.float64)) / (np.spacing(lam) / 2)
    assert cut.mean() > 0.95, f"only {cut.mean():.3f} of CutMix-only rows carry a box"
    assert (box[cut, 2] > box[cut, 0]).all() and (box[cut, 3] > box[cut, 1]).all(), "a box with no extent"
    assert (box >= 0).all() and (box <= 1).all(), f"box fractions {box.min()}-{box.max()} leave the view"
    assert error.max() <= 1, f"lambda off the pasted area by {error.max():.2f} half-ulps of float32"
    assert (lam[~cut] == 1).all(), f"{int((lam[~cut] != 1).sum())} rows without a box have lambda below 1"


def test_plan_is_deterministic_per_seed_view_and_pair():
    first = plan_mixing(3, 1, 1000, BOTH, 224)
    again = plan_mixing(3, 1, 1000, BOTH, 224)
    longer = plan_mixing(3, 1, 5001, BOTH, 224)
    other_view = plan_mixing(3, 2, 1000, BOTH, 224)
    other_seed = plan_mixing(4, 1, 1000, BOTH, 224)
    assert all(np.array_equal(a, b) for a, b in zip(first, again)), "the same seed and view planned differently"
    assert all(np.array_equal(a, b[:1000]) for a, b in zip(first, longer)), (
        "a pair's draw depends on how many positions the view has"
    )
    same_view = int((first[0] == other_view[0]).sum())
    same_seed = int((first[0] == other_seed[0]).sum())
    assert same_view < 100, f"{same_view} of 1000 lambdas repeat in another view"
    assert same_seed < 100, f"{same_seed} of 1000 lambdas repeat under another seed"


def test_pairs_share_lambda_and_box():
    lam, box = plan_mixing(9, 0, 2000, BOTH, 160)
    assert np.array_equal(lam[0::2], lam[1::2]), f"{int((lam[0::2] != lam[1::2]).sum())} pairs differ in lambda"
    assert np.array_equal(box[0::2], box[1::2]), f"{int((box[0::2] != box[1::2]).any(1).sum())} pairs differ in box"
    assert lam.dtype == np.float32 and box.dtype == np.float32, f"dtypes {lam.dtype}, {box.dtype}"


def test_prob_sets_the_share_of_mixed_pairs():
    """prob=0 and both alphas 0 mix nothing; prob=0.3 mixes 30% of pairs within 5 standard errors."""
    for params in (MixParams(mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.0), MixParams()):
        lam, box = plan_mixing(1, 0, 500, params, 224)
        assert (lam == 1).all() and not box.any(), f"{params}: {int((lam != 1).sum())} rows mixed"
    lam, _ = plan_mixing(1, 0, 20_000, MixParams(mixup_alpha=1.0, prob=0.3), 224)
    share = (lam[0::2] < 1).mean()
    bound = 5 * math.sqrt(0.3 * 0.7 / 10_000)
    assert abs(share - 0.3) < bound, f"{share:.4f} of pairs mixed at prob 0.3 (+- {bound:.4f})"


def test_switch_prob_chooses_between_mixup_and_cutmix():
    only_mixup = plan_mixing(2, 0, 2000, MixParams(1.0, 1.0, switch_prob=0.0), 224)
    only_cutmix = plan_mixing(2, 0, 2000, MixParams(1.0, 1.0, switch_prob=1.0), 224)
    half = plan_mixing(2, 0, 20_000, MixParams(1.0, 1.0, switch_prob=0.5), 224)
    assert not only_mixup[1].any(), f"{int(cutmix_rows(only_mixup[1]).sum())} CutMix rows at switch_prob 0"
    assert (only_mixup[0] < 1).mean() > 0.99, f"only {(only_mixup[0] < 1).mean():.3f} mixed at switch_prob 0"
    mixup_rows = (only_cutmix[0] < 1) & ~cutmix_rows(only_cutmix[1])
    assert not mixup_rows.any(), f"{int(mixup_rows.sum())} MixUp rows at switch_prob 1"
    share = cutmix_rows(half[1][0::2]).mean()
    assert abs(share - 0.5) < 0.025, f"{share:.4f} of pairs CutMix at switch_prob 0.5"


def test_odd_view_leaves_the_last_position_unmixed():
    lam, box = plan_mixing(0, 0, 7, MixParams(mixup_alpha=1.0, cutmix_alpha=1.0), 224)
    assert lam[-1] == 1 and not box[-1].any(), f"last of 7 positions has lambda {lam[-1]}, box {box[-1]}"
    assert (lam[:6] < 1).all(), f"paired lambdas {lam[:6]}: all three pairs should be mixed"


def test_box_pixels_round_half_up_and_scale_with_size():
    box = np.array([[0.25, 0.5, 0.75, 1.0], [0.1, 0.0, 0.5, 0.3]], dtype=np.float32)
    assert box_pixels(box, 4).tolist() == [[1, 2, 3, 4], [0, 0, 2, 1]], f"got {box_pixels(box, 4).tolist()}"
    assert box_pixels(box, 8).tolist() == [[2, 4, 6, 8], [1, 0, 4, 2]], f"got {box_pixels(box, 8).tolist()}"
    assert box_pixels(torch.from_numpy(box), 37).tolist() == box_pixels(box, 37).tolist(), "torch and NumPy differ"


def test_mixup_blends_with_the_partner():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4) / 7
    lam = torch.tensor([0.25, 0.25])
    out = mix_batch(images, lam, torch.zeros(2, 4), 10)
    expected = torch.stack([0.25 * images[0] + 0.75 * images[1], 0.25 * images[1] + 0.75 * images[0]])
    assert torch.allclose(out, expected, rtol=0, atol=1e-6), f"max error {(out - expected).abs().max():.2e}"
    assert not torch.equal(out, images) and images[0, 0, 0, 1] == 1 / 7, "the input was changed in place"


@pytest.mark.parametrize("size", [4, 8])
def test_cutmix_pastes_the_partner_region(size):
    """Fractions (0.25, 0.5, 0.75, 1) paste rows S/4..3S/4 and columns S/2..S of the partner, at any size."""
    images = torch.randn(4, 3, size, size)
    box = torch.tensor([[0.25, 0.5, 0.75, 1.0]] * 2 + [[0.0] * 4] * 2)
    lam = torch.tensor([0.75, 0.75, 1.0, 1.0])
    out = mix_batch(images, lam, box, 0)
    expected = images.clone()
    ys, xs = slice(size // 4, 3 * size // 4), slice(size // 2, size)
    expected[0, :, ys, xs] = images[1, :, ys, xs]
    expected[1, :, ys, xs] = images[0, :, ys, xs]
    assert torch.equal(out, expected), f"{int((out != expected).sum())} of {out.numel()} values differ"


def test_mix_batch_is_independent_of_batch_split():
    lam, box = plan_mixing(4, 0, 64, MixParams(0.8, 1.0, prob=0.8), 24)
    start = next(
        p
        for p in range(0, 56, 2)
        if cutmix_rows(box[p : p + 8]).any() and ((lam[p : p + 8] < 1) & ~cutmix_rows(box[p : p + 8])).any()
    )
    images = torch.randn(8, 3, 24, 24)
    lam_t, box_t = torch.from_numpy(lam[start : start + 8]), torch.from_numpy(box[start : start + 8])
    whole = mix_batch(images, lam_t, box_t, start)
    for split in (2, 4, 6):
        parts = torch.cat(
            [
                mix_batch(images[:split], lam_t[:split], box_t[:split], start),
                mix_batch(images[split:], lam_t[split:], box_t[split:], start + split),
            ]
        )
        assert torch.equal(parts, whole), f"split {split}+{8 - split}: {int((parts != whole).sum())} values differ"


def test_mix_batch_refuses_broken_pairs():
    images = torch.zeros(3, 3, 4, 4)
    with pytest.raises(ValueError, match="odd position 3"):
        mix_batch(images[:2], torch.ones(2), torch.zeros(2, 4), 3)
    with pytest.raises(ValueError, match="unpaired last row has lambda 0.5"):
        mix_batch(images, torch.tensor([0.5, 0.5, 0.5]), torch.zeros(3, 4), 0)
    out = mix_batch(images + 1, torch.tensor([0.5, 0.5, 1.0]), torch.zeros(3, 4), 0)
    assert torch.equal(out[2], images[2] + 1), "the unpaired last row changed"


def test_cross_entropy_with_soft_labels_is_the_lambda_weighted_ce_of_both_labels():
    """A mixed batch's soft labels make the student's CE lam * CE(own label) + (1 - lam) * CE(partner's)."""
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0], [1.0, 2.0, 3.0], [0.0, 1.0, 0.0]])
    target = torch.tensor([0, 1, 2, 0, 1])
    lam = torch.tensor([0.3, 0.3, 0.9, 0.9, 1.0])
    partner = [1, 0, 3, 2, 4]
    rows = []
    for i in range(5):
        log_z = math.log(sum(math.exp(v) for v in logits[i].tolist()))
        own = log_z - logits[i, target[i]].item()
        other = log_z - logits[i, target[partner[i]]].item()
        rows.append(lam[i].item() * own + (1 - lam[i].item()) * other)
    expected = sum(rows) / 5
    soft = soft_labels(target, lam, 3)
    got = F.cross_entropy(logits, soft).item()
    assert torch.allclose(soft.sum(1), torch.ones(5)), f"soft label rows sum to {soft.sum(1).tolist()}"
    assert abs(got - expected) < 1e-6, f"CE with soft labels {got:.7f}, by hand {expected:.7f}"


def test_soft_labels_without_mixing_give_plain_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(33, 10)
    target = torch.randint(0, 10, (33,))
    soft = soft_labels(target, torch.ones(33), 10)
    got, plain = F.cross_entropy(logits, soft), F.cross_entropy(logits, target)
    assert abs(got.item() - plain.item()) < 1e-6, f"{got.item():.9f} vs cross_entropy {plain.item():.9f}"


@pytest.mark.parametrize(
    "field, value, option",
    [
        ("mixup_alpha", -0.2, "--mixup"),
        ("cutmix_alpha", -1.0, "--cutmix"),
        ("mixup_alpha", math.nan, "--mixup"),
        ("prob", 1.5, "--mixup-prob"),
        ("switch_prob", 1.5, "--mixup-switch-prob"),
        ("prob", -0.1, "--mixup-prob"),
    ],
)
def test_check_names_the_option(field, value, option):
    with pytest.raises(OptionError) as caught:
        MixParams(**{field: value}).check()
    message = str(caught.value)
    assert isinstance(caught.value, SkdError), "OptionError is not an SkdError"
    assert message.startswith(f"{option} {value}:") and "\n" not in message, f"message {message!r}"


def test_params_round_trip_through_json_and_enabled():
    params = MixParams(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.5, switch_prob=0.25)
    params.check()
    again = MixParams.from_dict(json.loads(json.dumps(params.to_dict())))
    assert again == params, f"round trip gave {again}"
    assert params.enabled and not MixParams().enabled and not MixParams(mixup_alpha=1.0, prob=0.0).enabled, (
        "enabled should need an alpha above 0 and prob above 0"
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mix_batch_on_cuda_matches_cpu():
    lam, box = plan_mixing(6, 0, 16, MixParams(0.8, 1.0), 32)
    images = torch.randn(16, 3, 32, 32)
    lam_t, box_t = torch.from_numpy(lam), torch.from_numpy(box)
    cpu = mix_batch(images, lam_t, box_t, 0)
    cuda = mix_batch(images.cuda(), lam_t, box_t, 0).cpu()
    assert torch.equal(cpu, cuda), f"{int((cpu != cuda).sum())} values differ, max {(cpu - cuda).abs().max():.2e}"


# ---------------------------------------------------------------------------------------------
# Through the product: the teacher's logits are those of the mixed image, and training replays the mix


def hand_mix(own: np.ndarray, partner: np.ndarray, lam: float, box: np.ndarray) -> np.ndarray:
    """The mixed view of one row, written out pixel by pixel: MixUp blend, or CutMix paste of the box."""
    size = own.shape[-1]
    if box.any():
        y0, x0, y1, x1 = (int(np.floor(f * size + 0.5)) for f in box)
        out = own.copy()
        out[:, y0:y1, x0:x1] = partner[:, y0:y1, x0:x1]
        return out
    return lam * own + (1 - lam) * partner if lam < 1 else own


@pytest.fixture(scope="module")
def mixed_cache(image_root, teacher_file, tmp_path_factory):
    from conftest import small_build_config

    from skd.build.teacher_pass import build_cache

    out = tmp_path_factory.mktemp("mixed") / "cache"
    build_cache(small_build_config(image_root, out, teacher_file, mixup=0.8, cutmix=1.0, batch_size=4))
    return out


def test_cached_logits_are_the_teachers_on_the_mixed_images(mixed_cache, teacher_file):
    import torchvision

    from skd.pipelines import IMAGENET_MEAN, IMAGENET_STD
    from skd.store.cache_store import open_store

    store = open_store(mixed_cache)
    teacher = torchvision.models.resnet18(num_classes=3)
    teacher.load_state_dict(torch.load(teacher_file, weights_only=True))
    teacher.eval()
    paths, root = store.split("samples").paths, store.meta["dataset"]["root"]
    order, box, flip = store.view_plan(0)
    lam, mix_box = store.view_mix(0)
    views = np.stack(
        [
            load_view(f"{root}/{paths[order[p]]}", box[p], bool(flip[p]), 32, IMAGENET_MEAN, IMAGENET_STD).numpy()
            for p in range(len(order))
        ]
    )
    partner = [min(p ^ 1, len(order) - 1) for p in range(len(order))]
    mixed = np.stack([hand_mix(views[p], views[partner[p]], float(lam[p]), mix_box[p]) for p in range(len(order))])
    with torch.no_grad():
        want, unmixed = teacher(torch.from_numpy(mixed)).numpy(), teacher(torch.from_numpy(views)).numpy()
    stored = store.read_logits(0)
    kinds = {"mixup": int(((lam < 1) & ~mix_box.any(1)).sum()), "cutmix": int(mix_box.any(1).sum())}
    assert min(kinds.values()) > 0, f"view 0 should hold both kinds of mixed rows: {kinds}"
    same = float(np.abs(stored - want).max())
    assert same < 1e-4, f"cached logits are {same:.2e} from the teacher on the hand-mixed images"
    rows = lam < 1
    other = float(np.abs(stored[rows] - unmixed[rows]).max())
    assert other > 100 * max(same, 1e-6), f"the unmixed images' logits are only {other:.2e} away on mixed rows"


def test_batch_size_does_not_change_a_mixed_cache(mixed_cache, image_root, teacher_file, tmp_path):
    from conftest import small_build_config

    from skd.build.teacher_pass import build_cache
    from skd.store.cache_store import open_store

    build_cache(small_build_config(image_root, tmp_path / "b8", teacher_file, mixup=0.8, cutmix=1.0, batch_size=8))
    a, b = open_store(mixed_cache).read_logits(0), open_store(tmp_path / "b8").read_logits(0)
    diff = float(np.abs(a - b).max())
    assert diff < 1e-5, f"batch 4 and batch 8 mixed caches differ by {diff:.2e}"


def test_online_mixed_training_equals_cached(mixed_cache, image_root, teacher_file, tmp_path):
    from dataclasses import replace

    from skd.train.loop import train

    base = small_train_config(tmp_path, alpha="0.5", image_size=None, views=None)
    runs = {}
    for mode, cfg in {
        "cached": replace(base, cache=mixed_cache, out=tmp_path / "cached"),
        "online": replace(
            base,
            teacher="resnet18",
            weights=str(teacher_file),
            data=image_root,
            views=2,
            image_size=32,
            mixup=0.8,
            cutmix=1.0,
            out=tmp_path / "online",
        ),
        "unmixed": replace(
            base,
            teacher="resnet18",
            weights=str(teacher_file),
            data=image_root,
            views=2,
            image_size=32,
            out=tmp_path / "unmixed",
        ),
    }.items():
        losses = []
        train(cfg, on_step=lambda epoch, step, parts: losses.append((parts.kd.item(), parts.ce.item())))
        runs[mode] = np.array(losses)
    gap = float(np.abs(runs["cached"] - runs["online"]).max())
    assert runs["cached"].shape == (6, 2) and gap < 1e-5, f"online and cached mixed losses differ by {gap:.2e}"
    other = float(np.abs(runs["cached"] - runs["unmixed"]).max())
    assert other > 1e-3, f"unmixed training gives the same losses (within {other:.2e}): the mix was not replayed"


def test_verify_replays_mixed_rows(mixed_cache, teacher_file):
    from skd.inspect.verify import verify_cache
    from skd.store.cache_store import open_store

    report = verify_cache(open_store(mixed_cache), weights=str(teacher_file), samples=42, seed=3)
    logits = next(c for c in report.checks if c.name == "logits")
    assert report.ok and report.comparison.kl_max < 1e-6, f"verify on a mixed cache: {report.checks}"
    assert report.comparison.rows == 42, f"{report.comparison.rows} rows compared, asked for all 42 ({logits.detail})"


def test_info_and_stats_report_the_mixing(mixed_cache, in_process):
    from skd.store.cache_store import open_store

    lam, box = open_store(mixed_cache).view_mix(0)
    share = float((lam < 1).mean())
    code, _ = in_process("cache", "info", mixed_cache)
    assert code == 0, f"info exit {code}"
    from skd.inspect.info import describe

    info = describe(open_store(mixed_cache))["mixing"]
    mixed = info["view 0"]["mixup"] + info["view 0"]["cutmix"]
    assert info["options"]["mixup_alpha"] == 0.8 and abs(mixed - share) < 1e-9, (
        f"info's shares {info['view 0']} vs {share:.3f} of rows mixed"
    )
    from skd.inspect.stats import logit_stats, stats_lines

    text = "\n".join(stats_lines(logit_stats(open_store(mixed_cache), (0,))))
    assert "mixing:" in text and "MixUp" in text, f"stats text lacks the mixing line: {text[-400:]}"


def test_mixing_with_an_odd_batch_is_one_line(image_root, teacher_file, tmp_path, in_process):
    build = build_args(weights=teacher_file, data=image_root, out=tmp_path / "c", mixup="0.2", batch_size=5)
    code, err = in_process("cache", *build)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--batch-size 5:" in lines[0] and "even" in lines[0], lines
    assert not (tmp_path / "c").exists(), "a refused build wrote its --out"
    online = dict(teacher="resnet18", weights=teacher_file, data=image_root, out=tmp_path / "r", image_size=32, views=1)
    code, err = in_process("train", *train_args(**online, mixup="0.2", batch_size=5))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "even number" in lines[0], lines
