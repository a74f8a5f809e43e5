"""The learning-rate schedule is torch's scheduler, and it gives the seed recipe's rates at every step."""

from __future__ import annotations

import math

import pytest
import torch

from skd.train.schedule import default_milestones, lr_scheduler

BASE_LR = 0.4


def reference_lr(
    base_lr: float, epoch_float: float, *, epochs: int, schedule: str, milestones: list[int] | None, warmup: float
) -> float:
    """The reference the scheduler must reproduce, written out by hand: linear warm-up from 0, then /10 at each
    milestone (by default the seed recipe's 30/60/80/90 of 100, scaled) or cosine to 0."""
    if warmup > 0 and epoch_float < warmup:
        return base_lr * epoch_float / warmup
    if schedule == "cosine":
        span = max(1e-9, epochs - warmup)
        return 0.5 * base_lr * (1 + math.cos(math.pi * (epoch_float - warmup) / span))
    milestones = milestones or default_milestones(epochs)
    return base_lr * 0.1 ** sum(epoch_float >= m for m in milestones)


def optimizer() -> torch.optim.SGD:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=BASE_LR, momentum=0.9)


def rates(opt: torch.optim.Optimizer, scheduler, steps: int) -> list[float]:
    """The lr of each of `steps` optimizer steps, read as the training loop uses it."""
    got = []
    for _ in range(steps):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return got


CASES = {
    "default milestones of 100 epochs": dict(epochs=100, schedule="step", milestones=None, warmup=0.0),
    "custom milestones 3, 7 of 10": dict(epochs=10, schedule="step", milestones=[3, 7], warmup=0.0),
    "custom milestone 2 after 1.5 warm-up epochs": dict(epochs=6, schedule="step", milestones=[2], warmup=1.5),
    "cosine after 2 warm-up epochs": dict(epochs=12, schedule="cosine", milestones=None, warmup=2.0),
}


@pytest.mark.parametrize("case", CASES)
def test_scheduler_gives_the_formula_at_every_step(case):
    c = CASES[case]
    steps_per_epoch = 7
    opt = optimizer()
    scheduler = lr_scheduler(
        opt,
        steps_per_epoch=steps_per_epoch,
        epochs=c["epochs"],
        schedule=c["schedule"],
        milestones=c["milestones"],
        warmup_epochs=c["warmup"],
    )
    got = rates(opt, scheduler, c["epochs"] * steps_per_epoch)
    for g, lr in enumerate(got):
        epoch, step = divmod(g, steps_per_epoch)
        want = reference_lr(
            BASE_LR,
            epoch + step / steps_per_epoch,
            epochs=c["epochs"],
            schedule=c["schedule"],
            milestones=c["milestones"],
            warmup=c["warmup"],
        )
        assert lr == pytest.approx(want, rel=1e-12, abs=1e-15), (
            f"{case}: epoch {epoch} step {step}: scheduler lr {lr!r}, formula {want!r}"
        )


def test_default_milestones_drop_at_30_60_80_90_of_100():
    opt = optimizer()
    scheduler = lr_scheduler(opt, steps_per_epoch=1, epochs=100)
    got = rates(opt, scheduler, 100)
    drops = [e for e in range(1, 100) if got[e] < got[e - 1]]
    assert drops == [30, 60, 80, 90], f"lr drops at epochs {drops}"
    assert got[99] == pytest.approx(BASE_LR * 1e-4, rel=1e-12), f"last epoch's lr {got[99]}"


@pytest.mark.parametrize("steps_after_resume", [7, 3])
def test_a_resumed_scheduler_continues_at_the_epoch(steps_after_resume):
    """A run resumed at epoch 4 (its optimizer's state loaded) gets the formula's lr at every later step, also
    with another number of steps per epoch (another number of processes or --steps-per-epoch)."""
    settings = dict(epochs=8, schedule="step", milestones=[2, 5], warmup_epochs=1.0)
    first = optimizer()
    rates(first, lr_scheduler(first, steps_per_epoch=7, **settings), 4 * 7)
    resumed = optimizer()
    resumed.load_state_dict(first.state_dict())
    scheduler = lr_scheduler(resumed, steps_per_epoch=steps_after_resume, first_step=4 * steps_after_resume, **settings)
    got = rates(resumed, scheduler, 4 * steps_after_resume)
    for g, lr in enumerate(got):
        epoch, step = divmod(g, steps_after_resume)
        want = reference_lr(
            BASE_LR, 4 + epoch + step / steps_after_resume, epochs=8, schedule="step", milestones=[2, 5], warmup=1.0
        )
        assert lr == pytest.approx(want, rel=1e-12), (
            f"resumed at epoch 4, {steps_after_resume} steps per epoch: epoch {4 + epoch} step {step}: "
            f"lr {lr!r}, formula {want!r}"
        )
