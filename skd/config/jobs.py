"""BuildConfig and TrainConfig, and the option groups they share: every default and every check of
what `skd-cache build` and `skd-train` take (skd.config)."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, model_validator
from pydantic.dataclasses import dataclass
from pydantic_core import ArgsKwargs

from skd.config.fields import (
    ALPHA,
    CHECKED,
    PROBABILITY,
    RGB,
    Place,
    Positive,
    PositiveRGB,
    Resumed,
    as_typed,
    changed,
    checked,
    comma_items,
    dataset_root,
    place_text,
    typed,
)
from skd.errors import OptionError
from skd.pipelines import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS
from skd.plan.augment import AugmentParams
from skd.plan.crops import CropParams
from skd.plan.mixing import MixParams


@dataclass(kw_only=True, config=CHECKED)
class TeacherInput:
    """Explicit options of the teacher's input recipe; None: from its pretrained_cfg, torchvision's
    weights, else ImageNet's statistics, bilinear, at the student's size (see skd/models/recipe.py)."""

    teacher_size: Annotated[int, Field(ge=8)] | None = None
    teacher_interpolation: Literal[INTERPOLATIONS] | None = None  # type: ignore[valid-type]
    teacher_mean: RGB | None = None
    teacher_std: PositiveRGB | None = None

    def teacher_recipe_options(self) -> dict:
        """The options given, by recipe field name (size, interpolation, mean, std)."""
        return {
            f.name.removeprefix("teacher_"): getattr(self, f.name)
            for f in dataclasses.fields(TeacherInput)
        }


@dataclass(kw_only=True, config=CHECKED)
class MixOptions:
    """MixUp / CutMix recorded in the plan, timm's option names and meanings (skd/plan/mixing.py)."""

    mixup: Annotated[float, ALPHA] = 0.0  # Beta(alpha, alpha) of MixUp; 0: off
    cutmix: Annotated[float, ALPHA] = 0.0  # Beta(alpha, alpha) of CutMix; 0: off
    mixup_prob: Annotated[float, PROBABILITY] = 1.0  # chance that a pair is mixed at all
    # chance of CutMix instead of MixUp when both are on
    mixup_switch_prob: Annotated[float, PROBABILITY] = 0.5

    def mix_params(self) -> MixParams:
        return MixParams(
            mixup_alpha=self.mixup,
            cutmix_alpha=self.cutmix,
            prob=self.mixup_prob,
            switch_prob=self.mixup_switch_prob,
        )

    def odd_for_mixing(self, **sizes: int) -> None:
        """OptionError naming the odd ones of `sizes` (batch_size=..., by field) when the options mix:
        a mixed plan pairs positions 2i and 2i + 1, and a pair must share a batch."""
        odd = [as_typed(name, size) for name, size in sizes.items() if size % 2]
        if odd and self.mix_params().enabled:
            raise OptionError(
                f"{', '.join(odd)}: mixing pairs positions 2i and 2i + 1 in one batch: pass an even "
                "number"
            )


def _augment_spec(aa):
    """--aa as the plan parses it: OptionError naming the option for a spec it cannot record."""
    if isinstance(aa, str):
        AugmentParams(aa=aa).check()
    return aa


def _remode(value):
    """--remode pixel refused with the reason (other names: the Literal's one of const, rand)."""
    if value == "pixel":
        raise ValueError(
            "per-pixel noise cannot be the same image at the teacher's and the student's input "
            "size; use const or rand (one recorded value per box and channel)"
        )
    return value


@dataclass(kw_only=True, config=CHECKED)
class AugmentOptions:
    """RandAugment and random erasing recorded in the plan, timm's option names and meanings
    (skd/plan/augment.py)."""

    # RandAugment, e.g. rand-m9-n2-mstd0.5-inc1, or trivial; None: off
    aa: Annotated[str | None, BeforeValidator(_augment_spec)] = None
    # random erasing probability; 0: off
    reprob: Annotated[
        float, Field(ge=0, le=1, description="a probability between 0 and 1 (0 turns erasing off)")
    ] = 0.0
    # const (0 in the normalised image) or rand (recorded per-channel values)
    remode: Annotated[Literal["const", "rand"], BeforeValidator(_remode)] = "const"
    # at most this many erased boxes per image
    recount: Annotated[int, Field(ge=1, description="a whole number of boxes, at least 1")] = 1

    def augment_params(self) -> AugmentParams:
        return AugmentParams(
            aa=self.aa, reprob=self.reprob, remode=self.remode, recount=self.recount
        )


# the plan options --mixup ... and --aa ... add, by field (refused beside what replays a recorded
# plan)
MIX_AND_AUGMENT = tuple(f.name for c in (MixOptions, AugmentOptions) for f in dataclasses.fields(c))
# The options of a cache's plan: --plan-from takes them all from another cache (a build with
# plan_from reads none of them; the command line refuses them beside --plan-from).
PLAN_OPTIONS = ("views", "image_size", "seed", "loader", "val", *MIX_AND_AUGMENT)


@checked
@dataclass(kw_only=True, config=CHECKED)
class BuildConfig(TeacherInput, MixOptions, AugmentOptions):
    """Everything `skd-cache build` takes; the plan-, teacher- and data-defining fields are
    recorded."""

    teacher: str
    data: Place | None = None  # the dataset root; default $SKD_DATA
    out: Place
    weights: str | None = None
    views: Annotated[int, Field(ge=1)] = 10
    image_size: Annotated[int, Field(ge=8)] = 224
    batch_size: Annotated[int, Field(ge=1)] = 256
    # or "auto": the smallest codec within max_kl on the first rows (skd.store.codec_table); the
    # name is checked by the build, which knows the codecs
    codec: str = "int8"
    # the SKD KL the chosen codec may lose (default 1e-4); implies codec "auto" when codec is not given
    max_kl: Positive | None = None
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    loader: Literal["dali", "torchvision"] = "dali"
    seed: int = 0
    workers: Annotated[int, Field(ge=0)] = 8
    shard_rows: Annotated[int, Field(ge=1)] = 16384
    chunk_rows: Annotated[int, Field(ge=1)] = 1024  # at most shard_rows: more is shard_rows
    compile: bool = False
    overwrite: bool = False
    val: bool = True
    on_bad_image: Literal["error", "skip"] = "error"
    crop: CropParams = dataclasses.field(default_factory=CropParams)
    # copy the samples and the whole plan of this cache (a second teacher): the plan options
    # above are not read
    plan_from: Place | None = None

    @model_validator(mode="before")
    @classmethod
    def _max_kl_picks_the_codec(cls, given):
        kwargs = given.kwargs if isinstance(given, ArgsKwargs) else None
        if kwargs and kwargs.get("max_kl") is not None and "codec" not in kwargs:
            return ArgsKwargs(given.args, {**kwargs, "codec": "auto"})
        return given

    @model_validator(mode="after")
    def _combinations(self):
        self.data = dataset_root(self.data)
        if self.max_kl is not None and self.codec != "auto":
            raise OptionError(
                f"--max-kl picks the codec: pass --codec auto with it, not --codec {self.codec}"
            )
        self.chunk_rows = min(self.chunk_rows, self.shard_rows)
        if self.shard_rows % self.chunk_rows:
            raise OptionError(
                f"--shard-size {self.shard_rows}: not a multiple of --chunk-size {self.chunk_rows}: "
                "give a multiple of it"
            )
        if self.plan_from is None:  # else the plan's own mixing (skd.build.prepare.check_pairs)
            self.odd_for_mixing(batch_size=self.batch_size, shard_rows=self.shard_rows)
        return self


ONLINE_VIEWS = 10
# The options of online distillation: a cache replays the plan and teacher input it was built with.
ONLINE_ONLY_OPTIONS = (
    "plan_seed",
    *(f.name for f in dataclasses.fields(TeacherInput)),
    *MIX_AND_AUGMENT,
)


@checked
@dataclass(kw_only=True, config=CHECKED)
class TrainConfig(TeacherInput, MixOptions, AugmentOptions):
    """Everything `skd-train` takes (the teacher-input and mixing options: online mode only). The
    fields marked `Resumed` are what a resumed run must repeat (`settings`)."""

    # one cache, or several built on one plan (an ensemble)
    cache: Annotated[
        Place | list[Place] | None,
        BeforeValidator(place_text),
        Field(description="a folder or URL, or a list of them"),
    ] = None
    # of an ensemble's caches, one per cache; default: equal
    teacher_weights: Annotated[
        list[Annotated[float, Field(ge=0)]] | None,
        BeforeValidator(comma_items),
        Field(description="comma-separated numbers >= 0, not all 0, e.g. 0.5,0.5"),
    ] = None
    teacher: str | None = None  # online mode: run this teacher in the loop
    weights: str | None = None
    # default: the root recorded in the cache (online mode: $SKD_DATA)
    data: Place | None = None
    arch: Annotated[str, Resumed] = "resnet18"
    amp: Annotated[Literal["auto", "bf16", "fp16", "none"], Resumed] = "auto"
    epochs: Annotated[int, Field(ge=1), Resumed] = 100
    batch_size: Annotated[int, Field(ge=1), Resumed] = 256  # global, over all ranks
    lr: Annotated[float, Field(ge=0), Resumed] = 0.1  # per 256 images
    momentum: Annotated[float, Field(ge=0), Resumed] = 0.9
    weight_decay: Annotated[float, Field(ge=0), Resumed] = 1e-4
    schedule: Annotated[Literal["step", "cosine"], Resumed] = "step"
    # default: 30%, 60%, 80%, 90% of the epochs
    milestones: Annotated[
        list[int] | None,
        BeforeValidator(comma_items),
        Field(description="comma-separated epochs, e.g. 30,60,80,90"),
        Resumed,
    ] = None
    warmup_epochs: Annotated[float, Field(ge=0), Resumed] = 0.0
    kd: Annotated[Literal["skd", "hinton", "none"], Resumed] = "skd"
    temperature: Annotated[Positive, Resumed] = 4.0
    # "auto": the mean per-sample std of the cached teacher logits
    multiplier: Annotated[Positive | Literal["auto"], Resumed] = 2.0
    # "seed": 0.9/0.5/0.1 at 0%/60%/80% of training
    alpha: Annotated[Annotated[float, PROBABILITY] | Literal["seed"], Resumed] = "seed"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    # default: the cache's own loader (online mode: dali)
    loader: Literal["dali", "torchvision"] | None = None
    workers: Annotated[int, Field(ge=0)] = 8
    out: Place | None = None  # the run folder
    resume: bool = False
    overwrite: bool = False  # start again in an --out that holds a run
    seed: int = 0
    tensorboard: bool = False
    val: bool = True
    # cap on steps per epoch (benchmarks, smoke runs)
    steps_per_epoch: Annotated[int, Field(ge=1)] | None = None
    # the student's input: default the cache's image size (online mode: 224), ImageNet mean/std
    image_size: Annotated[Annotated[int, Field(ge=8)] | None, Resumed] = None
    mean: Annotated[RGB, Resumed] = IMAGENET_MEAN
    std: Annotated[PositiveRGB, Resumed] = IMAGENET_STD
    # with --cache: read the first `views` views (default all); online mode: the plan's views
    # (default 10)
    views: Annotated[int, Field(ge=1)] | None = None
    # plan options of online mode (a cache carries its own)
    plan_seed: int = 0
    crop: CropParams = dataclasses.field(default_factory=CropParams)

    @model_validator(mode="after")
    def _combinations(self):
        if self.cache is not None and self.teacher is not None:
            raise OptionError(
                "--cache and --teacher exclude each other: the cache already holds the teacher"
            )
        if self.resume and self.overwrite:
            raise OptionError(
                "--resume and --overwrite exclude each other: continue the run or start it again"
            )
        if self.teacher_weights is not None:
            self._check_teacher_weights()
        if self.cache is not None:
            given = changed(self, ONLINE_ONLY_OPTIONS)
            if given:
                raise OptionError(
                    f"{', '.join(given)}: online mode only; a cache replays the plan and teacher "
                    "input it was built with, which skd-cache info shows"
                )
        if self.teacher is not None:
            self.data = dataset_root(self.data)
            if self.multiplier == "auto":
                raise OptionError(
                    "--multiplier auto reads the cache's logits: pass a number in online mode"
                )
            self.odd_for_mixing(batch_size=self.batch_size)
        return self

    def _check_teacher_weights(self) -> None:
        weights = self.teacher_weights
        if sum(weights) <= 0:
            raise OptionError(f"--teacher-weights {typed(weights)}: give numbers >= 0, not all 0")
        if self.cache is not None and len(weights) != len(self.caches()):
            raise OptionError(
                f"--teacher-weights {typed(weights)}: {len(weights)} weights for "
                f"{len(self.caches())} caches: give one per --cache"
            )

    def online_views(self) -> int:
        """The number of views an online run plans."""
        return self.views or ONLINE_VIEWS

    def caches(self) -> list[str]:
        """The caches to read, in order (none in online mode)."""
        if self.cache is None:
            return []
        return list(self.cache) if isinstance(self.cache, list) else [self.cache]

    def settings(self) -> dict:
        """What a resumed run must repeat, by option name: the weights' and scaler's shape, the
        schedule and loss of every epoch (the fields marked `Resumed`)."""
        return {
            name.replace("_", "-"): (
                list(getattr(self, name))
                if isinstance(getattr(self, name), tuple)
                else getattr(self, name)
            )
            for name, info in type(self).__pydantic_fields__.items()
            if Resumed in info.metadata
        }
