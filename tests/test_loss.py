"""The SKD and Hinton losses against an independent computation written out by hand."""

import math

import pytest
import torch

from skd.loss import hard_label_loss, hinton_kd_loss, seed_alpha, skd_kl, spherical_kd_loss


def by_hand_skd(s, t, y, T, m, a):
    """SKD written out with explicit means, variances and log-sum-exps (float64)."""
    s, t = s.double(), t.double()

    def ln(x):
        mu = x.mean(dim=1, keepdim=True)
        var = ((x - mu) ** 2).mean(dim=1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-7) * m

    zs, zt = ln(s), ln(t)

    def log_softmax(x):
        return (
            x
            - torch.log(torch.exp(x - x.max(1, keepdim=True).values).sum(1, keepdim=True))
            - x.max(1, keepdim=True).values
        )

    lps, lpt = log_softmax(zs / T), log_softmax(zt / T)
    kd = (torch.exp(lpt) * (lpt - lps)).sum() / s.shape[0] * T * T
    ce = -log_softmax(zs)[torch.arange(len(y)), y].mean()
    return a * kd + (1 - a) * ce, kd, ce


def batch(n=16, c=100, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, c, generator=g) * 3).to(dtype)
    t = (torch.randn(n, c, generator=g) * 5 + 1).to(dtype)
    y = torch.randint(0, c, (n,), generator=g)
    return s, t, y


def test_skd_matches_hand_computation():
    s, t, y = batch()
    out = spherical_kd_loss(s, t, y, temperature=4.0, multiplier=2.0, alpha=0.9)
    want, kd, ce = by_hand_skd(s, t, y, 4.0, 2.0, 0.9)
    assert abs(out.loss.item() - want.item()) < 1e-5, f"loss {out.loss.item()} vs by hand {want.item()}"
    assert abs(out.kd.item() - kd.item()) < 1e-5, f"KD part {out.kd.item()} vs {kd.item()}"
    assert abs(out.ce.item() - ce.item()) < 1e-5, f"CE part {out.ce.item()} vs {ce.item()}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_skd_runs_in_float32_for_half_inputs(dtype):
    s, t, y = batch(dtype=dtype)
    out = spherical_kd_loss(s, t, y, temperature=4.0, multiplier=2.0, alpha=0.5)
    want, _, _ = by_hand_skd(s.float(), t.float(), y, 4.0, 2.0, 0.5)
    assert out.loss.dtype == torch.float32, f"loss dtype {out.loss.dtype}, expected float32"
    assert abs(out.loss.item() - want.item()) < 1e-5, f"{dtype} loss {out.loss.item()} vs float32 {want.item()}"


def test_reported_kl_is_the_losss_kd_term():
    """The per-row KL that verify and the teacher comparison report averages to the loss's KD term / T^2."""
    s, t, y = batch()
    kd = spherical_kd_loss(s, t, y, temperature=4.0, multiplier=2.0, alpha=1.0).kd
    reported = skd_kl(t, s, multiplier=2.0, temperature=4.0).mean() * 16
    assert abs(reported.item() - kd.item()) < 1e-5, f"reported KL x T^2 {reported.item()} vs the loss's KD {kd.item()}"
    _, by_hand, _ = by_hand_skd(s, t, y, 4.0, 2.0, 1.0)
    exact = skd_kl(t, s, multiplier=2.0, temperature=4.0, dtype=torch.float64).mean() * 16
    assert abs(exact.item() - by_hand.item()) < 1e-9, f"float64 KL x T^2 {exact.item()} vs by hand {by_hand.item()}"
    same = skd_kl(s, s * 3.0 + 1.0, multiplier=2.0, temperature=4.0)
    assert (same >= 0).all() and same.max() < 1e-6, f"KL of a row with its affine copy: max {same.max().item():.2e}"


def test_ce_is_on_normalised_student_logits():
    s, t, y = batch()
    out = spherical_kd_loss(s, t, y, temperature=4.0, multiplier=2.0, alpha=0.0)
    raw_ce = torch.nn.functional.cross_entropy(s, y).item()
    _, _, ce = by_hand_skd(s, t, y, 4.0, 2.0, 0.0)
    assert abs(out.loss.item() - ce.item()) < 1e-5, f"alpha 0 gives {out.loss.item()}, normalised CE {ce.item()}"
    assert abs(out.loss.item() - raw_ce) > 1e-2, f"CE equals raw-logit CE {raw_ce}: normalisation missing"


def test_skd_is_invariant_to_teacher_affine_rescaling():
    """Per-row affine changes of the teacher (what the int8 codec applies) do not change SKD."""
    s, t, y = batch()
    a = spherical_kd_loss(s, t, y, temperature=4.0, multiplier=2.0, alpha=0.9).loss
    b = spherical_kd_loss(s, t * 3.7 - 11.0, y, temperature=4.0, multiplier=2.0, alpha=0.9).loss
    assert abs(a.item() - b.item()) < 1e-5, f"{a.item()} vs rescaled teacher {b.item()}"


def test_gradients_flow_to_student_only():
    s, t, y = batch()
    s.requires_grad_(True)
    t.requires_grad_(True)
    spherical_kd_loss(s, t, y, temperature=4.0, multiplier=2.0, alpha=0.9).loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0, "student received no gradient"
    assert t.grad is None, "teacher received a gradient"


def test_hinton_matches_hand_computation():
    s, t, y = batch()
    out = hinton_kd_loss(s, t, y, temperature=4.0, alpha=0.7)
    p_t = torch.softmax(t.double() / 4, 1)
    kd = (p_t * (torch.log_softmax(t.double() / 4, 1) - torch.log_softmax(s.double() / 4, 1))).sum(1).mean() * 16
    ce = torch.nn.functional.cross_entropy(s.double(), y)
    want = 0.7 * kd + 0.3 * ce
    assert abs(out.loss.item() - want.item()) < 1e-5, f"Hinton {out.loss.item()} vs by hand {want.item()}"


def test_identical_logits_give_zero_kd():
    s, _, y = batch()
    out = spherical_kd_loss(s, s.clone(), y, temperature=4.0, multiplier=2.0, alpha=1.0)
    assert abs(out.kd.item()) < 1e-6, f"KD of identical logits is {out.kd.item()}"
    hard, ce = hard_label_loss(s, y).loss.item(), torch.nn.functional.cross_entropy(s, y).item()
    assert math.isclose(hard, ce, rel_tol=1e-6), f"hard-label loss {hard}, cross-entropy {ce}"


def test_seed_alpha_schedule():
    got = [seed_alpha(e, 100) for e in (0, 59, 60, 79, 80, 99)]
    assert got == [0.9, 0.9, 0.5, 0.5, 0.1, 0.1], f"alpha at epochs 0,59,60,79,80,99 of 100: {got}"
    short = [seed_alpha(e, 10) for e in range(10)]
    assert short == [0.9] * 6 + [0.5] * 2 + [0.1] * 2, f"alpha over 10 epochs: {short}"


@pytest.mark.parametrize("epochs", [12, 36, 45, 90, 100, 101])
def test_alpha_switches_where_the_lr_drops(epochs):
    """The seed recipe switches alpha at the 60% and 80% lr drops: a shorter run keeps them together."""
    from skd.train.schedule import default_milestones

    switches = [e for e in range(1, epochs) if seed_alpha(e, epochs) != seed_alpha(e - 1, epochs)]
    drops = default_milestones(epochs)
    assert switches == drops[1:3], f"{epochs} epochs: alpha switches at {switches}, lr drops at {drops}"


def test_the_loss_modules_equal_the_functions_and_follow_a_changed_alpha():
    """skd.SphericalKD and skd.HintonKD are the loss functions; `alpha` set between steps is the one used."""
    import skd

    s, t, y = batch()
    skd_module = skd.SphericalKD(temperature=4.0, multiplier=2.0, alpha=0.9)
    hinton_module = skd.HintonKD(temperature=3.0, alpha=0.7)
    pairs = [
        (skd_module(s, t, y), spherical_kd_loss(s, t, y, temperature=4.0, multiplier=2.0, alpha=0.9).loss),
        (hinton_module(s, t, y), hinton_kd_loss(s, t, y, temperature=3.0, alpha=0.7).loss),
    ]
    skd_module.alpha = 0.1
    pairs.append((skd_module(s, t, y), spherical_kd_loss(s, t, y, temperature=4.0, multiplier=2.0, alpha=0.1).loss))
    for got, want in pairs:
        assert torch.equal(got, want), f"module {got.item():.7f} vs function {want.item():.7f}"
    assert not torch.equal(pairs[0][0], pairs[2][0]), "changing alpha did not change the loss"


def test_the_losses_take_a_mixed_batchs_soft_labels():
    """Class probabilities (B, C) as labels: the CE term is the probability-weighted CE on the normalised
    student logits, as written out by hand."""
    import skd

    s, t, y = batch(n=8, c=10)
    lam = torch.tensor([0.3, 0.3, 1.0, 1.0, 0.6, 0.6, 0.9, 0.9])
    soft = skd.soft_labels(y, lam, 10)
    parts = skd.SphericalKD(temperature=4.0, multiplier=2.0, alpha=0.0).parts(s, t, soft)
    partner = y[torch.arange(8) ^ 1]
    _, _, ce_own = by_hand_skd(s, t, y, 4.0, 2.0, 0.0)
    rows = []
    for i in range(8):
        _, _, own = by_hand_skd(s[i : i + 1], t[i : i + 1], y[i : i + 1], 4.0, 2.0, 0.0)
        _, _, other = by_hand_skd(s[i : i + 1], t[i : i + 1], partner[i : i + 1], 4.0, 2.0, 0.0)
        rows.append(lam[i] * own + (1 - lam[i]) * other)
    want = float(sum(rows) / 8)
    assert abs(parts.ce.item() - want) < 1e-5, f"CE with soft labels {parts.ce.item():.6f}, by hand {want:.6f}"
    assert abs(parts.loss.item() - want) < 1e-5, "alpha 0: the loss is the CE term"
