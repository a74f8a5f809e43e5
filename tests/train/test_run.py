"""A training run's parts: the learner's step (one optimizer step and one lr-scheduler step per batch, also when
fp16 skips a step) and the check that every process gets something to train on."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from skd.errors import SkdError
from skd.models.runtime import Dist
from skd.train.run import Learner, check_world
from skd.train.schedule import lr_scheduler


def test_a_first_step_skipped_by_the_fp16_scaler_keeps_the_schedule_and_warns_nothing():
    """The grad scaler skips the optimizer step of a batch whose gradients overflow; the lr still moves on
    with the step (as the schedule's formula says), and torch's scheduler-before-optimizer warning stays away."""
    model = torch.nn.Linear(4, 2)
    before = model.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = lr_scheduler(optimizer, steps_per_epoch=2, epochs=3, milestones=[1, 2])
    learner = Learner(model, model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=True))

    loss_fn = SimpleNamespace(parts=lambda logits, teacher, labels: SimpleNamespace(loss=logits.sum()))

    rates = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(6):
            images = torch.full((2, 4), 1e36 if step == 0 else 1.0)  # the first batch's gradients overflow
            _, lr = learner.step(images, None, None, loss_fn, torch.device("cpu"), "none")
            if step == 0:
                assert torch.equal(model.weight, before), "the overflowing first step changed the weights"
            rates.append(lr)
    assert rates == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rel=1e-12), f"lr per step: {rates}"
    shown = [str(w.message)[:80] for w in caught]
    assert not shown, f"warnings shown during the steps: {shown}"


def test_too_few_samples_for_mixed_pairs_on_every_process_is_a_clear_error():
    """Mixed views share out whole pairs: 18 samples over 10 processes leave each process no pair to train on."""
    with pytest.raises(SkdError, match="18 training samples give each of 10 processes 1: .* use at most 9 processes"):
        check_world(18, 20, Dist(rank=0, world=10), mixed=True)
    check_world(18, 20, Dist(rank=0, world=10), mixed=False)  # unmixed, one sample each is a share
    check_world(18, 18, Dist(rank=0, world=9), mixed=True)  # one pair each
