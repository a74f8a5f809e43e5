"""One rank's part of a view (skd/replay/view_loader.py): every process the run accepts gets positions to train
on, more processes than samples is one clear error, and a part that would end in a batch of one image leaves it out."""

import numpy as np
import pytest
from conftest import run_training, small_train_config

from skd.errors import SkdError
from skd.models.runtime import Dist
from skd.replay.view_loader import rank_range
from skd.train.run import check_world


@pytest.mark.parametrize("mixed", [False, True], ids=["unmixed", "mixed"])
def test_every_process_check_world_accepts_gets_positions_to_train_on(mixed):
    """Whatever the number of processes, check_world refuses the run or every rank gets a non-empty share."""
    samples = 18
    for world in range(1, samples + 1):
        batch_size = 2 * world
        try:
            check_world(samples, batch_size, Dist(rank=0, world=world), mixed)
        except SkdError:
            continue
        sizes = [
            stop - start
            for start, stop in (rank_range(samples, r, world, batch_size // world, mixed) for r in range(world))
        ]
        assert min(sizes) > 0, (
            f"{samples} samples over {world} processes ({'mixed' if mixed else 'unmixed'}): shares {sizes}"
        )


def test_more_processes_than_samples_is_a_clear_error(fp32_cache, tmp_path):
    from skd.errors import OptionError, SkdError
    from skd.models.runtime import Dist
    from skd.train.loop import _train

    with pytest.raises(SkdError, match="18 training samples cannot be shared by 20 processes"):
        _train(
            small_train_config(tmp_path / "run", cache=fp32_cache),
            Dist(rank=0, world=20),
            progress=False,
            log=lambda m: None,
            on_step=None,
        )
    with pytest.raises(OptionError, match="--batch-size 4 is the global batch"):
        _train(
            small_train_config(tmp_path / "run", cache=fp32_cache),
            Dist(rank=0, world=8),
            progress=False,
            log=lambda m: None,
            on_step=None,
        )


def test_a_last_batch_of_one_image_does_not_stop_the_epoch(fp32_cache, tmp_path):
    """18 samples in batches of 17 would end in a batch of one, which BatchNorm cannot train on: it is left out."""
    losses, _, metrics = run_training(
        small_train_config(tmp_path / "run", cache=fp32_cache, batch_size=17, epochs=1, steps_per_epoch=None)
    )
    assert len(losses) == 1 and np.isfinite(losses).all(), f"{len(losses)} steps, losses {losses.tolist()}"
