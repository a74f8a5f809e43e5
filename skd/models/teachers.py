"""Teacher and student models: by torchvision name, `timm:NAME`, or `py:module:callable`.

Weights are only ever loaded with `weights_only=True` (or from safetensors). Nothing is downloaded:
torchvision's default weights must already sit in the torch hub cache, timm's in the Hugging Face
cache, and the error says where.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from skd.errors import ModelError
from skd.models.runtime import autocast, images_to


@dataclass
class Teacher:
    """A loaded model and what the cache records about it."""

    model: nn.Module
    name: str
    weights: str  # a path, "torchvision-default", "none" or "py"
    weights_sha256: str | None  # of the loaded tensors (state_sha256); None for --weights none
    published: dict | None = None  # the input recipe torchvision publishes with its default weights

    @property
    def pretrained_cfg(self) -> dict | None:
        """The model's timm-style `pretrained_cfg` (timm models have one; a py: model may set one),
        as JSON."""
        return _json(getattr(self.model, "pretrained_cfg", None))


def alias(name: str) -> str:
    """Short cache name of a model: resnet152 -> r152, timm:vit_base -> vit_base."""
    name = name.split(":")[-1]
    name = re.sub(r"^resnet(\d+)$", r"r\1", name)
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def state_sha256(model: nn.Module) -> str:
    """sha256 of a model's weights (names, dtypes, shapes, bytes), not of a file: the same weights
    re-saved, wrapped in a checkpoint dict or with `module.` prefixes hash the same."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        if flat.numel():
            h.update(flat.view(torch.uint8).numpy())
    return h.hexdigest()


def create_model(name: str, num_classes: int | None = None) -> nn.Module:
    """An untrained model: a torchvision classification name, `timm:NAME` or
    `py:module:callable`."""
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if name.startswith("py:"):
        try:
            _, module_name, attr = name.split(":", 2)
            factory = getattr(importlib.import_module(module_name), attr)
        except (ValueError, ImportError, AttributeError) as exc:
            raise ModelError(
                f"cannot load {name!r} ({exc}): use py:package.module:callable"
            ) from None
        if not callable(factory):
            raise ModelError(
                f"{name} is a {type(factory).__name__}, not a callable that returns a model"
            )
        try:
            model = factory(**kwargs)
        except TypeError as exc:
            raise ModelError(
                f"{name}({', '.join(f'{k}={v}' for k, v in kwargs.items())}) failed ({exc}): "
                "the callable must accept num_classes= as a keyword"
            ) from None
        if not isinstance(model, nn.Module):
            raise ModelError(f"{name} returned {type(model).__name__}, not a torch.nn.Module")
        return model
    if name.startswith("timm:"):
        try:
            import timm
        except ImportError:
            raise ModelError(f"{name} needs timm: pip install 'skd[timm]'") from None
        try:
            return timm.create_model(name[5:], pretrained=False, **kwargs)
        except RuntimeError as exc:
            raise ModelError(f"timm has no model {name[5:]!r} ({exc})") from None
    _check_torchvision_name(name)
    return torchvision.models.get_model(name, weights=None, **kwargs)


def _check_torchvision_name(name: str) -> None:
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ModelError(
            f"unknown model {name!r}: use a torchvision classification model name "
            "(resnet152, resnet50, ...), timm:NAME or py:module:callable"
        )


def read_state_dict(path: Path) -> dict:
    """A state_dict from a file: plain, or under 'state_dict'/'model'; `module.` prefixes
    stripped."""
    path = Path(path)
    if path.is_dir():
        raise ModelError(f"--weights {path} is a folder: pass the weights file")
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist")
    try:  # torchvision's reference training saves its argparse.Namespace beside the weights
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(path)
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        unsupported = next(
            (line for line in lines if "Unsupported global" in line), lines[0] if lines else ""
        )
        raise ModelError(
            f"refusing to load {path}: not a plain tensor checkpoint ({unsupported[:200]}); if you "
            "trust it, save its state_dict alone: torch.save(torch.load(F, weights_only=False)"
            "['model'], 'weights.pth')"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{path} holds no state_dict of tensors")
    return {_strip_wrappers(k): v for k, v in obj.items()}


def _strip_wrappers(key: str) -> str:
    """A state_dict key without the prefixes DistributedDataParallel (module.) and torch.compile
    (_orig_mod.) add."""
    while key.startswith(("module.", "_orig_mod.")):
        key = key.removeprefix("module.").removeprefix("_orig_mod.")
    return key


def _json(value):
    """`value` with tuples as lists and anything JSON cannot hold left out (None for a non-dict)."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            converted = _json(item)
            if converted is not None or item is None:
                out[str(key)] = converted
        return out
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    return value if isinstance(value, (str, int, float, bool)) or value is None else None


def _published_recipe(weights) -> dict:
    """The input recipe of torchvision weights: their eval transforms' crop size, interpolation,
    mean and std."""
    transforms = weights.transforms()
    return {
        "size": int(transforms.crop_size[0]),
        "interpolation": transforms.interpolation.value,
        "mean": tuple(transforms.mean),
        "std": tuple(transforms.std),
    }


def _timm_cached_file(name: str) -> Path:
    """The pretrained weights of `timm:NAME` in the local Hugging Face cache (nothing is
    downloaded)."""
    cfg = getattr(create_model(name), "pretrained_cfg", {}) or {}
    repo = cfg.get("hf_hub_id")
    if not repo:
        raise ModelError(
            f"{name} has no published weights on the Hugging Face hub: pass --weights FILE"
        )
    from huggingface_hub import constants, try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return Path(found)
    raise ModelError(
        f"pretrained weights for {name} not found in the Hugging Face cache {constants.HF_HUB_CACHE}: "
        f"run `huggingface-cli download {repo} model.safetensors` where there is network and copy that "
        "cache here (or set HF_HOME), or pass --weights FILE"
    )


def _torchvision_default(name: str) -> tuple[Path, dict]:
    """Where torch.hub keeps torchvision's default pretrained weights for `name`, and the builder
    arguments torchvision sets when it loads them itself (we load the file with weights_only)."""
    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, AttributeError):
        raise ModelError(
            f"torchvision has no pretrained weights for {name}: pass --weights FILE"
        ) from None
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    file = folder / Path(weights.url).name
    if not file.is_file():
        raise ModelError(
            f"pretrained weights for {name} not found: put {Path(weights.url).name} "
            f"(from {weights.url}) in {folder}, or pass --weights FILE"
        )
    kwargs: dict = {"num_classes": len(weights.meta["categories"])}
    if name in ("googlenet", "inception_v3"):
        kwargs.update(transform_input=True, aux_logits=True, init_weights=False)
    elif name.startswith("vit_"):
        kwargs["image_size"] = weights.meta["min_size"][0]
    elif name.startswith("maxvit_"):
        kwargs["input_size"] = weights.meta["min_size"]
    return file, kwargs


def load_teacher(name: str, weights: str | None = None) -> Teacher:
    """The teacher in eval mode with its weights; `weights` is a file, 'none', or None for the
    default."""
    if weights == "none":
        return Teacher(create_model(name).eval(), name, "none", None)
    if name.startswith("py:") and weights is None:  # the callable brings its own weights
        model = create_model(name)
        return Teacher(model.eval(), name, "py", state_sha256(model))
    if not name.startswith(("py:", "timm:")):
        _check_torchvision_name(name)
    published = None
    if weights is None and name.startswith("timm:"):
        file, label = _timm_cached_file(name), "timm-pretrained"
        state = read_state_dict(file)
        model = create_model(name, _classes_in(state))
    elif weights is None:
        file, kwargs = _torchvision_default(name)
        model, label = (
            torchvision.models.get_model(name, weights=None, **kwargs),
            "torchvision-default",
        )
        state = read_state_dict(file)
        published = _published_recipe(torchvision.models.get_model_weights(name).DEFAULT)
    else:
        file, label = Path(weights), str(Path(weights).resolve())
        state = read_state_dict(file)
        model = create_model(name, None if name.startswith("py:") else _classes_in(state))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0] if lines else "state_dict mismatch"
        raise ModelError(f"{file} does not fit {name}: {detail[:300]}") from None
    return Teacher(model.eval(), name, label, state_sha256(model), published)


def _classes_in(state: dict) -> int | None:
    """Number of classes of a classifier state_dict: the rows of its last 2-D weight."""
    last = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    return int(last[-1].shape[0]) if last else None


class CompiledTeacher(nn.Module):
    """`model` under torch.compile for batches of exactly `batch_size` (dynamic=False), so each
    process compiles it once: a shorter batch (a view's or a rank's last) is padded with zeros to
    that size and the padding's outputs dropped, instead of a recompile (dynamo's automatic dynamic
    shapes would compile a second, dynamic graph). The model runs in eval mode, where each row's
    output depends on that row alone."""

    def __init__(self, model: nn.Module, batch_size: int, backend="inductor"):
        super().__init__()
        self.batch_size = batch_size
        self.compiled = torch.compile(model, dynamic=False, backend=backend)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n = len(images)
        if n >= self.batch_size:
            return self.compiled(images)
        # a tensor of the same kind as a full batch (an inference tensor or not, channels_last or
        # not): any
        # difference fails a guard of the compiled graph and compiles it again
        with torch.inference_mode(images.is_inference()):
            padded = images.new_zeros((self.batch_size, *images.shape[1:]))
            if images.dim() == 4 and not images.is_contiguous():
                padded = padded.contiguous(memory_format=torch.channels_last)
            padded[:n] = images
        return self.compiled(padded)[:n]


@torch.inference_mode()
def forward(model: nn.Module, images: torch.Tensor, device: torch.device, amp: str) -> torch.Tensor:
    """A teacher's float32 logits of a batch of images, under the run's autocast and memory format.

    The one place a teacher runs: the build, online training and verify all call it.
    """
    with autocast(device, amp):
        return model(images_to(images, device)).float()


@torch.inference_mode()
def output_classes(
    model: nn.Module, image_size: int, device: torch.device, name: str = "the model"
) -> int:
    """Number of logits the model produces, from one forward pass on a blank image."""
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, 3, image_size, image_size, device=device))
    # timm asserts a fixed-size model's input size
    except (RuntimeError, AssertionError, ValueError) as exc:
        line = _first_line(exc)
        too_small = any(
            s in line.lower() for s in ("too small", "kernel size", "larger than the input")
        )
        hint = ": choose a larger --image-size" if too_small else ""
        if isinstance(exc, AssertionError):
            hint = ": it takes only the input size it was built for: leave --teacher-size out or pass that size"
        raise ModelError(
            f"{name} cannot run on a {image_size}-pixel image ({line[:300]}){hint}"
        ) from None
    return int(out.shape[-1])


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
