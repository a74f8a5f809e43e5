"""The learner's step: one optimizer step and one lr-scheduler step per batch, also when fp16 skips a step."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from skd.schedule import lr_scheduler
from skd.training_run import Learner


def test_a_first_step_skipped_by_the_fp16_scaler_keeps_the_schedule_and_warns_nothing():
    """The grad scaler skips the optimizer step of a batch whose gradients overflow; the lr still moves on
    with the step (as the schedule's formula says), and torch's scheduler-before-optimizer warning stays away."""
    model = torch.nn.Linear(4, 2)
    before = model.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = lr_scheduler(optimizer, steps_per_epoch=2, epochs=3, milestones=[1, 2])
    learner = Learner(model, model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=True))

    def loss_fn(logits, teacher, target, mix_lambda):
        return SimpleNamespace(loss=logits.sum())

    rates = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(6):
            images = torch.full((2, 4), 1e36 if step == 0 else 1.0)  # the first batch's gradients overflow
            _, lr = learner.step(images, None, None, None, loss_fn, torch.device("cpu"), "none")
            if step == 0:
                assert torch.equal(model.weight, before), "the overflowing first step changed the weights"
            rates.append(lr)
    assert rates == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rel=1e-12), f"lr per step: {rates}"
    shown = [str(w.message)[:80] for w in caught]
    assert not shown, f"warnings shown during the steps: {shown}"
