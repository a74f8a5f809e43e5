"""`skd-train`: train a student from one or more caches, or online from a teacher. Parse, make the
TrainConfig (which checks every option), call the library."""

from __future__ import annotations

from pathlib import Path

import click

from skd import __version__
from skd.cli.common import (
    NUMBER,
    WHOLE,
    AsTyped,
    augment_options,
    choices,
    make_config,
    mix_options,
    options_set,
    prints_summary,
    teacher_input_options,
    user_errors,
)
from skd.cli.machine import machine_options
from skd.config import TrainConfig

T = TrainConfig  # option defaults come from the config, declared once


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="skd-train")
@click.option(
    "--cache",
    multiple=True,
    metavar="DIR|URL",
    help="cache written by skd-cache build (a folder or s3://, gs://, az:// prefix); repeat it for an "
    "ensemble of caches built on one plan",
)
@click.option(
    "--teacher-weights",
    metavar="W1,W2,...",
    help="weights of the ensemble's teachers, one per --cache (default: equal)",
)
@click.option("--teacher", help="online mode (no cache): run this teacher in the loop")
@click.option("--weights", help="teacher weights for online mode (as in skd-cache build)")
@click.option(
    "--data", help="dataset root; default: the root recorded in the cache (online mode: $SKD_DATA)"
)
@click.option(
    "--arch",
    default=T.arch,
    show_default=True,
    help="student: torchvision name, timm:NAME or py:module:callable",
)
@click.option("--epochs", default=T.epochs, show_default=True, type=WHOLE)
@click.option(
    "--batch-size",
    default=T.batch_size,
    show_default=True,
    type=WHOLE,
    help="global batch over all processes",
)
@click.option(
    "--lr", default=T.lr, show_default=True, type=NUMBER, help="learning rate per 256 images"
)
@click.option("--momentum", default=T.momentum, show_default=True, type=NUMBER)
@click.option("--weight-decay", default=T.weight_decay, show_default=True, type=NUMBER)
@click.option("--schedule", default=T.schedule, show_default=True, metavar=choices(T, "schedule"))
@click.option(
    "--milestones",
    metavar="E1,E2,...",
    help="epochs where lr drops /10; default 30%,60%,80%,90% of --epochs",
)
@click.option("--warmup-epochs", default=T.warmup_epochs, show_default=True, type=NUMBER)
@click.option("--kd", default=T.kd, show_default=True, metavar=choices(T, "kd"))
@click.option("--temperature", default=T.temperature, show_default=True, type=NUMBER)
@click.option(
    "--multiplier",
    default=T.multiplier,
    show_default=True,
    type=AsTyped("float|auto"),
    help="SKD logit multiplier, or 'auto' = mean per-sample std of the cached teacher logits",
)
@click.option(
    "--alpha",
    default=T.alpha,
    show_default=True,
    type=AsTyped("float|seed"),
    help="KD weight, or 'seed' = 0.9/0.5/0.1 at 0%/60%/80% of training",
)
@click.option("--amp", default=T.amp, show_default=True, metavar=choices(T, "amp"))
@click.option("--device", default=T.device, show_default=True, metavar=choices(T, "device"))
@click.option(
    "--loader",
    metavar=choices(T, "loader"),
    help="default: the loader recorded in the cache (online mode: dali)",
)
@click.option("--workers", default=T.workers, show_default=True, type=WHOLE)
@click.option("--out", metavar="DIR", help="run folder; default runs/<cache name>-<arch>")
@click.option("--resume", is_flag=True, help="continue the run in --out from its last checkpoint")
@click.option(
    "--overwrite",
    is_flag=True,
    help="start again in an --out that holds a run (its checkpoint is replaced)",
)
@click.option(
    "--seed",
    default=T.seed,
    show_default=True,
    type=WHOLE,
    help="seed of the student's initialisation",
)
@click.option(
    "--tensorboard", is_flag=True, help="also write TensorBoard scalars to <out>/tensorboard"
)
@click.option("--val/--no-val", default=T.val, show_default=True, help="validate after each epoch")
@click.option("--steps-per-epoch", type=WHOLE, help="stop each epoch after this many steps")
@click.option(
    "--image-size",
    type=WHOLE,
    help="student input side; default: the cache's image size (online mode: 224)",
)
@click.option(
    "--mean",
    default=",".join(map(str, T.mean)),
    show_default=True,
    metavar="R,G,B",
    help="student input mean",
)
@click.option(
    "--std",
    default=",".join(map(str, T.std)),
    show_default=True,
    metavar="R,G,B",
    help="student input std",
)
@teacher_input_options
@mix_options
@augment_options
@click.option(
    "--views",
    default=T.views,
    type=WHOLE,
    help="with --cache: train on the first N views (default all); online mode: views to plan (default 10)",
)
@click.option(
    "--plan-seed",
    default=T.plan_seed,
    show_default=True,
    type=WHOLE,
    help="online mode: the --seed of skd-cache build",
)
@machine_options
@user_errors
def train(**options):
    """Train a student from cached teacher logits with the spherical KD loss (or online with
    --teacher)."""
    from skd.models.teachers import alias
    from skd.train.loop import train as run

    options = options_set(options)
    if "cache" in options:
        options["cache"] = list(options["cache"])
    cache, teacher = options.get("cache"), options.get("teacher")
    if cache is None and teacher is None:
        raise click.UsageError(
            "pass --cache DIR (or --teacher NAME --data ROOT for online distillation)"
        )
    name = "+".join(Path(c).name for c in cache) if cache else f"online-{alias(teacher)}"
    options.setdefault("out", str(Path("runs") / f"{name}-{alias(options.get('arch', T.arch))}"))
    cfg = make_config(TrainConfig, options)
    metrics = run(cfg, progress=True, log=lambda m: click.echo(m, err=True))
    if prints_summary():
        click.echo(f"run {cfg.out}: student.pth, metrics.jsonl")
        shown = {k: v for k, v in metrics.items() if k.startswith(("val_", "train_loss"))}
        click.echo("  " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
