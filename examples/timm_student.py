"""Distil a timm student from an skd cache with timm's own training parts: its optimizer and scheduler
factories, model EMA and mixed precision. The teacher never runs: its logits come from the cache.

    python examples/timm_student.py --cache cache/r152 --model deit_tiny_patch16_224 --epochs 300 \\
        --opt adamw --lr 1e-3 --weight-decay 0.05 --batch-size 256
    torchrun --nproc-per-node 8 examples/timm_student.py --cache cache/r152 ...      # one process per GPU
    python examples/timm_student.py --cache demo/cache --model resnet18 --epochs 5 --device cpu   # after make demo

Epoch e trains on view e mod K of the cache; with several processes each reads its own part of the view.
Prints one line per epoch (mean loss, KD and CE terms, lr) and saves the EMA weights to --out.
"""

from __future__ import annotations

import argparse
import os

import timm
import torch
import torch.distributed as dist
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

import skd


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--cache", required=True, help="a cache folder or s3:// URL (skd-cache build --out)"
    )
    p.add_argument("--model", default="resnet50", help="any timm model name")
    p.add_argument(
        "--image-size", type=int, default=None, help="student input size (default: the cache's)"
    )
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=256, help="per process")
    p.add_argument("--opt", default="sgd", help="timm optimizer: sgd, adamw, lamb, ...")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--sched", default="cosine", help="timm scheduler: cosine, step, ...")
    p.add_argument("--warmup-epochs", type=int, default=0)
    p.add_argument("--ema-decay", type=float, default=0.9998)
    p.add_argument("--kd", choices=["skd", "hinton"], default="skd")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument(
        "--multiplier",
        type=float,
        default=None,
        help="SKD multiplier (default: the cache's logit std)",
    )
    p.add_argument("--alpha", type=float, default=0.9, help="weight of the KD term")
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument(
        "--loader", choices=["dali", "torchvision"], default=None, help="default: the cache's"
    )
    p.add_argument("--seed", type=int, default=0, help="of the student's initial weights")
    p.add_argument("--out", default="student_ema.pth")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if args.device == "cuda" else torch.device("cpu")
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    main_process = not distributed or dist.get_rank() == 0

    torch.manual_seed(args.seed)
    cache = skd.open_cache(args.cache)
    image_size = args.image_size or cache.image_size
    model = timm.create_model(args.model, num_classes=cache.num_classes).to(device)
    ema = ModelEmaV3(model, decay=args.ema_decay)
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
    if args.kd == "skd":
        multiplier = args.multiplier or cache.multiplier()
        kd = skd.SphericalKD(
            args.temperature, multiplier, args.alpha, teacher_normalized=cache.teacher_normalized
        )
    else:
        kd = skd.HintonKD(args.temperature, args.alpha)

    def loader(epoch: int):
        return cache.loader(
            epoch,
            batch_size=args.batch_size,
            image_size=image_size,
            device=device,
            loader=args.loader,
            workers=args.workers,
        )

    steps_per_epoch = len(loader(0))
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay)
    scheduler, epochs = create_scheduler_v2(
        optimizer,
        sched=args.sched,
        num_epochs=args.epochs,
        warmup_epochs=args.warmup_epochs,
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)

    updates = 0
    for epoch in range(epochs):
        model.train()
        # loss, kd, ce (image-weighted), images
        sums = torch.zeros(4, dtype=torch.float64, device=device)
        for images, labels, logits in loader(epoch):
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                output = model(images)
            parts = kd.parts(output, logits, labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(parts.loss).backward()
            scaler.step(optimizer)
            scaler.update()
            updates += 1
            scheduler.step_update(num_updates=updates)
            ema.update(model.module if distributed else model, step=updates)
            terms = torch.stack(
                [parts.loss.detach(), parts.kd, parts.ce, torch.ones((), device=device)]
            )
            sums += terms.double() * len(images)
        scheduler.step(epoch + 1)
        if distributed:
            dist.all_reduce(sums)
        if main_process:
            loss, kd_term, ce_term = (sums[:3] / sums[3]).tolist()
            lr = optimizer.param_groups[0]["lr"]
            print(
                f"epoch {epoch} loss {loss:.4f} kd {kd_term:.4f} ce {ce_term:.4f} lr {lr:.3g}",
                flush=True,
            )
    if main_process:
        torch.save(ema.module.state_dict(), args.out)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
