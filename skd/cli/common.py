"""What skd-cache and skd-train share: one-line user errors, finite number types, option groups, a
config made of the options set."""

from __future__ import annotations

import functools
import math
import os
import sys
from typing import Literal, get_args, get_origin

import click
from click.core import ParameterSource

from skd.config import AugmentOptions, MixOptions, TeacherInput
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


class AsTyped(click.ParamType):
    """An option of a config, passed on as typed: the config reads and checks it, and names it with
    the value as typed in its error (--mixup 1e-3, not 0.001). --help shows it as `name`."""

    def __init__(self, name: str):
        self.name = name

    def convert(self, value, param, ctx):
        return value


WHOLE, NUMBER = AsTyped("integer"), AsTyped("float")


def choices(cls, name: str) -> str:
    """The choices of a config field's Literal as --help shows them: [auto|cuda|cpu] (the config
    checks the value)."""
    annotation = cls.__pydantic_fields__[name].annotation
    literal = next(a for a in (annotation, *get_args(annotation)) if get_origin(a) is Literal)
    return "[" + "|".join(get_args(literal)) + "]"


TEACHER_INPUT_OPTIONS = [
    click.option(
        "--teacher-size",
        type=WHOLE,
        help="teacher input side in pixels; default: its pretrained_cfg, torchvision's weights, else --image-size",
    ),
    click.option(
        "--teacher-interpolation",
        metavar=choices(TeacherInput, "teacher_interpolation"),
        help="teacher resampling; default: its pretrained_cfg, torchvision's weights, else bilinear",
    ),
    click.option(
        "--teacher-mean",
        metavar="R,G,B",
        help="teacher input mean; default: its pretrained_cfg, torchvision's weights, else ImageNet's",
    ),
    click.option(
        "--teacher-std",
        metavar="R,G,B",
        help="teacher input std; default: its pretrained_cfg, torchvision's weights, else ImageNet's",
    ),
]

M = MixOptions  # option defaults come from the config, declared once
MIX_OPTIONS = [
    click.option(
        "--mixup",
        default=M.mixup,
        show_default=True,
        type=NUMBER,
        help="MixUp Beta(alpha, alpha); 0: off. Teacher and student see the same mixed image",
    ),
    click.option(
        "--cutmix",
        default=M.cutmix,
        show_default=True,
        type=NUMBER,
        help="CutMix Beta(alpha, alpha); 0: off",
    ),
    click.option(
        "--mixup-prob",
        default=M.mixup_prob,
        show_default=True,
        type=NUMBER,
        help="chance that a pair of images is mixed at all",
    ),
    click.option(
        "--mixup-switch-prob",
        default=M.mixup_switch_prob,
        show_default=True,
        type=NUMBER,
        help="chance of CutMix instead of MixUp when both are on",
    ),
]


A = AugmentOptions
AUGMENT_OPTIONS = [
    click.option(
        "--aa",
        default=A.aa,
        help="RandAugment as timm writes it, e.g. rand-m9-n2-mstd0.5-inc1, or trivial (TrivialAugmentWide); "
        "recorded per image: teacher and student see the same ops",
    ),
    click.option(
        "--reprob",
        default=A.reprob,
        show_default=True,
        type=NUMBER,
        help="random erasing probability",
    ),
    click.option(
        "--remode",
        default=A.remode,
        show_default=True,
        metavar=choices(AugmentOptions, "remode"),
        help="erased pixels: const (0 after normalisation) or rand (recorded per-channel values)",
    ),
    click.option(
        "--recount",
        default=A.recount,
        show_default=True,
        type=WHOLE,
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


def augment_options(command):
    """--aa, --reprob, --remode, --recount: timm's names and meanings (skd/plan/augment.py)."""
    return _with_options(command, AUGMENT_OPTIONS)


def options_set(options: dict) -> dict:
    """Those of the current command's `options` that the user set rather than left at their
    defaults (the config holds the defaults)."""
    ctx = click.get_current_context()
    return {
        name: value
        for name, value in options.items()
        if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT
    }


def make_config(cls, values: dict):
    """`cls(**values)` (a BuildConfig or TrainConfig checks every value and combination); a bad one
    is a usage error: one line naming the option, with where help is."""
    try:
        return cls(**values)
    except SkdError as exc:
        raise click.UsageError(str(exc), ctx=click.get_current_context()) from None


def prints_summary() -> bool:
    """Whether this process prints the command's summary: the only process, or rank 0 of a torchrun
    launch."""
    return int(os.environ.get("RANK", "0")) == 0
