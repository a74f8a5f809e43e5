"""Teachers: the same weights are the same teacher however they were saved; torchvision's defaults load as
torchvision builds them; a wrong `py:` callable is a one-line error."""

from __future__ import annotations

import argparse

import pytest
import torch
import torchvision

from skd.errors import ModelError
from skd.models.teachers import create_model, load_teacher, state_sha256


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=3)


def test_weights_hash_ignores_how_the_file_was_saved(resnet, tmp_path):
    """A DDP checkpoint with training arguments, a torch.compile state_dict and the plain one are one teacher."""
    state = resnet.state_dict()
    torch.save(state, tmp_path / "plain.pth")
    torch.save(
        {
            "state_dict": {f"module.{k}": v for k, v in state.items()},
            "epoch": 89,
            "args": argparse.Namespace(lr=0.1, arch="resnet18"),
        },
        tmp_path / "reference_training.pth",
    )
    torch.save({f"_orig_mod.{k}": v for k, v in state.items()}, tmp_path / "compiled.pth")
    hashes = {
        f: load_teacher("resnet18", str(tmp_path / f)).weights_sha256
        for f in ("plain.pth", "reference_training.pth", "compiled.pth")
    }
    assert set(hashes.values()) == {state_sha256(resnet)}, f"one set of weights, several hashes: {hashes}"
    other = torchvision.models.resnet18(num_classes=3)
    assert state_sha256(other) != state_sha256(resnet), "different weights must hash differently"


def test_other_pickled_objects_are_refused_with_a_way_out(resnet, tmp_path):
    import numpy as np

    torch.save({"model": resnet.state_dict(), "best_acc": np.float64(0.7)}, tmp_path / "numpy.pth")
    with pytest.raises(ModelError, match=r"Unsupported global.*save its state_dict alone"):
        load_teacher("resnet18", str(tmp_path / "numpy.pth"))
    with pytest.raises(ModelError, match="is a folder"):
        load_teacher("resnet18", str(tmp_path))


def test_torchvision_default_weights_get_torchvision_s_builder_settings(tmp_path, monkeypatch):
    """GoogLeNet's pretrained weights expect transform_input=True, which torchvision sets only when it loads them."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    url = torchvision.models.get_model_weights("googlenet").DEFAULT.url
    (tmp_path / "checkpoints").mkdir()
    torch.save(
        torchvision.models.googlenet(
            weights=None, aux_logits=True, init_weights=False, transform_input=True
        ).state_dict(),
        tmp_path / "checkpoints" / url.rsplit("/", 1)[1],
    )
    teacher = load_teacher("googlenet")
    assert teacher.weights == "torchvision-default" and teacher.model.transform_input, (
        "the default GoogLeNet weights were loaded without transform_input"
    )
    shape = tuple(teacher.model(torch.zeros(1, 3, 64, 64)).shape)
    assert shape == (1, 1000), f"GoogLeNet's output for one image: {shape}"


@pytest.mark.parametrize(
    "spec, says",
    [
        ("py:os:getcwd", "must accept num_classes="),
        ("py:skd.demo:__doc__", "not a callable"),
        ("py:os:no_such_thing", "use py:package.module:callable"),
    ],
)
def test_wrong_py_callables_are_one_line_errors(spec, says):
    with pytest.raises(ModelError, match=says):
        create_model(spec, num_classes=3)


TIMM_LOAD = """
import json, sys
from skd.errors import SkdError
from skd.models.teachers import load_teacher
try:
    t = load_teacher("timm:vit_tiny_patch16_224")
    print(json.dumps({"weights": t.weights, "sha": t.weights_sha256, "hub": t.pretrained_cfg["hf_hub_id"]}))
except SkdError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
"""


def test_timm_pretrained_weights_come_from_the_local_hugging_face_cache(tmp_path):
    """No network: the weights are found in HF_HOME's hub cache, or one line names the repository to fetch."""
    import json
    import os
    import subprocess
    import sys

    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    def load(home):
        env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
        return subprocess.run([sys.executable, "-c", TIMM_LOAD], capture_output=True, text=True, env=env)

    missing = load(tmp_path / "empty")
    assert (
        missing.returncode == 2
        and "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k" in missing.stderr
        and "Traceback" not in missing.stderr
        and len(missing.stderr.strip().splitlines()) == 1
    ), missing.stderr
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224")
    repo = tmp_path / "home" / "hub" / "models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file(model.state_dict(), repo / "snapshots" / ("0" * 40) / "model.safetensors")
    found = load(tmp_path / "home")
    assert found.returncode == 0, found.stderr[-800:]
    got = json.loads(found.stdout)
    assert got["weights"] == "timm-pretrained" and got["sha"] == state_sha256(model), f"loaded {got}"


def test_a_fixed_size_timm_teacher_at_another_size_is_one_line():
    """A ViT built for 224 px asserts its input size deep in timm: the build says so in one line, naming the
    option, instead of timm's traceback."""
    pytest.importorskip("timm")
    from skd.models.teachers import output_classes

    model = create_model("timm:vit_tiny_patch16_224", num_classes=10).eval()
    assert output_classes(model, 224, torch.device("cpu"), "teacher vit") == 10, "its own size runs"
    with pytest.raises(ModelError, match="cannot run on a 384-pixel image .*leave --teacher-size out") as refused:
        output_classes(model, 384, torch.device("cpu"), "teacher vit")
    assert "\n" not in str(refused.value), str(refused.value)
