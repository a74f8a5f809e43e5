"""Command lines: `skd-cache` (build, info, stats, verify) and `skd-train`. Parse, validate, call the library."""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import warnings
from pathlib import Path

import click

from . import __version__
from .codecs import CODECS
from .config import BuildConfig, TrainConfig
from .errors import SkdError, SkdWarning

DATA_HELP = "dataset root holding train/<class>/<images> (and val/); default: $SKD_DATA"


def user_errors(fn):
    """Turn the library's user-facing errors into one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SkdError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            hints = {
                "build": ": rerun the same command to resume",
                "train": ": rerun the same command with --resume to continue from the last finished epoch",
            }
            click.echo(f"interrupted{hints.get(fn.__name__, '')}", err=True)
            # The library's finally blocks have run (lock released, writes aborted). Skip interpreter shutdown:
            # zarr's event-loop thread would print its cut-off tasks' tracebacks under the line above.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)

    return wrapper


class FiniteFloat(click.FloatRange):
    """A float range that also refuses nan and inf, which would train silently to NaN weights."""

    name = "finite float range"

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f"{value} is not a finite number", param, ctx)
        return value


POSITIVE = FiniteFloat(min=0, min_open=True)
NON_NEGATIVE = FiniteFloat(min=0)


def _rgb(ctx, param, value: str | None):
    """R,G,B as three finite floats (a std: each above 0)."""
    if value is None:
        return None
    try:
        values = tuple(float(v) for v in value.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise click.BadParameter(f"{value!r}: three numbers R,G,B, e.g. 0.5,0.5,0.5")
    if param.name.endswith("std") and min(values) <= 0:
        raise click.BadParameter(f"{value!r}: every value must be above 0")
    return values


def teacher_input_options(command):
    """--teacher-size, --teacher-interpolation, --teacher-mean, --teacher-std (skd/recipe.py resolves the rest)."""
    options = [
        click.option(
            "--teacher-size",
            type=click.IntRange(min=8),
            help="teacher input side in pixels; default: its pretrained_cfg, torchvision's weights, else --image-size",
        ),
        click.option(
            "--teacher-interpolation",
            type=click.Choice(["bilinear", "bicubic"]),
            help="teacher resampling; default: its pretrained_cfg, torchvision's weights, else bilinear",
        ),
        click.option(
            "--teacher-mean",
            callback=_rgb,
            metavar="R,G,B",
            help="teacher input mean; default: its pretrained_cfg, torchvision's weights, else ImageNet's",
        ),
        click.option(
            "--teacher-std",
            callback=_rgb,
            metavar="R,G,B",
            help="teacher input std; default: its pretrained_cfg, torchvision's weights, else ImageNet's",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def mix_options(command):
    """--mixup, --cutmix, --mixup-prob, --mixup-switch-prob: timm's names and meanings (skd/mixing.py)."""
    probability = FiniteFloat(min=0, max=1)
    options = [
        click.option(
            "--mixup",
            default=0.0,
            show_default=True,
            type=NON_NEGATIVE,
            help="MixUp Beta(alpha, alpha); 0: off. Teacher and student see the same mixed image",
        ),
        click.option(
            "--cutmix", default=0.0, show_default=True, type=NON_NEGATIVE, help="CutMix Beta(alpha, alpha); 0: off"
        ),
        click.option(
            "--mixup-prob",
            default=1.0,
            show_default=True,
            type=probability,
            help="chance that a pair of images is mixed at all",
        ),
        click.option(
            "--mixup-switch-prob",
            default=0.5,
            show_default=True,
            type=probability,
            help="chance of CutMix instead of MixUp when both are on",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def data_root(data: str | None) -> Path:
    data = data or os.environ.get("SKD_DATA")
    if not data:
        raise click.UsageError("no dataset: pass --data ROOT or set SKD_DATA")
    return Path(data)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="skd-cache")
def cache():
    """Build and inspect offline teacher-logit caches for spherical knowledge distillation."""


B = BuildConfig  # option defaults come from the config, declared once


@cache.command()
@click.option("--teacher", required=True, help="torchvision model name (resnet152), timm:NAME or py:module:callable")
@click.option(
    "--weights",
    help="state_dict file; 'none' for random init; default: torchvision's pretrained file "
    "(a py: teacher: the weights its callable builds)",
)
@click.option("--data", help=DATA_HELP)
@click.option(
    "--out",
    metavar="DIR|URL",
    help="cache folder or object-store prefix (s3://BUCKET/PREFIX, gs://, az://); "
    "default cache/<alias> (resnet152 -> cache/r152)",
)
@click.option(
    "--views",
    default=B.views,
    show_default=True,
    type=click.IntRange(min=1),
    help="augmented views (epochs' worth) to cache",
)
@click.option(
    "--image-size",
    default=B.image_size,
    show_default=True,
    type=click.IntRange(min=8),
    help="the student's input side: the cache's default for skd-train",
)
@teacher_input_options
@mix_options
@click.option("--batch-size", default=B.batch_size, show_default=True, type=click.IntRange(min=1))
@click.option("--codec", default=B.codec, show_default=True, type=click.Choice(list(CODECS)))
@click.option(
    "--amp",
    default=B.amp,
    show_default=True,
    type=click.Choice(["auto", "bf16", "fp16", "none"]),
    help="autocast dtype of the teacher; auto = bf16 on CUDA, none on CPU",
)
@click.option("--device", default=B.device, show_default=True, type=click.Choice(["auto", "cuda", "cpu"]))
@click.option("--loader", default=B.loader, show_default=True, type=click.Choice(["dali", "torchvision"]))
@click.option("--seed", default=B.seed, show_default=True, type=int, help="seed of the augmentation plan")
@click.option(
    "--workers", default=B.workers, show_default=True, type=click.IntRange(min=0), help="decoding threads/processes"
)
@click.option(
    "--shard-size",
    "shard_rows",
    default=B.shard_rows,
    show_default=True,
    type=click.IntRange(min=1),
    help="rows per shard: the unit of writing and of resuming",
)
@click.option(
    "--chunk-size",
    "chunk_rows",
    default=B.chunk_rows,
    show_default=True,
    type=click.IntRange(min=1),
    help="rows per chunk inside a shard: the unit of reading",
)
@click.option(
    "--plan-from",
    metavar="DIR|URL",
    help="take the samples and the whole recorded plan of this cache (views, windows, flips, mixing, "
    "image size): a second teacher on identical views",
)
@click.option("--compile", is_flag=True, help="torch.compile the teacher")
@click.option(
    "--overwrite",
    is_flag=True,
    help="delete an existing cache at --out and rebuild (never a folder that is not a cache)",
)
@click.option("--val/--no-val", default=B.val, show_default=True, help="cache centre-crop logits of ROOT/val")
@click.option(
    "--on-bad-image",
    default=B.on_bad_image,
    show_default=True,
    type=click.Choice(["error", "skip"]),
    help="error: list every unreadable or truncated image and stop before any teacher work; "
    "skip: leave them out (recorded in the cache, shown by skd-cache info)",
)
@user_errors
def build(data, out, **options):
    """Run the teacher over recorded augmented views and store its logits (resumable)."""
    from .build import build_cache, summary_lines
    from .teachers import alias

    if options["plan_from"] is not None:
        ctx = click.get_current_context()
        plan_options = (
            "views",
            "image_size",
            "seed",
            "loader",
            "val",
            "mixup",
            "cutmix",
            "mixup_prob",
            "mixup_switch_prob",
        )
        given = [
            f"--{'no-val' if name == 'val' else name.replace('_', '-')}"
            for name in plan_options
            if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
        ]
        if given:
            raise click.UsageError(
                f"{', '.join(given)}: --plan-from takes the whole plan of its cache (see "
                "skd-cache info); only the teacher, its input and the codec may differ"
            )
    options["chunk_rows"] = min(options["chunk_rows"], options["shard_rows"])
    if options["shard_rows"] % options["chunk_rows"]:
        raise click.BadParameter(
            f"{options['shard_rows']} is not a multiple of --chunk-size {options['chunk_rows']}",
            param_hint="--shard-size",
        )
    cfg = BuildConfig(data=data_root(data), out=out or Path("cache") / alias(options["teacher"]), **options)
    summary = build_cache(cfg, progress=True)
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(f"cache {cfg.out}")
        for line in summary_lines(summary):
            click.echo(f"  {line}")


CACHE_DIR = click.argument("cache_dir", metavar="DIR|URL")
JSON = click.option("--json", "as_json", is_flag=True, help="print one JSON document instead of text")


def _views(value: str) -> list[int] | None:
    if value == "all":
        return None
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter("'all' or comma-separated view numbers, e.g. 0,3") from None


@cache.command()
@CACHE_DIR
@JSON
@user_errors
def info(cache_dir, as_json):
    """What a cache holds and costs: teacher, dataset, plan, codec, completion, bytes (unfinished caches too)."""
    from .info import describe, info_lines
    from .store import open_store

    report = describe(open_store(cache_dir))
    click.echo(json.dumps(report, indent=2) if as_json else "\n".join(info_lines(report)))


@cache.command()
@click.argument("cache_dirs", metavar="DIR|URL [DIR|URL ...]", nargs=-1, required=True)
@click.option(
    "--views",
    default="0",
    show_default=True,
    callback=lambda c, p, v: _views(v),
    help="views to read: 'all' or comma-separated numbers, e.g. 0,3",
)
@click.option("--no-val", is_flag=True, help="skip the validation logits (val/)")
@click.option(
    "--temperature",
    default=4.0,
    show_default=True,
    type=POSITIVE,
    help="T of the SKD target softmax(layer_norm(logits) * m / T) whose confidence is reported",
)
@click.option(
    "--multiplier",
    default=2.0,
    show_default=True,
    type=POSITIVE,
    help="m of that SKD target (the suggested m, --multiplier auto, is reported from view 0)",
)
@JSON
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    help="also write histograms of std, max-probability and per-class accuracy to this PNG",
)
@user_errors
def stats(cache_dirs, views, no_val, temperature, multiplier, as_json, plot):
    """Teacher accuracy, logit scale, confidence, calibration, view consistency and storage cost of a cache;
    of several caches on one plan, the teachers compared on identical views."""
    from .stats import check_plot_path, logit_stats, plot_stats, stats_lines
    from .store import open_store

    if len(cache_dirs) > 1:
        from .compare import compare_lines, compare_teachers

        report = compare_teachers([open_store(d) for d in cache_dirs], views, progress=True)
        click.echo(json.dumps(report, indent=2) if as_json else "\n".join(compare_lines(report)))
        return
    if plot is not None:
        check_plot_path(plot)
    report = logit_stats(
        open_store(cache_dirs[0]), views, val=not no_val, temperature=temperature, multiplier=multiplier, progress=True
    )
    if plot is not None:
        plot_stats(report, plot)
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else "\n".join(stats_lines(report)))


@cache.command()
@CACHE_DIR
@click.option(
    "--samples",
    default=256,
    show_default=True,
    type=click.IntRange(min=1),
    help="stored rows (views and val) to re-compute, drawn at random",
)
@click.option("--data", help="dataset root; default: the root recorded in the cache")
@click.option("--weights", help="teacher weights file; default: the file recorded in the cache")
@click.option("--loader", type=click.Choice(["dali", "torchvision"]), help="default: the loader recorded in the cache")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda", "auto"]))
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=0))
@click.option("--seed", default=0, show_default=True, type=int, help="seed of the random choice of rows")
@click.option(
    "--tolerance",
    default=1e-2,
    show_default=True,
    type=NON_NEGATIVE,
    help="KL (T=4, m=2) above which a re-computed row differs from the stored one",
)
@click.option("--integrity", is_flag=True, help="also read every chunk and report those that fail to decode")
@JSON
@user_errors
def verify(cache_dir, samples, data, weights, loader, device, batch_size, workers, seed, tolerance, integrity, as_json):
    """Check a cache against its data and teacher: fingerprint, weights, re-computed rows (exit 1 on mismatch)."""
    from .store import open_store
    from .verify import report_lines, verify_cache

    report = verify_cache(
        open_store(cache_dir),
        data=Path(data) if data else None,
        weights=weights,
        samples=samples,
        loader=loader,
        device=device,
        batch_size=batch_size,
        workers=workers,
        seed=seed,
        tolerance=tolerance,
        integrity=integrity,
        progress=True,
    )
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        click.echo("\n".join(report_lines(report)))
    if not report.ok:
        click.echo(f"error: cache {cache_dir} does not match: {report.cause} (details above)", err=True)
        sys.exit(1)


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
@click.option("--data", help="dataset root; default: the root recorded in the cache (online mode: $SKD_DATA)")
@click.option(
    "--arch", default=T.arch, show_default=True, help="student: torchvision name, timm:NAME or py:module:callable"
)
@click.option("--epochs", default=T.epochs, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--batch-size",
    default=T.batch_size,
    show_default=True,
    type=click.IntRange(min=1),
    help="global batch over all processes",
)
@click.option("--lr", default=T.lr, show_default=True, type=NON_NEGATIVE, help="learning rate per 256 images")
@click.option("--momentum", default=T.momentum, show_default=True, type=NON_NEGATIVE)
@click.option("--weight-decay", default=T.weight_decay, show_default=True, type=NON_NEGATIVE)
@click.option("--schedule", default=T.schedule, show_default=True, type=click.Choice(["step", "cosine"]))
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
@click.option("--amp", default=T.amp, show_default=True, type=click.Choice(["auto", "bf16", "fp16", "none"]))
@click.option("--device", default=T.device, show_default=True, type=click.Choice(["auto", "cuda", "cpu"]))
@click.option(
    "--loader",
    type=click.Choice(["dali", "torchvision"]),
    help="default: the loader recorded in the cache (online mode: dali)",
)
@click.option("--workers", default=T.workers, show_default=True, type=click.IntRange(min=0))
@click.option("--out", type=click.Path(path_type=Path), help="run folder; default runs/<cache name>-<arch>")
@click.option("--resume", is_flag=True, help="continue the run in --out from its last checkpoint")
@click.option("--overwrite", is_flag=True, help="start again in an --out that holds a run (its checkpoint is replaced)")
@click.option("--seed", default=T.seed, show_default=True, type=int, help="seed of the student's initialisation")
@click.option("--tensorboard", is_flag=True, help="also write TensorBoard scalars to <out>/tensorboard")
@click.option("--val/--no-val", default=T.val, show_default=True, help="validate after each epoch")
@click.option("--steps-per-epoch", type=click.IntRange(min=1), help="stop each epoch after this many steps")
@click.option(
    "--image-size",
    type=click.IntRange(min=8),
    help="student input side; default: the cache's image size (online mode: 224)",
)
@click.option(
    "--mean",
    default=",".join(map(str, T.mean)),
    show_default=True,
    callback=_rgb,
    metavar="R,G,B",
    help="student input mean",
)
@click.option(
    "--std",
    default=",".join(map(str, T.std)),
    show_default=True,
    callback=_rgb,
    metavar="R,G,B",
    help="student input std",
)
@teacher_input_options
@mix_options
@click.option(
    "--views", default=T.views, show_default=True, type=click.IntRange(min=1), help="online mode: plan option"
)
@click.option(
    "--plan-seed", default=T.plan_seed, show_default=True, type=int, help="online mode: the --seed of skd-cache build"
)
@user_errors
def train(cache, teacher, data, out, **options):
    """Train a student from cached teacher logits with the spherical KD loss (or online with --teacher)."""
    from .teachers import alias
    from .train import train as run

    cache = list(cache) or None
    if cache is None and teacher is None:
        raise click.UsageError("pass --cache DIR (or --teacher NAME --data ROOT for online distillation)")
    if cache is not None and teacher is not None:
        raise click.UsageError("--cache and --teacher exclude each other: the cache already holds the teacher")
    if options["resume"] and options["overwrite"]:
        raise click.UsageError("--resume and --overwrite exclude each other: continue the run or start it again")
    if cache is not None:
        ctx = click.get_current_context()
        online_only = (
            "views",
            "plan_seed",
            "teacher_size",
            "teacher_interpolation",
            "teacher_mean",
            "teacher_std",
            "mixup",
            "cutmix",
            "mixup_prob",
            "mixup_switch_prob",
        )
        given = [
            f"--{name.replace('_', '-')}"
            for name in online_only
            if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
        ]
        if given:
            raise click.UsageError(
                f"{', '.join(given)}: online mode only; a cache replays the plan and teacher "
                "input it was built with, which skd-cache info shows"
            )
    if teacher is not None:
        data = data_root(data)
    name = "+".join(Path(c).name for c in cache) if cache is not None else f"online-{alias(teacher)}"
    cfg = TrainConfig(
        cache=cache,
        teacher=teacher,
        data=Path(data) if data else None,
        out=out or Path("runs") / f"{name}-{alias(options['arch'])}",
        **options,
    )
    metrics = run(cfg, progress=True, log=lambda m: click.echo(m, err=True))
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(f"run {cfg.out}: student.pth, metrics.jsonl")
        shown = {k: v for k, v in metrics.items() if k.startswith(("val_", "train_loss"))}
        click.echo("  " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """skd's warnings as one `warning:` line (others as Python prints them)."""
    if issubclass(category, SkdWarning):
        click.echo(f"warning: {message}", err=True)
    else:
        click.echo(warnings.formatwarning(message, category, filename, lineno, line).rstrip(), err=True)


def run_command(command: click.Command, prog_name: str) -> None:
    """Run a click command; a usage mistake is one `error:` line naming the option and where help is."""
    warnings.showwarning = show_warning
    try:
        command.main(prog_name=prog_name, standalone_mode=False)
    except getattr(click.exceptions, "NoArgsIsHelpError", ()) as exc:  # click >= 8.2: the group's help
        exc.show()
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else prog_name
        click.echo(f"error: {exc.format_message().rstrip('.')} (see {where} --help)", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)


def main_cache():
    run_command(cache, "skd-cache")


def main_train():
    run_command(train, "skd-train")


if __name__ == "__main__":
    main_cache()
