"""Where and how models run: device, process group (torchrun), AMP and memory format.

One policy for every stage: the build, online training and verify place a teacher the same way
(channels_last on CUDA) and run it under the same autocast.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from skd.errors import DeviceError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
# How long a rank waits in a collective before the process group gives up. torch's own default (10
# minutes for
# NCCL) is shorter than rank 0 indexing ImageNet's 1.28 million files and creating the store while
# the other
# ranks wait in a broadcast; --dist-timeout sets it.
DIST_TIMEOUT_MINUTES = 60.0
_dist_timeout = DIST_TIMEOUT_MINUTES


def set_dist_timeout(minutes: float) -> None:
    """The process-group timeout `init_distributed` uses from now on in this process
    (--dist-timeout)."""
    global _dist_timeout
    if not minutes > 0:
        raise DeviceError(f"--dist-timeout {minutes}: give a positive number of minutes")
    _dist_timeout = float(minutes)


@dataclass(frozen=True)
class Dist:
    """This process's place in the torchrun process group (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def total(self, value: int) -> int:
        """The sum of `value` over all ranks."""
        if self.world == 1:
            return value
        values: list = [None] * self.world
        dist.all_gather_object(values, value)
        return sum(values)

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (so an error found on rank 0 stops all ranks, not a
        hang)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over all ranks, in place."""
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor


def device_kind(requested: str) -> str:
    """ "cuda" or "cpu": what `--device` asks for (auto: CUDA when available)."""
    return (
        "cuda"
        if requested == "cuda" or (requested == "auto" and torch.cuda.is_available())
        else "cpu"
    )


def init_distributed(kind: str, timeout_minutes: float | None = None) -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU), with a
    collective timeout of `timeout_minutes` (default: the --dist-timeout of this process, 60
    minutes)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if kind == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: no CUDA device is available here; use --device cpu")
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise DeviceError(
            f"WORLD_SIZE={world} but {', '.join(missing)} unset: start several processes with "
            "torchrun --nproc-per-node N, or unset WORLD_SIZE"
        )
    if not dist.is_initialized():
        minutes = _dist_timeout if timeout_minutes is None else timeout_minutes
        dist.init_process_group(
            "nccl" if kind == "cuda" else "gloo", timeout=timedelta(minutes=minutes)
        )
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(requested: str, d: Dist) -> torch.device:
    """`auto`: this rank's GPU when CUDA is available, else the CPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("--device cuda: no CUDA device is available here; use --device cpu")
        torch.cuda.set_device(d.local_rank)
        return torch.device("cuda", d.local_rank)
    return torch.device(requested)


def amp_name(requested: str, device: torch.device) -> str:
    """The autocast dtype's name: `auto` is bf16 on CUDA and none elsewhere."""
    if requested == "auto":
        return "bf16" if device.type == "cuda" else "none"
    if requested not in AMP_DTYPES:
        raise DeviceError(f"--amp {requested}: choose bf16, fp16, none or auto")
    return requested


def autocast(device: torch.device, amp: str):
    """The autocast context of `amp` on `device` (a no-op for none)."""
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def place(model: nn.Module, device: torch.device) -> nn.Module:
    """The model on `device`, channels_last on CUDA (where convolutions run fastest so)."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def images_to(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch of images on `device`, channels_last on CUDA to match `place`."""
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else images
