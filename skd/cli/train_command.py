"""`skd-train`: train a student from one or more caches, or online from a teacher. Parse, validate,
call the library."""

from __future__ import annotations

import math
from pathlib import Path

import click

from skd import __version__
from skd.cli.common import (
    MIX_AND_AUGMENT,
    NON_NEGATIVE,
    POSITIVE,
    augment_options,
    data_root,
    mix_options,
    options_given,
    prints_summary,
    rgb,
    teacher_input_options,
    user_errors,
)
from skd.cli.machine import machine_options
from skd.config import TrainConfig

# The options of online distillation: a cache replays the plan and teacher input it was built with.
ONLINE_ONLY_OPTIONS = (
    "plan_seed",
    "teacher_size",
    "teacher_interpolation",
    "teacher_mean",
    "teacher_std",
    *MIX_AND_AUGMENT,
)


def _multiplier(value: str) -> str:
    if value != "auto":
        try:
            if not (math.isfinite(float(value)) and float(value) > 0):
                raise ValueError
        except ValueError:
            raise click.BadParameter("a finite number above 0, or 'auto'") from None
    return value


def _alpha(value: str) -> str:
    if value != "seed":
        try:
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError
        except ValueError:
            raise click.BadParameter("a number in [0, 1] or 'seed'") from None
    return value


def _numbers(value: str | None) -> list[float] | None:
    if not value:
        return None
    try:
        numbers = [float(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter("comma-separated numbers, e.g. 0.5,0.5") from None
    if not all(math.isfinite(n) and n >= 0 for n in numbers) or sum(numbers) <= 0:
        raise click.BadParameter(f"{value!r}: numbers >= 0, not all 0")
    return numbers


def _milestones(value: str | None) -> list[int] | None:
    if not value:
        return None
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter("comma-separated epochs, e.g. 30,60,80,90") from None


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
    callback=lambda c, p, v: _numbers(v),
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
@click.option("--epochs", default=T.epochs, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--batch-size",
    default=T.batch_size,
    show_default=True,
    type=click.IntRange(min=1),
    help="global batch over all processes",
)
@click.option(
    "--lr", default=T.lr, show_default=True, type=NON_NEGATIVE, help="learning rate per 256 images"
)
@click.option("--momentum", default=T.momentum, show_default=True, type=NON_NEGATIVE)
@click.option("--weight-decay", default=T.weight_decay, show_default=True, type=NON_NEGATIVE)
@click.option(
    "--schedule", default=T.schedule, show_default=True, type=click.Choice(["step", "cosine"])
)
@click.option(
    "--milestones",
    callback=lambda c, p, v: _milestones(v),
    help="epochs where lr drops /10; default 30%,60%,80%,90% of --epochs",
)
@click.option("--warmup-epochs", default=T.warmup_epochs, show_default=True, type=NON_NEGATIVE)
@click.option("--kd", default=T.kd, show_default=True, type=click.Choice(["skd", "hinton", "none"]))
@click.option("--temperature", default=T.temperature, show_default=True, type=POSITIVE)
@click.option(
    "--multiplier",
    default=T.multiplier,
    show_default=True,
    callback=lambda c, p, v: _multiplier(v),
    help="SKD logit multiplier, or 'auto' = mean per-sample std of the cached teacher logits",
)
@click.option(
    "--alpha",
    default=T.alpha,
    show_default=True,
    callback=lambda c, p, v: _alpha(v),
    help="KD weight, or 'seed' = 0.9/0.5/0.1 at 0%/60%/80% of training",
)
@click.option(
    "--amp", default=T.amp, show_default=True, type=click.Choice(["auto", "bf16", "fp16", "none"])
)
@click.option(
    "--device", default=T.device, show_default=True, type=click.Choice(["auto", "cuda", "cpu"])
)
@click.option(
    "--loader",
    type=click.Choice(["dali", "torchvision"]),
    help="default: the loader recorded in the cache (online mode: dali)",
)
@click.option("--workers", default=T.workers, show_default=True, type=click.IntRange(min=0))
@click.option(
    "--out", type=click.Path(path_type=Path), help="run folder; default runs/<cache name>-<arch>"
)
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
    type=int,
    help="seed of the student's initialisation",
)
@click.option(
    "--tensorboard", is_flag=True, help="also write TensorBoard scalars to <out>/tensorboard"
)
@click.option("--val/--no-val", default=T.val, show_default=True, help="validate after each epoch")
@click.option(
    "--steps-per-epoch", type=click.IntRange(min=1), help="stop each epoch after this many steps"
)
@click.option(
    "--image-size",
    type=click.IntRange(min=8),
    help="student input side; default: the cache's image size (online mode: 224)",
)
@click.option(
    "--mean",
    default=",".join(map(str, T.mean)),
    show_default=True,
    callback=rgb,
    metavar="R,G,B",
    help="student input mean",
)
@click.option(
    "--std",
    default=",".join(map(str, T.std)),
    show_default=True,
    callback=rgb,
    metavar="R,G,B",
    help="student input std",
)
@teacher_input_options
@mix_options
@augment_options
@click.option(
    "--views",
    default=T.views,
    type=click.IntRange(min=1),
    help="with --cache: train on the first N views (default all); online mode: views to plan (default 10)",
)
@click.option(
    "--plan-seed",
    default=T.plan_seed,
    show_default=True,
    type=int,
    help="online mode: the --seed of skd-cache build",
)
@machine_options
@user_errors
def train(cache, teacher, data, out, **options):
    """Train a student from cached teacher logits with the spherical KD loss (or online with
    --teacher)."""
    from skd.models.teachers import alias
    from skd.train.loop import train as run

    cache = list(cache) or None
    if cache is None and teacher is None:
        raise click.UsageError(
            "pass --cache DIR (or --teacher NAME --data ROOT for online distillation)"
        )
    if cache is not None and teacher is not None:
        raise click.UsageError(
            "--cache and --teacher exclude each other: the cache already holds the teacher"
        )
    if options["resume"] and options["overwrite"]:
        raise click.UsageError(
            "--resume and --overwrite exclude each other: continue the run or start it again"
        )
    given = options_given(ONLINE_ONLY_OPTIONS) if cache is not None else []
    if given:
        raise click.UsageError(
            f"{', '.join(given)}: online mode only; a cache replays the plan and teacher "
            "input it was built with, which skd-cache info shows"
        )
    if teacher is not None:
        data = data_root(data)
    name = (
        "+".join(Path(c).name for c in cache) if cache is not None else f"online-{alias(teacher)}"
    )
    cfg = TrainConfig(
        cache=cache,
        teacher=teacher,
        data=Path(data) if data else None,
        out=out or Path("runs") / f"{name}-{alias(options['arch'])}",
        **options,
    )
    metrics = run(cfg, progress=True, log=lambda m: click.echo(m, err=True))
    if prints_summary():
        click.echo(f"run {cfg.out}: student.pth, metrics.jsonl")
        shown = {k: v for k, v in metrics.items() if k.startswith(("val_", "train_loss"))}
        click.echo("  " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
