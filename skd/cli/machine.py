"""The options of the machine a command runs on rather than of its results: how DALI decodes on a
GPU and how long torchrun's ranks wait for each other. Nothing they set is recorded in a cache or a
run."""

from __future__ import annotations

import functools

import click

from skd.models.runtime import DIST_TIMEOUT_MINUTES, set_dist_timeout
from skd.pipelines import DALI_DECODES, HW_DECODER_LOAD, DaliOptions, set_dali_options


def machine_options(fn):
    """--dali-decode, --hw-decoder-load and --dist-timeout, applied to this process before the
    command runs."""

    @click.option(
        "--dali-decode",
        default="roi",
        show_default=True,
        type=click.Choice(DALI_DECODES),
        help="on a GPU: roi decodes only each window; full decodes whole images, then slices (where ROI "
        "decoding fails); cpu uses the CPU decoder",
    )
    @click.option(
        "--hw-decoder-load",
        default=HW_DECODER_LOAD,
        show_default=True,
        type=click.FloatRange(0, 1),
        help="share of JPEGs for the A100/H100 hardware decoder (DALI's recommended value); 0 makes an "
        "image's GPU-decoded pixels independent of its batch slot",
    )
    @click.option(
        "--dist-timeout",
        default=DIST_TIMEOUT_MINUTES,
        show_default=True,
        type=click.FloatRange(min=0, min_open=True),
        help="minutes a torchrun rank waits for the others (rank 0 indexes the dataset meanwhile)",
    )
    @functools.wraps(fn)
    def wrapper(*args, dali_decode, hw_decoder_load, dist_timeout, **kwargs):
        set_dali_options(DaliOptions(decode=dali_decode, hw_decoder_load=hw_decoder_load))
        set_dist_timeout(dist_timeout)
        return fn(*args, **kwargs)

    return wrapper
