"""How tests/store/data/format3 was written: by git ec9917e, exported and run with its own modules.

git archive ec9917e | tar -x -C /tmp/old && ln -s ../pipelines /tmp/old/skd/pipelines
cd /tmp/old && PYTHONPATH=/tmp/old:/tmp/old/tests python build_format3.py /tmp/out
"""

import sys
from pathlib import Path

import torch
import torchvision
from jpegs import make_image_folder

from skd.build import BuildConfig, build_cache

base = Path(sys.argv[1])
root = make_image_folder(base / "imagenet")
torch.manual_seed(0)
torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), base / "teacher.pth")
cfg = BuildConfig(
    teacher="resnet18",
    weights=str(base / "teacher.pth"),
    data=root,
    out=base / "format3",
    views=2,
    image_size=32,
    batch_size=8,
    codec="int8",
    loader="torchvision",
    workers=0,
    shard_rows=8,
    chunk_rows=4,
    amp="none",
    device="cpu",
    mixup=0.2,
    aa="rand-m9-n2",
    reprob=0.25,
)
print(build_cache(cfg))
