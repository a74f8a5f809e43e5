"""Command lines: `skd-cache` (build, info, stats, verify) and `skd-train`. Parse, validate, call the library."""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click

from .codecs import CODECS

DATA_HELP = "dataset root holding train/<class>/<images> (and val/); default: $SKD_DATA"


def user_errors(fn):
    """Turn the library's user-facing errors into one line on stderr and exit status 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pipelines import LoaderUnavailable

        from .build import BuildError
        from .index import DatasetError
        from .store import StoreError
        from .teachers import ModelError
        known = (BuildError, DatasetError, StoreError, ModelError, LoaderUnavailable, click.UsageError)
        try:
            return fn(*args, **kwargs)
        except known as exc:
            if isinstance(exc, click.UsageError):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: rerun the same command to resume", err=True)
            sys.exit(130)
    return wrapper


def data_root(data: str | None) -> Path:
    data = data or os.environ.get("SKD_DATA")
    if not data:
        raise click.UsageError("no dataset: pass --data ROOT or set SKD_DATA")
    return Path(data)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cache():
    """Build and inspect offline teacher-logit caches for spherical knowledge distillation."""


@cache.command()
@click.option("--teacher", required=True, help="torchvision model name (resnet152), timm:NAME or py:module:callable")
@click.option("--weights", help="state_dict file; 'none' for random init; default: torchvision's pretrained file")
@click.option("--data", help=DATA_HELP)
@click.option("--out", type=click.Path(path_type=Path), help="cache folder; default cache/<alias> (resnet152 -> cache/r152)")
@click.option("--views", default=10, show_default=True, type=click.IntRange(min=1), help="augmented views (epochs' worth) to cache")
@click.option("--image-size", default=224, show_default=True, type=click.IntRange(min=8))
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--codec", default="int8", show_default=True, type=click.Choice(list(CODECS)))
@click.option("--amp", default="auto", show_default=True, type=click.Choice(["auto", "bf16", "fp16", "none"]),
              help="autocast dtype of the teacher; auto = bf16 on CUDA, none on CPU")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cuda", "cpu"]))
@click.option("--loader", default="dali", show_default=True, type=click.Choice(["dali", "torchvision"]))
@click.option("--seed", default=0, show_default=True, type=int, help="seed of the augmentation plan")
@click.option("--workers", default=8, show_default=True, type=click.IntRange(min=0), help="decoding threads/processes")
@click.option("--shard-size", "shard_rows", default=16384, show_default=True, type=click.IntRange(min=1),
              help="rows per shard: the unit of writing and of resuming")
@click.option("--chunk-size", "chunk_rows", default=1024, show_default=True, type=click.IntRange(min=1),
              help="rows per chunk inside a shard: the unit of reading")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the teacher")
@click.option("--overwrite", is_flag=True, help="delete an existing cache at --out and rebuild")
@click.option("--no-val", is_flag=True, help="do not cache centre-crop logits of ROOT/val")
@user_errors
def build(teacher, weights, data, out, views, image_size, batch_size, codec, amp, device, loader, seed, workers,
          shard_rows, chunk_rows, compile_, overwrite, no_val):
    """Run the teacher over recorded augmented views and store its logits (resumable)."""
    from .build import BuildConfig, build_cache, summary_lines
    from .teachers import alias

    if chunk_rows > shard_rows:
        chunk_rows = shard_rows
    cfg = BuildConfig(teacher=teacher, weights=weights, data=data_root(data), out=out or Path("cache") / alias(teacher),
                      views=views, image_size=image_size, batch_size=batch_size, codec=codec, amp=amp,
                      device=device, loader=loader, seed=seed, workers=workers, shard_rows=shard_rows,
                      chunk_rows=chunk_rows, compile=compile_, overwrite=overwrite, val=not no_val)
    summary = build_cache(cfg, progress=True)
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(f"cache {cfg.out}")
        for line in summary_lines(summary):
            click.echo(f"  {line}")


def main_cache():
    cache(prog_name="skd-cache")


if __name__ == "__main__":
    main_cache()
