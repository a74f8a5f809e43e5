"""RandAugment and random erasing recorded in a cache: the stored logits are the teacher's on the recorded ops,
as an independent reconstruction from the arrays shows; cached training equals online training with the same
options, with mixing too; the DALI loader replays the same ops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision
from conftest import small_build_config, small_train_config
from PIL import Image, ImageOps
from torchvision.transforms.v2 import functional as F

from skd.build.teacher_pass import build_cache
from skd.pipelines import IMAGENET_MEAN, IMAGENET_STD
from skd.store.cache_store import open_store
from skd.train.loop import TrainConfig, train

AUGMENT = dict(aa="rand-m9-n2-mstd0.5-inc1", reprob=0.5, remode="rand")


@pytest.fixture(scope="module")
def augmented_cache(image_root, teacher_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("augmented") / "cache"
    build_cache(small_build_config(image_root, out, teacher_file, **AUGMENT))
    return out


def reconstruct_op(image: torch.Tensor, name: str, m: float) -> torch.Tensor:
    """One recorded op with torchvision.transforms.v2.functional, as cache/README.md defines its argument."""
    side, nearest = image.shape[-1], F.InterpolationMode.NEAREST
    affine = dict(interpolation=nearest, fill=0)
    if name in ("ShearX", "ShearY"):
        shear = [math.degrees(math.atan(m)), 0.0] if name == "ShearX" else [0.0, math.degrees(math.atan(m))]
        return F.affine(image, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, center=[0, 0], **affine)
    if name in ("TranslateX", "TranslateY"):
        pixels = int(round(m * side))
        shift = [pixels, 0] if name == "TranslateX" else [0, pixels]
        return F.affine(image, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], **affine)
    enhance = {
        "Brightness": F.adjust_brightness,
        "Color": F.adjust_saturation,
        "Contrast": F.adjust_contrast,
        "Sharpness": F.adjust_sharpness,
    }
    simple = {
        "Identity": lambda: image,
        "Rotate": lambda: F.rotate(image, m, **affine),
        "Posterize": lambda: F.posterize(image, int(m)),
        "Solarize": lambda: F.solarize(image, m),
        "SolarizeAdd": lambda: torch.where(image < 128, (image.int() + int(m)).clamp(0, 255).byte(), image),
        "AutoContrast": lambda: F.autocontrast(image),
        "Equalize": lambda: F.equalize(image),
        "Invert": lambda: F.invert(image),
    }
    return enhance[name](image, 1.0 + m) if name in enhance else simple[name]()


def reconstructed_view(store, view: int, position: int, with_ops: bool = True) -> torch.Tensor:
    """Position `position` of `view` rebuilt from the recorded arrays with PIL and torchvision only."""
    order, box, flip = store.view_plan(view)
    recorded, ops = store.view_augment(view), store.meta["plan"]["augment"]["ops"]
    path = f"{store.meta['dataset']['root']}/{store.split('samples').paths[order[position]]}"
    y, x, h, w = (int(v) for v in box[position])
    with Image.open(path) as image:
        image = (
            ImageOps.exif_transpose(image).convert("RGB").crop((x, y, x + w, y + h)).resize((32, 32), Image.BILINEAR)
        )
    tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    tensor = tensor.flip(-1) if flip[position] else tensor
    for index, m in zip(recorded["aug_op"][position], recorded["aug_magnitude"][position]) if with_ops else []:
        tensor = reconstruct_op(tensor, ops[index], float(m))
    tensor = (tensor.float() / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        3, 1, 1
    )
    for (y0, x0, y1, x1), value in zip(recorded["erase_box"][position], recorded["erase_value"][position]):
        top, left, bottom, right = (math.floor(f * 32 + 0.5) for f in (y0, x0, y1, x1))
        tensor[:, top:bottom, left:right] = torch.from_numpy(value).view(3, 1, 1)
    return tensor


def test_an_independent_reconstruction_from_the_recorded_arrays_gives_the_stored_logits(augmented_cache, teacher_file):
    store = open_store(augmented_cache)
    teacher = torchvision.models.resnet18(num_classes=3)
    teacher.load_state_dict(torch.load(teacher_file, weights_only=True))
    teacher.eval()
    recorded = store.view_augment(1)
    applied = (recorded["aug_op"] > 0).sum()
    erased = (recorded["erase_box"].sum(axis=(1, 2)) > 0).sum()
    assert applied >= 10 and erased >= 3, f"only {applied} ops applied and {erased} images erased in 18 samples"
    stored = torch.from_numpy(store.read_logits(1))
    with torch.no_grad():
        full = teacher(torch.stack([reconstructed_view(store, 1, p) for p in range(18)]))
        bare = teacher(torch.stack([reconstructed_view(store, 1, p, with_ops=False) for p in range(18)]))
    gap, skipped = float((full - stored).abs().max()), float((bare - stored).abs().max())
    assert gap < 2e-3, f"the reconstruction's logits are {gap:.2e} from the stored ones"
    assert skipped > 20 * max(gap, 1e-4), f"without the ops the logits are only {skipped:.2e} off (with: {gap:.2e})"


def losses_of(cfg: TrainConfig) -> np.ndarray:
    losses = []
    train(cfg, on_step=lambda epoch, step, parts: losses.append((parts.kd.item(), parts.ce.item())))
    return np.array(losses)


@pytest.mark.parametrize("mixing", [{}, dict(mixup=0.8, cutmix=1.0)], ids=["augmented", "augmented-and-mixed"])
def test_cached_training_equals_online_training_with_the_same_augmentation(image_root, teacher_file, tmp_path, mixing):
    cache = tmp_path / "cache"
    build_cache(small_build_config(image_root, cache, teacher_file, **AUGMENT, **mixing))
    online = dict(teacher="resnet18", weights=str(teacher_file), data=image_root, views=2, image_size=32, **mixing)
    cached = losses_of(small_train_config(tmp_path / "cached", cache=cache, views=None))
    same = losses_of(small_train_config(tmp_path / "online", **online, **AUGMENT))
    plain = losses_of(small_train_config(tmp_path / "plain", **online))
    gap = float(np.abs(cached - same).max())
    assert cached.shape == (6, 2) and gap < 1e-5, f"online and cached augmented losses differ by {gap:.2e}"
    other = float(np.abs(cached - plain).max())
    assert other > 1e-3, f"training without the ops gives the same losses (within {other:.2e}): they were not replayed"


def test_the_dali_loader_replays_the_recorded_ops(augmented_cache):
    """DALI decodes and resizes, the recorded ops then run in torch on its 8-bit views: the same images as the
    torchvision loader's up to resampling noise, far closer than without the ops."""
    pytest.importorskip("nvidia.dali")
    import skd

    cache = skd.open_cache(augmented_cache)
    options = dict(batch_size=6, workers=1, device="cpu", with_logits=False)
    dali = torch.cat([b.images for b in cache.loader(1, loader="dali", **options)])
    reference = torch.cat([b.images for b in cache.loader(1, loader="torchvision", **options)])
    plain = torch.cat([b.images for b in skd.open_cache(augmented_cache).loader(0, loader="torchvision", **options)])
    noise = float((dali - reference).abs().mean())
    assert noise < 0.05, f"DALI's augmented views are {noise:.3f} (normalised units) from the torchvision loader's"
    assert float((plain - reference).abs().mean()) > 10 * noise, "another view differs as little: nothing compared"


def test_info_stats_and_verify_know_the_recorded_augmentation(augmented_cache, in_process):
    """info names the options, stats gives the teacher's top-1 on the rows each op touched (worst first, counted
    against the recorded arrays), verify replays the ops and finds the rows."""
    from skd.inspect.info import describe, info_lines
    from skd.inspect.stats import logit_stats

    text = "\n".join(info_lines(describe(open_store(augmented_cache))))
    assert "augment   --aa rand-m9-n2-mstd0.5-inc1 --reprob 0.5 --remode rand" in text, text
    stats = logit_stats(open_store(augmented_cache), [0], val=False)
    by_op = {row["op"]: row for row in stats.splits[0].augment}
    recorded = open_store(augmented_cache).view_augment(0)
    applied = {int(i) for i in np.unique(recorded["aug_op"]) if i}
    ops = open_store(augmented_cache).meta["plan"]["augment"]["ops"]
    for index in applied:
        rows = int((recorded["aug_op"] == index).any(axis=1).sum())
        assert by_op[ops[index]]["rows"] == rows, f"{ops[index]}: {by_op[ops[index]]['rows']} rows, recorded {rows}"
    tops = [row["top1"] for row in stats.splits[0].augment if row["top1"] is not None]
    assert tops == sorted(tops), f"not worst first: {tops}"
    code, err = in_process("cache", "verify", augmented_cache, "--samples", "8")
    assert code == 0, f"verify of an augmented cache: {err[-600:]}"


def test_a_trivial_augment_cache_reproduces_from_its_arrays(image_root, teacher_file, tmp_path):
    """--aa trivial records TrivialAugmentWide's op and argument per image: the same reconstruction applies."""
    build_cache(small_build_config(image_root, tmp_path / "c", teacher_file, aa="trivial", reprob=0.5, views=1))
    store = open_store(tmp_path / "c")
    teacher = torchvision.models.resnet18(num_classes=3)
    teacher.load_state_dict(torch.load(teacher_file, weights_only=True))
    with torch.no_grad():
        rebuilt = teacher.eval()(torch.stack([reconstructed_view(store, 0, p) for p in range(18)]))
    gap = float((rebuilt - torch.from_numpy(store.read_logits(0))).abs().max())
    assert store.view_augment(0)["aug_op"].shape == (18, 1) and gap < 2e-3, f"trivial: logits {gap:.2e} apart"


def test_plan_from_and_appended_views_carry_the_recorded_augmentation(augmented_cache, image_root, tmp_path):
    """A second teacher on the plan (--plan-from) gets the same ops and boxes; a cache grown by a view equals a fresh
    build of as many views, its new view's record included."""
    import torchvision as tv

    torch.manual_seed(5)
    other = tmp_path / "other.pth"
    torch.save(tv.models.resnet18(num_classes=3).state_dict(), other)
    build_cache(small_build_config(image_root, tmp_path / "second", other, plan_from=augmented_cache))
    first, second = open_store(augmented_cache), open_store(tmp_path / "second")
    for view in range(2):
        a, b = first.view_augment(view), second.view_augment(view)
        same = all(np.array_equal(a[name], b[name]) for name in a) and a.keys() == b.keys()
        assert same, f"view {view}: --plan-from recorded other ops or boxes"
    grown, fresh = tmp_path / "grown", tmp_path / "fresh"
    build_cache(small_build_config(image_root, grown, other, views=1, **AUGMENT))
    build_cache(small_build_config(image_root, grown, other, views=2, **AUGMENT))
    build_cache(small_build_config(image_root, fresh, other, views=2, **AUGMENT))
    g, f = open_store(grown), open_store(fresh)
    assert g.meta["plan"]["id"] == f.meta["plan"]["id"], "the grown cache's plan id is not the fresh build's"
    assert all(np.array_equal(g.view_augment(1)[n], f.view_augment(1)[n]) for n in f.view_augment(1)), (
        "the appended view's recorded augmentation differs from a fresh build's"
    )
