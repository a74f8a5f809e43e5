"""`skd-cache`: build a teacher-logit cache and inspect one (info, stats, verify). Parse, make the
config (`build`: BuildConfig checks the options; plan options typed beside --plan-from are refused
here), call the library."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from skd import __version__
from skd.cli.common import (
    NON_NEGATIVE,
    NUMBER,
    POSITIVE,
    WHOLE,
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
from skd.config import PLAN_OPTIONS, BuildConfig
from skd.config.fields import as_typed
from skd.store.codecs import CODECS


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="skd-cache")
def cache():
    """Build and inspect offline teacher-logit caches for spherical knowledge distillation."""


B = BuildConfig  # option defaults come from the config, declared once


def _codec_name(value: str) -> str:
    from skd.store.codecs import get_codec

    try:
        return get_codec(value.strip()).name
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


def _codec_names(value: str) -> list[str]:
    return [_codec_name(v) for v in value.split(",") if v.strip()]


@cache.command()
@click.option(
    "--teacher",
    required=True,
    help="torchvision model name (resnet152), timm:NAME or py:module:callable",
)
@click.option(
    "--weights",
    help="state_dict file; 'none' for random init; default: torchvision's pretrained file "
    "(a py: teacher: the weights its callable builds)",
)
@click.option(
    "--data", help="dataset root holding train/<class>/<images> (and val/); default: $SKD_DATA"
)
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
    type=WHOLE,
    help="augmented views (epochs' worth) to cache; more than an existing cache holds appends views to it",
)
@click.option(
    "--image-size",
    default=B.image_size,
    show_default=True,
    type=WHOLE,
    help="the student's input side: the cache's default for skd-train",
)
@teacher_input_options
@mix_options
@augment_options
@click.option("--batch-size", default=B.batch_size, show_default=True, type=WHOLE)
@click.option(
    "--codec",
    default=B.codec,
    show_default=True,
    help=f"how logits are stored: {', '.join(CODECS)}, topk:K (the K largest per row; skd-cache codecs compares) "
    "or auto (the smallest within --max-kl on the first rows)",
)
@click.option(
    "--max-kl",
    type=NUMBER,
    help="with --codec auto (implied): the SKD KL (T=4, m=2) the codec may lose, measured on the first 4,096 "
    "rows of view 0 [default: 1e-4]",
)
@click.option(
    "--amp",
    default=B.amp,
    show_default=True,
    metavar=choices(B, "amp"),
    help="autocast dtype of the teacher; auto = bf16 on CUDA, none on CPU",
)
@click.option("--device", default=B.device, show_default=True, metavar=choices(B, "device"))
@click.option("--loader", default=B.loader, show_default=True, metavar=choices(B, "loader"))
@click.option(
    "--seed", default=B.seed, show_default=True, type=WHOLE, help="seed of the augmentation plan"
)
@click.option(
    "--workers",
    default=B.workers,
    show_default=True,
    type=WHOLE,
    help="decoding threads/processes",
)
@click.option(
    "--shard-size",
    "shard_rows",
    default=B.shard_rows,
    show_default=True,
    type=WHOLE,
    help="rows per shard: the unit of writing and of resuming",
)
@click.option(
    "--chunk-size",
    "chunk_rows",
    default=B.chunk_rows,
    show_default=True,
    type=WHOLE,
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
@click.option(
    "--val/--no-val", default=B.val, show_default=True, help="cache centre-crop logits of ROOT/val"
)
@click.option(
    "--on-bad-image",
    default=B.on_bad_image,
    show_default=True,
    metavar=choices(B, "on_bad_image"),
    help="error: list every unreadable or truncated image and stop before any teacher work; "
    "skip: leave them out (recorded in the cache, shown by skd-cache info)",
)
@machine_options
@user_errors
def build(**options):
    """Run the teacher over recorded augmented views and store its logits (resumable)."""
    from skd.build.teacher_pass import build_cache, summary_lines
    from skd.models.teachers import alias

    options = options_set(options)
    given = [as_typed(name, options[name]) for name in PLAN_OPTIONS if name in options]
    if "plan_from" in options and given:
        raise click.UsageError(
            f"{', '.join(given)}: --plan-from takes the whole plan of its cache (see skd-cache "
            "info); only the teacher, its input and the codec may differ"
        )
    options.setdefault("out", str(Path("cache") / alias(options["teacher"])))
    cfg = make_config(BuildConfig, options)
    summary = build_cache(cfg, progress=True)
    if prints_summary():
        click.echo(f"cache {cfg.out}")
        for line in summary_lines(summary):
            click.echo(f"  {line}")


CACHE_DIR = click.argument("cache_dir", metavar="DIR|URL")
JSON = click.option(
    "--json", "as_json", is_flag=True, help="print one JSON document instead of text"
)


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
    """What a cache holds and costs: teacher, dataset, plan, codec, completion, bytes (unfinished
    caches too)."""
    from skd.inspect.info import describe, info_lines
    from skd.store.cache_store import open_store

    report = describe(open_store(cache_dir))
    click.echo(json.dumps(report, indent=2) if as_json else "\n".join(info_lines(report)))


@cache.command()
@click.argument("source", metavar="SRC_DIR|URL")
@click.option(
    "--codec",
    required=True,
    callback=lambda c, p, v: _codec_name(v),
    help="the new codec (see codecs)",
)
@click.option("--out", required=True, help="the new cache: a folder or an object-store URL")
@click.option("--overwrite", is_flag=True, help="replace the cache at --out instead of resuming it")
@user_errors
def recode(source, codec, out, overwrite):
    """Store a cache's logits with another codec, without the teacher or the images (resumable)."""
    from skd.build.recode import recode_cache

    store = recode_cache(source, out, codec, overwrite=overwrite, progress=True)
    if prints_summary():
        storage = store.storage()
        click.echo(
            f"cache {store.path}: {codec}, {storage['bytes_per_row'] or 0:,.0f} B per row of logits"
        )


@cache.command()
@CACHE_DIR
@click.option(
    "--rows",
    default=4096,
    show_default=True,
    type=click.IntRange(min=1),
    help="rows of view 0 measured",
)
@click.option(
    "--codecs",
    "codec_names",
    default="fp32,fp16,int8,compact,topk:10,topk:100",
    show_default=True,
    callback=lambda c, p, v: _codec_names(v),
    help="comma-separated codecs to measure (topk:K for any K)",
)
@click.option(
    "--temperature", default=4.0, show_default=True, type=POSITIVE, help="T of both targets"
)
@click.option(
    "--multiplier", default=2.0, show_default=True, type=POSITIVE, help="m of the SKD target"
)
@JSON
@user_errors
def codecs(cache_dir, rows, codec_names, temperature, multiplier, as_json):
    """What each codec would cost and lose on this cache's rows: bytes per row on disk, KL of the
    SKD and Hinton targets against the stored rows, top-1 and top-5 agreement."""
    from skd.store.cache_store import open_store
    from skd.store.codec_table import cache_codec_table, table_lines

    measured, figures = cache_codec_table(
        open_store(cache_dir), rows, codec_names, temperature=temperature, multiplier=multiplier
    )
    if as_json:
        click.echo(json.dumps([f.to_dict() for f in figures], indent=2))
    else:
        click.echo("\n".join(table_lines(figures, measured, temperature, multiplier)))


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
    """Teacher accuracy, logit scale, confidence, calibration, view consistency and storage cost of
    a cache; of several caches on one plan, the teachers compared on identical views."""
    from skd.inspect.stats import logit_stats, stats_lines
    from skd.inspect.stats_plot import check_plot_path, plot_stats
    from skd.store.cache_store import open_store

    if len(cache_dirs) > 1:
        from skd.inspect.compare import compare_lines, compare_teachers

        report = compare_teachers([open_store(d) for d in cache_dirs], views, progress=True)
        click.echo(json.dumps(report, indent=2) if as_json else "\n".join(compare_lines(report)))
        return
    if plot is not None:
        check_plot_path(plot)
    report = logit_stats(
        open_store(cache_dirs[0]),
        views,
        val=not no_val,
        temperature=temperature,
        multiplier=multiplier,
        progress=True,
    )
    if plot is not None:
        plot_stats(report, plot)
    click.echo(
        json.dumps(report.to_json(), indent=2) if as_json else "\n".join(stats_lines(report))
    )


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
@click.option(
    "--loader",
    type=click.Choice(["dali", "torchvision"]),
    help="default: the loader recorded in the cache",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "cuda", "cpu"]),
    help="auto: this machine's GPU when it has one (the teacher runs under the cache's recorded AMP)",
)
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=0))
@click.option(
    "--seed", default=0, show_default=True, type=int, help="seed of the random choice of rows"
)
@click.option(
    "--tolerance",
    default=1e-2,
    show_default=True,
    type=NON_NEGATIVE,
    help="KL (T=4, m=2) above which a re-computed row differs from the stored one",
)
@click.option(
    "--integrity", is_flag=True, help="also read every chunk and report those that fail to decode"
)
@JSON
@machine_options
@user_errors
def verify(
    cache_dir,
    samples,
    data,
    weights,
    loader,
    device,
    batch_size,
    workers,
    seed,
    tolerance,
    integrity,
    as_json,
):
    """Check a cache against its data and teacher: fingerprint, weights, re-computed rows (exit 1 on
    mismatch)."""
    from skd.inspect.verify import report_lines, verify_cache
    from skd.store.cache_store import open_store

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
        click.echo(
            f"error: cache {cache_dir} does not match: {report.cause} (details above)", err=True
        )
        sys.exit(1)
