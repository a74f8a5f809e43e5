"""A teacher sees each recorded window at its own published recipe; the student at its own size."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import zarr
from conftest import small_build_config, small_train_config
from PIL import Image

from skd.build.teacher_pass import build_cache
from skd.errors import OptionError
from skd.models.recipe import resolve
from skd.pipelines import IMAGENET_MEAN, IMAGENET_STD
from skd.train.loop import train

CFG_96 = {"input_size": (3, 96, 96), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic"}


class SizedTeacher(torch.nn.Module):
    """A small CNN that states its recipe the timm way; its output depends on the input scale and offset."""

    pretrained_cfg = CFG_96

    def __init__(self, num_classes: int = 3):
        super().__init__()
        torch.manual_seed(7)
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=4)
        self.fc = torch.nn.Linear(8 * 23 * 23, num_classes)  # 96 px in -> 23 x 23: this teacher needs 96 px

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def sized_teacher(num_classes: int = 3) -> SizedTeacher:
    return SizedTeacher(num_classes).eval()


class StudentAt64(torch.nn.Module):
    """A student that refuses any input but 64 px, so a run proves what size the student was fed."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.fc = torch.nn.Linear(3, num_classes)

    def forward(self, x):
        assert x.shape[-2:] == (64, 64), f"the student got {tuple(x.shape[-2:])} px, not 64"
        return self.fc(x.mean((2, 3)))


def student_at_64(num_classes: int = 3) -> StudentAt64:
    return StudentAt64(num_classes)


def test_fields_resolve_from_the_first_source_that_states_them():
    published = {"size": 232, "interpolation": "bilinear", "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    recipe, origin = resolve(
        {"size": None, "interpolation": None, "mean": (0.1, 0.2, 0.3), "std": None}, CFG_96, published, 64
    )
    assert (recipe.size, recipe.interpolation, recipe.mean, recipe.std) == (
        96,
        "bicubic",
        (0.1, 0.2, 0.3),
        (0.5, 0.5, 0.5),
    ), f"{recipe}"
    assert origin == {
        "size": "pretrained_cfg",
        "interpolation": "pretrained_cfg",
        "mean": "option",
        "std": "pretrained_cfg",
    }, f"{origin}"
    recipe, origin = resolve({}, None, published, 64)
    assert recipe.size == 232 and set(origin.values()) == {"torchvision weights"}, f"{recipe} {origin}"
    recipe, origin = resolve({}, None, None, 64)
    assert (recipe.size, recipe.interpolation, recipe.mean) == (64, "bilinear", IMAGENET_MEAN), f"{recipe}"
    with pytest.raises(OptionError, match="square inputs only"):
        resolve({}, {"input_size": (3, 96, 128)}, None, 64)


def pil_view(path, box, flip, size, mean, std) -> torch.Tensor:
    """An independent reconstruction of one recorded view: PIL crop, bicubic resize, flip, normalise."""
    y, x, h, w = (int(v) for v in box)
    with Image.open(path) as image:
        view = image.convert("RGB").crop((x, y, x + w, y + h)).resize((size, size), Image.BICUBIC)
    array = np.asarray(view, np.float32) / 255
    if flip:
        array = array[:, ::-1]
    array = (array - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


# stored logits against the PIL reconstruction: torchvision is that reconstruction; DALI's cubic resize differs
# from PIL's bicubic by ~0.2 grey levels on average (benchmarks/resampling.py), here <= 2.1e-3 of logits ~0.2
TOLERANCE = {"torchvision": 1e-4, "dali": 5e-3}


def build_sized(image_root, out, loader):
    build_cache(
        small_build_config(
            image_root,
            out,
            None,
            teacher="py:test_recipe:sized_teacher",
            weights=None,
            image_size=64,
            loader=loader,
            workers=1 if loader == "dali" else 0,
        )
    )
    return out


@pytest.fixture(scope="module")
def sized_cache(image_root, tmp_path_factory):
    return build_sized(image_root, tmp_path_factory.mktemp("sized") / "cache", "torchvision")


@pytest.mark.parametrize("loader", ["torchvision", "dali"])
def test_teacher_sees_its_own_recipe_and_the_student_size_is_recorded(loader, sized_cache, image_root, tmp_path):
    cache = sized_cache if loader == "torchvision" else build_sized(image_root, tmp_path / "cache", loader)
    g = zarr.open_group(str(cache), mode="r")
    meta = g.attrs["skd"]
    recorded = meta["teacher"]["input"]
    assert (recorded["size"], recorded["interpolation"], recorded["mean"]) == (96, "bicubic", [0.5] * 3), recorded
    assert meta["plan"]["image_size"] == 64, f"student size {meta['plan']['image_size']}"
    teacher = sized_teacher()
    order, box, flip = g["views/order"][0], g["views/box"][0], g["views/flip"][0]
    paths = g["samples/path"][:]
    stored = g["views/logits"][0]
    files = [image_root / paths[i] for i in order]
    with torch.no_grad():
        own = teacher(
            torch.stack([pil_view(f, b, v, 96, (0.5,) * 3, (0.5,) * 3) for f, b, v in zip(files, box, flip)])
        ).numpy()
        imagenet = teacher(
            torch.stack([pil_view(f, b, v, 96, IMAGENET_MEAN, IMAGENET_STD) for f, b, v in zip(files, box, flip)])
        ).numpy()
    same = float(np.abs(stored - own).max())
    other = float(np.abs(stored - imagenet).max())
    assert same < TOLERANCE[loader], (
        f"{loader}: stored logits are {same:.2e} from the teacher at its own recipe (96 px, bicubic, 0.5)"
    )
    assert other > 10 * TOLERANCE[loader], f"{loader}: ImageNet-normalised views give logits only {other:.2e} away"


def test_student_trains_at_its_own_size_and_online_equals_cached(sized_cache, image_root, tmp_path):
    base = small_train_config(tmp_path, epochs=1, image_size=None, views=None, arch="py:test_recipe:student_at_64")
    runs = {}
    for mode, cfg in {
        "cached": replace(base, cache=sized_cache, out=tmp_path / "cached"),
        "online": replace(
            base,
            teacher="py:test_recipe:sized_teacher",
            data=image_root,
            views=2,
            image_size=64,
            out=tmp_path / "online",
        ),
    }.items():
        losses = []
        train(cfg, on_step=lambda epoch, step, parts: losses.append((parts.kd.item(), parts.ce.item())))
        runs[mode] = np.array(losses)
    assert len(runs["cached"]) == 3, f"{len(runs['cached'])} steps"
    gap = float(np.abs(runs["cached"] - runs["online"]).max())
    assert gap < 1e-5, f"online (teacher at 96 px, student at 64) and cached losses differ by {gap:.2e}"


def test_a_timm_teacher_records_its_own_recipe(image_root, tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=3)
    torch.save(model.state_dict(), tmp_path / "vit.pth")
    out = tmp_path / "cache"
    build_cache(
        small_build_config(
            image_root,
            out,
            tmp_path / "vit.pth",
            teacher="timm:vit_tiny_patch16_224",
            views=1,
            image_size=32,
            codec="fp16",
            batch_size=6,
        )
    )
    teacher = zarr.open_group(str(out), mode="r").attrs["skd"]["teacher"]
    recipe = teacher["input"]
    assert (recipe["size"], recipe["interpolation"], recipe["mean"], recipe["std"]) == (
        224,
        "bicubic",
        [0.5] * 3,
        [0.5] * 3,
    ), f"recorded {recipe}"
    assert teacher["pretrained_cfg"]["hf_hub_id"].startswith("timm/vit_tiny"), f"{teacher['pretrained_cfg']}"
