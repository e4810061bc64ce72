"""TDM losses: generator score-distillation loss, fake-score loss, importance weight (TDM-METHOD §4, §5)."""

import math

import pytest
import torch

from tdm.core.schedules import FlowSchedule, VPSchedule
from tdm.methods.losses import (
    fake_score_loss,
    generator_loss,
    importance_weight,
    min_snr_weight,
    normaliser,
)

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def _gen_inputs(seed=0, B=3, shape=(2, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    x0_hat = torch.randn(B, *shape, generator=g, dtype=F64).requires_grad_(True)
    x0_w = torch.randn(B, *shape, generator=g, dtype=F64)
    x0_F = torch.randn(B, *shape, generator=g, dtype=F64)
    return x0_hat, x0_w, x0_F


def _neg_grad(kind, x0_hat, x0_w, x0_F):
    loss, D = generator_loss(x0_hat, x0_w, x0_F, kind)
    (g,) = torch.autograd.grad(loss, x0_hat)
    return -g, D


@pytest.mark.parametrize("kind", ["mse", "huber_paper", "huber_demo"])
def test_generator_gradient_direction(kind):
    """§4 step 5: descent moves x0_hat along (x0_w - x0_F) / D, toward the teacher, away from the fake."""
    x0_hat, x0_w, x0_F = _gen_inputs()
    neg, D = _neg_grad(kind, x0_hat, x0_w, x0_F)
    D_ref = (x0_hat - x0_w).abs().flatten(1).mean(1)
    torch.testing.assert_close(D, D_ref.detach())
    direction = (x0_w - x0_F) / D_ref.detach().reshape(-1, 1, 1, 1)
    cos = torch.nn.functional.cosine_similarity(neg.flatten(1), direction.flatten(1), dim=1)
    if kind == "huber_demo":  # element-wise Huber ~ sign(diff) for |diff| >> c: same signs, cos ~ sqrt(2/pi)
        assert torch.all(torch.sign(neg) == torch.sign(x0_w - x0_F))
        assert torch.all(cos > 0.5)
    else:
        torch.testing.assert_close(cos, torch.ones(3, dtype=F64), atol=1e-6, rtol=0)


def test_generator_mse_exact_gradient():
    """'mse': loss = mean(diff^2 / D), diff = x0_hat - x_target = -(x0_w - x0_F), so
    grad = -2 (x0_w - x0_F) / (D numel), numel the whole tensor's."""
    x0_hat, x0_w, x0_F = _gen_inputs(1)
    neg, _ = _neg_grad("mse", x0_hat, x0_w, x0_F)
    D = (x0_hat - x0_w).abs().flatten(1).mean(1).detach().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(neg, 2 * (x0_w - x0_F) / (D * x0_hat.numel()), atol=1e-14, rtol=1e-10)
    loss, _ = generator_loss(x0_hat, x0_w, x0_F, "mse")  # value: diff is the constant x0_F - x0_w
    torch.testing.assert_close(loss, ((x0_w - x0_F) ** 2 / D).mean())


def test_generator_huber_demo_exact_gradient():
    """'huber_demo': element-wise sqrt(diff^2 + c^2) - c, c = 1e-3; grad = diff / sqrt(diff^2 + c^2) / D / numel."""
    x0_hat, x0_w, x0_F = _gen_inputs(2)
    x0_F = x0_w + 1e-3 * (x0_F - x0_w)  # differences of the order of c, where Huber is not just sign()
    neg, _ = _neg_grad("huber_demo", x0_hat, x0_w, x0_F)
    diff = x0_F - x0_w
    D = (x0_hat - x0_w).abs().flatten(1).mean(1).detach().reshape(-1, 1, 1, 1)
    grad = diff / (diff**2 + 1e-6).sqrt() / D / x0_hat.numel()
    torch.testing.assert_close(-neg, grad, atol=1e-14, rtol=1e-10)


def test_generator_huber_paper_exact_value():
    """'huber_paper': per sample (sqrt(||diff||^2 + c^2) - c) / D, c = 0.00054 sqrt(d), then mean over the batch."""
    x0_hat, x0_w, x0_F = _gen_inputs(3)
    loss, _ = generator_loss(x0_hat, x0_w, x0_F, "huber_paper")
    c = 0.00054 * math.sqrt(32)
    n2 = ((x0_w - x0_F) ** 2).flatten(1).sum(1)
    D = (x0_hat - x0_w).abs().flatten(1).mean(1)
    torch.testing.assert_close(loss, ((n2 + c**2).sqrt() - c).div(D).mean())


@pytest.mark.parametrize("kind", ["mse", "huber_paper", "huber_demo"])
def test_generator_gradient_scales_as_one_over_D(kind):
    """§4 step 5: two samples with the same (x0_w - x0_F) and D_2 = 3 D_1 get gradients in ratio 1/3."""
    g = torch.Generator().manual_seed(4)
    x0_w1 = torch.randn(1, 8, generator=g, dtype=F64)
    gap = torch.randn(1, 8, generator=g, dtype=F64)           # x0_w - x0_F, shared
    h = torch.randn(1, 8, generator=g, dtype=F64)             # x0_hat - x0_w, tripled for sample 2
    x0_w = torch.cat([x0_w1, x0_w1])
    x0_hat = torch.cat([x0_w1 + h, x0_w1 + 3 * h]).requires_grad_(True)
    neg, D = _neg_grad(kind, x0_hat, x0_w, x0_w - torch.cat([gap, gap]))
    assert D[1].item() == pytest.approx(3 * D[0].item(), rel=1e-12)
    torch.testing.assert_close(neg[1], neg[0] / 3, atol=1e-15, rtol=1e-10)


def test_generator_unknown_kind_and_normaliser():
    x0_hat, x0_w, x0_F = _gen_inputs()
    with pytest.raises(ValueError):
        generator_loss(x0_hat, x0_w, x0_F, "l1")
    D = normaliser(x0_hat, x0_hat.detach())  # identical inputs: clamped, finite, constant
    assert torch.all(D > 0) and not D.requires_grad


# -- fake score (§4 step 4) -------------------------------------------------------------------
def test_fake_score_loss_optimum_is_weighted_mean():
    """§4 step 4: over a constant predictor x0_F, L_F is minimised at sum_b w_b x0_hat_b / sum_b w_b.
    L_F is quadratic, so one Newton step (autograd gradient and Hessian) from 0 lands on the minimiser."""
    g = torch.Generator().manual_seed(5)
    B, d = 6, 5
    x0_hat = torch.randn(B, d, generator=g, dtype=F64)
    w = torch.rand(B, generator=g, dtype=F64) * 4 + 0.1
    golden = (w[:, None] * x0_hat).sum(0) / w.sum()

    def L(p):
        return fake_score_loss(p.expand(B, d), x0_hat, w)

    p0 = torch.zeros(d, dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(L(p0), p0)
    H = torch.autograd.functional.hessian(L, p0.detach())
    p_star = -torch.linalg.solve(H, grad)
    torch.testing.assert_close(p_star, golden, atol=1e-12, rtol=1e-10)
    p = golden.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(L(p), p)
    assert grad.abs().max().item() < 1e-14
    # unweighted mean is NOT the optimum when the weights differ
    assert L(x0_hat.mean(0)).item() > L(golden).item()


def test_fake_score_loss_value_and_detached_target():
    """L_F = mean_b[w_b mean_elems (x0_F - x0_hat)^2]; no gradient reaches the student's x0_hat."""
    g = torch.Generator().manual_seed(6)
    x0_F = torch.randn(3, 2, 2, generator=g, dtype=F64, requires_grad=True)
    x0_hat = torch.randn(3, 2, 2, generator=g, dtype=F64, requires_grad=True)
    w = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    loss = fake_score_loss(x0_F, x0_hat, w)
    ref = (w * ((x0_F - x0_hat) ** 2).mean((1, 2))).mean()
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert x0_hat.grad is None and x0_F.grad is not None


# -- importance weight and Min-SNR (§4 step 4) ---------------------------------------------------------
def test_importance_weight_formula():
    """w_IS = exp(-0.5 mean(m^2)) / exp(-0.5 mean(xi^2)), m = (x_tau - alpha_tau x0_hat) / sigma_tau."""
    g = torch.Generator().manual_seed(7)
    B = 4
    x_tau, x0_hat, xi = (torch.randn(B, 3, 2, generator=g, dtype=F64) for _ in range(3))
    sched = VPSchedule.from_betas("scaled_linear")
    tau = torch.tensor([30.0, 300.0, 600.0, 950.0], dtype=F64)
    a, s = sched.alpha(tau), sched.sigma(tau)
    w = importance_weight(x_tau, x0_hat, xi, a, s, "tempered")
    m = (x_tau - a.reshape(-1, 1, 1) * x0_hat) / s.reshape(-1, 1, 1)
    ref = torch.exp(-0.5 * (m**2).mean((1, 2))) / torch.exp(-0.5 * (xi**2).mean((1, 2)))
    torch.testing.assert_close(w, ref)
    torch.testing.assert_close(importance_weight(x_tau, x0_hat, xi, a, s, "none"), torch.ones(B, dtype=F64))
    with pytest.raises(ValueError):
        importance_weight(x_tau, x0_hat, xi, a, s, "exact")


def test_importance_weight_is_one_when_x_m_is_x0_hat():
    """If t_m is clean (flow, t_m = 0: x_m = x0_hat) then m = xi and the density ratio is exactly 1."""
    sched = FlowSchedule(3.0)
    g = torch.Generator().manual_seed(8)
    x0_hat, xi = torch.randn(3, 16, generator=g, dtype=F64), torch.randn(3, 16, generator=g, dtype=F64)
    tau = torch.tensor([100.0, 500.0, 900.0], dtype=F64)
    x_tau = sched.transition(x0_hat, torch.zeros(3, dtype=F64), tau, xi)
    w = importance_weight(x_tau, x0_hat, xi, sched.alpha(tau), sched.sigma(tau))
    torch.testing.assert_close(w, torch.ones(3, dtype=F64), atol=1e-12, rtol=0)


def test_min_snr_weight_clamps():
    snr = torch.tensor([0.01, 1.0, 5.0, 7.0, 1e4])
    torch.testing.assert_close(min_snr_weight(snr), torch.tensor([0.01, 1.0, 5.0, 5.0, 5.0]))
    torch.testing.assert_close(min_snr_weight(snr, gamma=2.0), torch.tensor([0.01, 1.0, 2.0, 2.0, 2.0]))


def test_flow_fake_weight_is_velocity_mse():
    """§5: for a flow teacher the fake-score loss weighted by 1/sigma^2 is the plain MSE of velocities
    v = (x_tau - x0) / sigma (what tdm.methods.tdm uses for prediction type 'flow')."""
    from tdm.core.schedules import FlowSchedule
    from tdm.methods.losses import fake_score_loss

    g = torch.Generator().manual_seed(0)
    sched = FlowSchedule(3.0)
    tau = torch.tensor([100.0, 500.0, 900.0], dtype=torch.float64)
    x_tau, x0_F, x0_hat = (torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64) for _ in range(3))
    s = sched.sigma(tau).reshape(-1, 1, 1, 1)
    v_F, v = (x_tau - x0_F) / s, (x_tau - x0_hat) / s
    expected = ((v_F - v) ** 2).flatten(1).mean(1).mean()
    assert torch.allclose(fake_score_loss(x0_F, x0_hat, sched.sigma(tau).pow(-2)), expected, rtol=1e-12)
