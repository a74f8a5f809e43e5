"""What skd-cache and skd-train share: one-line user errors, finite number types, option groups, the
dataset root."""

from __future__ import annotations

import functools
import math
import os
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from skd.errors import SkdError, Terminated
from skd.storage.objectstore import StoreUnreachable, store_failure

# how to continue a command stopped part way (Ctrl-C, SIGTERM, a failed object store): its work so
# far is kept
CONTINUE_HINTS = {
    "build": ": rerun the same command to resume",
    "recode": ": rerun the same command to resume",
    "train": ": rerun the same command with --resume to continue from the last finished epoch",
}


def user_errors(fn):
    """Turn the library's user-facing errors into one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SkdError as exc:
            hint = CONTINUE_HINTS.get(fn.__name__, "") if isinstance(exc, StoreUnreachable) else ""
            click.echo(f"error: {exc}{hint}", err=True)
            sys.exit(2)
        except Exception as exc:  # an object store that failed inside zarr or zarrs
            failure = store_failure(exc)
            if failure is None:
                raise
            click.echo(f"error: {failure}{CONTINUE_HINTS.get(fn.__name__, '')}", err=True)
            sys.exit(2)
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM as Terminated
            stopped = "terminated" if isinstance(exc, Terminated) else "interrupted"
            click.echo(f"{stopped}{CONTINUE_HINTS.get(fn.__name__, '')}", err=True)
            # The library's finally blocks have run (lock released, writes aborted). Skip
            # interpreter shutdown:
            # zarr's event-loop thread would print its cut-off tasks' tracebacks under the line
            # above.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(143 if isinstance(exc, Terminated) else 130)

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


def rgb(ctx, param, value: str | None):
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


PROBABILITY = FiniteFloat(min=0, max=1)

TEACHER_INPUT_OPTIONS = [
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
        callback=rgb,
        metavar="R,G,B",
        help="teacher input mean; default: its pretrained_cfg, torchvision's weights, else ImageNet's",
    ),
    click.option(
        "--teacher-std",
        callback=rgb,
        metavar="R,G,B",
        help="teacher input std; default: its pretrained_cfg, torchvision's weights, else ImageNet's",
    ),
]

MIX_OPTIONS = [
    click.option(
        "--mixup",
        default=0.0,
        show_default=True,
        type=NON_NEGATIVE,
        help="MixUp Beta(alpha, alpha); 0: off. Teacher and student see the same mixed image",
    ),
    click.option(
        "--cutmix",
        default=0.0,
        show_default=True,
        type=NON_NEGATIVE,
        help="CutMix Beta(alpha, alpha); 0: off",
    ),
    click.option(
        "--mixup-prob",
        default=1.0,
        show_default=True,
        type=PROBABILITY,
        help="chance that a pair of images is mixed at all",
    ),
    click.option(
        "--mixup-switch-prob",
        default=0.5,
        show_default=True,
        type=PROBABILITY,
        help="chance of CutMix instead of MixUp when both are on",
    ),
]


AUGMENT_OPTIONS = [
    click.option(
        "--aa",
        default=None,
        help="RandAugment as timm writes it, e.g. rand-m9-n2-mstd0.5-inc1, or trivial (TrivialAugmentWide); "
        "recorded per image: teacher and student see the same ops",
    ),
    click.option(
        "--reprob",
        default=0.0,
        show_default=True,
        type=PROBABILITY,
        help="random erasing probability",
    ),
    click.option(
        "--remode",
        default="const",
        show_default=True,
        type=click.Choice(["const", "rand", "pixel"]),
        help="erased pixels: const (0 after normalisation) or rand (recorded per-channel values)",
    ),
    click.option(
        "--recount",
        default=1,
        show_default=True,
        type=click.IntRange(min=1),
        help="at most this many erased boxes",
    ),
]


def _with_options(command, options: list):
    """Apply click options to a command so that --help lists them in the given order."""
    for option in reversed(options):
        command = option(command)
    return command


def teacher_input_options(command):
    """--teacher-size, --teacher-interpolation, --teacher-mean, --teacher-std (skd.models.recipe
    resolves the rest)."""
    return _with_options(command, TEACHER_INPUT_OPTIONS)


def mix_options(command):
    """--mixup, --cutmix, --mixup-prob, --mixup-switch-prob: timm's names and meanings
    (skd/plan/mixing.py)."""
    return _with_options(command, MIX_OPTIONS)


# the plan options --mixup ... and --aa ... add, by parameter name (refused beside what replays a
# recorded plan)
MIX_AND_AUGMENT = (
    "mixup",
    "cutmix",
    "mixup_prob",
    "mixup_switch_prob",
    "aa",
    "reprob",
    "remode",
    "recount",
)


def augment_options(command):
    """--aa, --reprob, --remode, --recount: timm's names and meanings (skd/plan/augment.py)."""
    return _with_options(command, AUGMENT_OPTIONS)


def options_given(names: tuple[str, ...]) -> list[str]:
    """Which of the current command's options `names` the user set rather than left at their
    default, in the order of `names`, as typed (--no-val, not --val, for a flag turned off)."""
    ctx = click.get_current_context()
    params = {param.name: param for param in ctx.command.params}
    given = []
    for name in names:
        if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT:
            param = params[name]
            negated = bool(param.secondary_opts) and ctx.params[name] is False
            given.append((param.secondary_opts if negated else param.opts)[0])
    return given


def data_root(data: str | None) -> Path:
    """--data, else $SKD_DATA: the dataset root, which has no default."""
    data = data or os.environ.get("SKD_DATA")
    if not data:
        raise click.UsageError("no dataset: pass --data ROOT or set SKD_DATA")
    return Path(data)


def prints_summary() -> bool:
    """Whether this process prints the command's summary: the only process, or rank 0 of a torchrun
    launch."""
    return int(os.environ.get("RANK", "0")) == 0
