"""BuildConfig and TrainConfig check every option when made: a bad value, or one that does not fit the others, is
one OptionError line naming the option as typed and what to give, the same line from Python and from the command
line; settings() is made of the fields marked Resumed; places are text, a Path or a URL."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from pydantic import ValidationError

from skd.config import BuildConfig, TrainConfig
from skd.errors import OptionError, SkdError

BUILD = dict(teacher="resnet18", data="images", out="cache/r18")
ONLINE = dict(teacher="resnet18", data="images")
CACHED = dict(cache="cache/r18")

# (config, options on top of its base, the one line it says); every option given as the command line types it
CASES = [
    (BuildConfig, dict(batch_size="0"), "--batch-size 0: give a whole number of at least 1"),
    (BuildConfig, dict(views="ten"), "--views ten: give a whole number of at least 1"),
    (BuildConfig, dict(image_size="4"), "--image-size 4: give a whole number of at least 8"),
    (BuildConfig, dict(workers="-1"), "--workers -1: give a whole number of at least 0"),
    (BuildConfig, dict(teacher_size="4"), "--teacher-size 4: give a whole number of at least 8"),
    (BuildConfig, dict(amp="fp8"), "--amp fp8: give one of auto, bf16, fp16, none"),
    (BuildConfig, dict(teacher_interpolation="lanczos"), "--teacher-interpolation lanczos: give one of bilinear"),
    (BuildConfig, dict(teacher_mean="0.5,0.5"), "--teacher-mean 0.5,0.5: give three numbers R,G,B"),
    (BuildConfig, dict(teacher_std="0.5,0,0.5"), "--teacher-std 0.5,0,0.5: give three numbers R,G,B, each above 0"),
    (BuildConfig, dict(mixup="-0.2"), "--mixup -0.2: give a finite Beta alpha, at least 0"),
    (BuildConfig, dict(cutmix="nan"), "--cutmix nan: give a finite Beta alpha, at least 0"),
    (BuildConfig, dict(mixup_prob="1.5"), "--mixup-prob 1.5: give a probability between 0 and 1"),
    (BuildConfig, dict(reprob="2"), "--reprob 2: give a probability between 0 and 1"),
    (BuildConfig, dict(recount="0"), "--recount 0: give a whole number of boxes, at least 1"),
    (BuildConfig, dict(remode="pixel"), "--remode pixel: per-pixel noise cannot be the same image at the teacher's"),
    (BuildConfig, dict(remode="noise"), "--remode noise: give one of const, rand"),
    (BuildConfig, dict(aa="rand-x9"), "--aa rand-x9: section 'x9' is not one of"),
    (BuildConfig, dict(max_kl="0"), "--max-kl 0: give a finite number above 0"),
    (
        BuildConfig,
        dict(max_kl="1e-3", codec="int8"),
        "--max-kl picks the codec: pass --codec auto with it, not --codec int8",
    ),
    (BuildConfig, dict(shard_rows="12", chunk_rows="8"), "--shard-size 12: not a multiple of --chunk-size 8"),
    (
        BuildConfig,
        dict(mixup="0.2", batch_size="5"),
        "--batch-size 5: mixing pairs positions 2i and 2i + 1 in one batch",
    ),
    (TrainConfig, dict(**CACHED, multiplier="0"), "--multiplier 0: give a finite number above 0, or auto"),
    (TrainConfig, dict(**CACHED, multiplier="inf"), "--multiplier inf: give a finite number above 0, or auto"),
    (TrainConfig, dict(**CACHED, alpha="1.5"), "--alpha 1.5: give a probability between 0 and 1, or seed"),
    (TrainConfig, dict(**CACHED, lr="-1"), "--lr -1: give a finite number of at least 0"),
    (TrainConfig, dict(**CACHED, temperature="0"), "--temperature 0: give a finite number above 0"),
    (TrainConfig, dict(**CACHED, epochs="0"), "--epochs 0: give a whole number of at least 1"),
    (TrainConfig, dict(**CACHED, schedule="linear"), "--schedule linear: give one of step, cosine"),
    (TrainConfig, dict(**CACHED, milestones="30,sixty"), "--milestones 30,sixty: give comma-separated epochs"),
    (TrainConfig, dict(**CACHED, std="0.2,0.2,-1"), "--std 0.2,0.2,-1: give three numbers R,G,B, each above 0"),
    (TrainConfig, dict(**CACHED, teacher_weights="1,x"), "--teacher-weights 1,x: give comma-separated numbers >= 0"),
    (
        TrainConfig,
        dict(**CACHED, teacher_weights="1,2"),
        "--teacher-weights 1.0,2.0: 2 weights for 1 caches: give one per --cache",
    ),
    (TrainConfig, dict(**CACHED, cutmix="1.0"), "--cutmix 1.0: online mode only"),
    (
        TrainConfig,
        dict(**CACHED, plan_seed="3", teacher_size="64"),
        "--plan-seed 3, --teacher-size 64: online mode only",
    ),
    (TrainConfig, dict(**CACHED, resume=True, overwrite=True), "--resume and --overwrite exclude each other"),
    (TrainConfig, dict(**CACHED, teacher="resnet18"), "--cache and --teacher exclude each other"),
    (TrainConfig, dict(**ONLINE, multiplier="auto"), "--multiplier auto reads the cache's logits: pass a number"),
    (TrainConfig, dict(**ONLINE, mixup="0.2", batch_size="5"), "--batch-size 5: mixing pairs positions 2i and 2i + 1"),
]
IDS = [f"{cls.__name__}-{'-'.join(options)}" for cls, options, _ in CASES]


def made(cls, options: dict):
    """cls(**options) on top of its base (a build's teacher, data and out), or the error it raised."""
    try:
        return cls(**{**(BUILD if cls is BuildConfig else {}), **options})
    except Exception as exc:  # noqa: BLE001 - the test looks at what came out
        return exc


def cli_args(cls, options: dict, tmp_path: Path) -> list[str]:
    """The same options as a command line: skd-cache build with its teacher, data and out, or skd-train."""
    named = {"shard_rows": "--shard-size", "chunk_rows": "--chunk-size"}
    base = ["build", "--teacher", "resnet18", "--data", tmp_path, "--out", tmp_path / "c"] if cls is BuildConfig else []
    args = []
    for name, value in options.items():
        option = named.get(name, "--" + name.replace("_", "-"))
        if isinstance(value, bool):
            args.append(option if value else "--no-" + option[2:])
        else:
            args += [option, value]
    return [*base, *args]


@pytest.mark.parametrize("cls,options,says", CASES, ids=IDS)
def test_a_bad_option_is_one_line_naming_it_from_python(cls, options, says):
    error = made(cls, options)
    assert isinstance(error, OptionError), f"{cls.__name__}({options}) gave {error!r}, not an OptionError"
    assert not isinstance(error, ValidationError) and isinstance(error, SkdError), f"{options}: {type(error)}"
    message = str(error)
    assert message.startswith(says) and "\n" not in message, f"{cls.__name__}({options}): {message!r}, not {says!r}"


@pytest.mark.parametrize("cls,options,says", CASES, ids=IDS)
def test_a_bad_option_is_the_same_line_on_the_command_line(cls, options, says, tmp_path, in_process):
    tool = "cache" if cls is BuildConfig else "train"
    code, err = in_process(tool, *cli_args(cls, options, tmp_path), env={"SKD_DATA": str(tmp_path)})
    lines = err.strip().splitlines()
    where = "skd-cache build" if tool == "cache" else "skd-train"
    assert code == 2 and len(lines) == 1, f"{options}: exit {code}, {len(lines)} lines: {lines}"
    assert lines[0].startswith(f"error: {says}") and lines[0].endswith(f"(see {where} --help)"), (
        f"{options}: {lines[0]!r} does not start 'error: {says}'"
    )
    assert lines[0] == f"error: {made(cls, options)} (see {where} --help)", f"{options}: {lines[0]!r}"


def test_no_dataset_is_one_line_from_python_and_the_command_line(monkeypatch, in_process):
    monkeypatch.delenv("SKD_DATA", raising=False)
    for cls, options in ((BuildConfig, dict(teacher="resnet18", out="c")), (TrainConfig, dict(teacher="resnet18"))):
        with pytest.raises(OptionError) as caught:
            cls(**options)
        assert str(caught.value) == "no dataset: pass --data ROOT or set SKD_DATA", f"{cls.__name__}: {caught.value!r}"
    code, err = in_process("cache", "build", "--teacher", "resnet18", "--views", "0")
    assert code == 2 and err.startswith("error: --views 0:"), f"a bad value comes before the missing dataset: {err!r}"
    monkeypatch.setenv("SKD_DATA", "images")
    assert BuildConfig(teacher="resnet18", out="c").data == "images", "$SKD_DATA is not the default dataset"
    assert TrainConfig(cache="c").data is None, "a cached run's data is the recorded root, not $SKD_DATA"


def test_an_unknown_option_or_positional_argument_is_one_line():
    error = made(TrainConfig, dict(learning_rate=0.1))
    assert isinstance(error, OptionError) and str(error) == "learning_rate: TrainConfig has no such option", repr(error)
    with pytest.raises(OptionError, match="give its options by name") as caught:
        BuildConfig("resnet18")
    assert "\n" not in str(caught.value), f"not one line: {caught.value!r}"


def test_replace_checks_again():
    cfg = TrainConfig(**CACHED)
    with pytest.raises(OptionError, match=r"^--batch-size 0: give a whole number of at least 1$"):
        dataclasses.replace(cfg, batch_size=0)
    assert dataclasses.replace(cfg, batch_size=8).batch_size == 8, "a good value was not taken"


def test_values_are_read_as_typed():
    cfg = TrainConfig(
        **CACHED, multiplier="2.5", alpha="0.5", mean="0.5,0.5,0.5", milestones="3,6", teacher_weights="1"
    )
    read = (cfg.multiplier, cfg.alpha, cfg.mean, cfg.milestones, cfg.teacher_weights)
    assert read == (2.5, 0.5, (0.5, 0.5, 0.5), [3, 6], [1.0]), f"read {read}"
    assert (TrainConfig(multiplier="auto").multiplier, TrainConfig().alpha) == ("auto", "seed"), "the words are kept"
    build = BuildConfig(**BUILD, max_kl="1e-3", shard_rows=8)
    assert (build.codec, build.max_kl, build.chunk_rows) == ("auto", 1e-3, 8), (
        f"--max-kl alone: codec {build.codec}, max_kl {build.max_kl}; --shard-size 8: chunk_rows {build.chunk_rows}"
    )


def test_places_are_text_a_path_or_a_url():
    cfg = BuildConfig(teacher="resnet18", data=Path("images"), out=Path("s3://bucket/prefix"), plan_from="gs://b/p")
    assert (cfg.data, cfg.out, cfg.plan_from) == ("images", "s3://bucket/prefix", "gs://b/p"), (
        f"data {cfg.data!r}, out {cfg.out!r}, plan_from {cfg.plan_from!r}"
    )
    train = TrainConfig(cache=[Path("a"), "file:///b"], out=Path("runs/r"))
    assert (train.caches(), train.out) == (["a", "file:///b"], "runs/r"), f"{train.caches()}, {train.out!r}"
    assert TrainConfig(cache="a").caches() == ["a"] and TrainConfig().caches() == [], "caches() of one or none"


def test_plan_options_beside_plan_from_are_refused_on_the_command_line(tmp_path, in_process):
    """The command line names every plan option typed beside --plan-from; a BuildConfig with plan_from reads none
    of them (the build takes the plan of the cache), so Python may pass them."""
    args = ["build", "--teacher", "resnet18", "--data", tmp_path, "--out", tmp_path / "c", "--plan-from", tmp_path]
    code, err = in_process("cache", *args, "--views", "3", "--no-val", "--mixup", "1e-1")
    says = "error: --views 3, --no-val, --mixup 1e-1: --plan-from takes the whole plan of its cache"
    assert code == 2 and err.startswith(says) and err.count("\n") == 1, f"exit {code}: {err!r}, not {says!r}"
    cfg = BuildConfig(**BUILD, plan_from="cache/r152", views=2, mixup=0.2, batch_size=5, codec="fp16", teacher_size=96)
    assert (cfg.plan_from, cfg.views) == ("cache/r152", 2), f"plan_from {cfg.plan_from!r}, views {cfg.views}"


def test_settings_are_the_resumed_fields_by_option_name():
    settings = TrainConfig(**CACHED, milestones="3,6", batch_size=64, multiplier="auto").settings()
    assert list(settings) == [
        "arch",
        "amp",
        "epochs",
        "batch-size",
        "lr",
        "momentum",
        "weight-decay",
        "schedule",
        "milestones",
        "warmup-epochs",
        "kd",
        "temperature",
        "multiplier",
        "alpha",
        "image-size",
        "mean",
        "std",
    ], f"settings {list(settings)}"
    got = (settings["batch-size"], settings["milestones"], settings["multiplier"], settings["mean"])
    assert got == (64, [3, 6], "auto", [0.485, 0.456, 0.406]), f"values {got}"
