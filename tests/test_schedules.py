"""Noise schedules, conversions, transitions and grids (TDM-METHOD §1, §2, §5)."""

import math

import pytest
import torch

from tdm.core.schedules import (
    PREDICTION_TYPES,
    FlowSchedule,
    GridSpec,
    VPSchedule,
    check_grid,
    teacher_grid,
    timestep_grid,
)
from tdm.scheduler_config import vp_schedule

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
ALL_T = torch.arange(1000, dtype=F64)
FRAC_T = torch.tensor([0.25, 0.5, 10.5, 123.4567, 500.5, 998.999], dtype=F64)


def _betas(kind, start, end, n=1000):
    if kind == "linear":
        return torch.linspace(start, end, n, dtype=F64)
    return torch.linspace(start**0.5, end**0.5, n, dtype=F64) ** 2


VP_CASES = [
    ("linear", VPSchedule.from_betas("linear", 1e-4, 2e-2), _betas("linear", 1e-4, 2e-2)),
    ("scaled_linear", VPSchedule.from_betas("scaled_linear"), _betas("scaled_linear", 0.00085, 0.012)),
    ("config", vp_schedule({"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear",
                                       "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
                                       "prediction_type": "epsilon", "clip_sample": False}),
     _betas("scaled_linear", 0.00085, 0.012)),
    ("config-defaults", vp_schedule({}), _betas("linear", 1e-4, 2e-2)),  # diffusers' defaults
    # trained betas chosen exactly representable in float32, so a float32 parse loses nothing
    ("config-trained", vp_schedule({"trained_betas": _betas("linear", 1e-3, 1e-2).float().tolist()}),
     _betas("linear", 1e-3, 1e-2).float().double()),
]


# -- VP (§1) ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name,sched,betas", VP_CASES, ids=[c[0] for c in VP_CASES])
def test_vp_alpha_sigma(name, sched, betas):
    """§1 VP: alpha^2 + sigma^2 = 1, alpha_0 = sqrt(1 - beta_0), alpha_t^2 = cumprod(1 - betas)."""
    for t in (ALL_T, FRAC_T):
        a, s = sched.alpha(t), sched.sigma(t)
        assert a.dtype == F64
        torch.testing.assert_close(a**2 + s**2, torch.ones_like(t), atol=1e-12, rtol=0)
    torch.testing.assert_close(sched.alpha(torch.tensor(0.0)), torch.sqrt(1 - betas[0]), atol=1e-15, rtol=1e-15)
    abar = torch.cumprod(1 - betas, 0)
    torch.testing.assert_close(sched.alpha(ALL_T) ** 2, abar, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(sched.sigma(ALL_T) ** 2, 1 - abar, atol=1e-12, rtol=1e-10)
    assert torch.all(sched.alpha(ALL_T)[1:] < sched.alpha(ALL_T)[:-1])  # monotone noising


def test_vp_fractional_t_interpolates_log_abar():
    """Non-integer t interpolates log abar: alpha(10.5)^2 = sqrt(abar_10 * abar_11)."""
    sched, betas = VP_CASES[1][1], VP_CASES[1][2]
    abar = torch.cumprod(1 - betas, 0)
    torch.testing.assert_close(sched.alpha(torch.tensor(10.5, dtype=F64)) ** 2, (abar[10] * abar[11]).sqrt(),
                               atol=1e-14, rtol=1e-12)


def test_vp_snr():
    sched = VP_CASES[1][1]
    t = torch.tensor([0.0, 100.0, 999.0], dtype=F64)
    torch.testing.assert_close(sched.snr(t), sched.alpha(t) ** 2 / (1 - sched.alpha(t) ** 2))


def test_vp_t_out_of_range_raises():
    sched = VPSchedule.from_betas("linear")
    for bad in (-1.0, 1000.0, 999.5):
        with pytest.raises(ValueError):
            sched.alpha(torch.tensor([bad]))
    with pytest.raises(ValueError):
        VPSchedule.from_betas("cosine-ish")
    with pytest.raises(ValueError):
        VPSchedule(torch.tensor([0.1, 1.0]))


# -- rectified flow (§1, §5) ----------------------------------------------------------------------
@pytest.mark.parametrize("shift", [1.0, 2.0, 3.0, 0.5])
def test_flow_schedule_and_warp(shift):
    """§1 flow: alpha = 1 - t/T, sigma = t/T; warp is t' = s u / (1 + (s-1) u) on [0, 1], times T."""
    sched = FlowSchedule(shift)
    t = torch.linspace(0, 1000, 41, dtype=F64)
    torch.testing.assert_close(sched.alpha(t), 1 - t / 1000, atol=1e-15, rtol=0)
    torch.testing.assert_close(sched.sigma(t), t / 1000, atol=1e-15, rtol=0)
    u = t / 1000
    torch.testing.assert_close(sched.warp(t), 1000 * shift * u / (1 + (shift - 1) * u), atol=1e-9, rtol=0)
    torch.testing.assert_close(sched.unwarp(sched.warp(t)), t, atol=1e-9, rtol=0)
    assert sched.warp(torch.tensor(0.0, dtype=F64)) == 0 and sched.warp(torch.tensor(1000.0, dtype=F64)) == 1000
    with pytest.raises(ValueError):
        sched.alpha(torch.tensor([1000.5]))
    with pytest.raises(ValueError):
        sched.sigma(torch.tensor([-0.5]))


def test_flow_shift_values():
    """Shift 3 maps the midpoint to 3*0.5/(1+2*0.5) = 0.75 (times T)."""
    assert FlowSchedule(3.0).warp(torch.tensor(500.0, dtype=F64)).item() == pytest.approx(750.0, abs=1e-9)
    with pytest.raises(ValueError):
        FlowSchedule(0.0)


# -- parameterisation conversions (§1) ------------------------------------------------------------
VP = VPSchedule.from_betas("scaled_linear")
FLOW = FlowSchedule(3.0)
VP_T = torch.tensor([1.0, 250.0, 500.5, 999.0], dtype=F64)
FLOW_T = torch.tensor([10.0, 250.5, 500.0, 990.0], dtype=F64)
CONVERSION_CASES = [(VP, VP_T, p) for p in ("epsilon", "sample", "v_prediction")] + [
    (FLOW, FLOW_T, p) for p in ("flow", "sample", "epsilon")]


@pytest.mark.parametrize("sched,t,ptype", CONVERSION_CASES,
                         ids=[f"{type(c[0]).__name__}-{c[2]}" for c in CONVERSION_CASES])
def test_conversion_round_trip(sched, t, ptype):
    """§1: from_x0_eps then to_x0_eps recovers (x0, eps) at per-sample t."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 5, generator=g, dtype=F64), torch.randn(4, 3, 5, generator=g, dtype=F64)
    x_t = sched.add_noise(x0, eps, t)
    out = sched.from_x0_eps(x0, eps, t, ptype)
    x0_hat, eps_hat = sched.to_x0_eps(out, x_t, t, ptype)
    torch.testing.assert_close(x0_hat, x0, atol=1e-9, rtol=0)
    torch.testing.assert_close(eps_hat, eps, atol=1e-9, rtol=0)


def test_conversion_formulas():
    """§1 golden formulas: v = alpha eps - sigma x0 (VP); flow velocity v = eps - x0."""
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 2, generator=g, dtype=F64), torch.randn(4, 2, generator=g, dtype=F64)
    a, s = VP.alpha(VP_T)[:, None], VP.sigma(VP_T)[:, None]
    torch.testing.assert_close(VP.from_x0_eps(x0, eps, VP_T, "v_prediction"), a * eps - s * x0)
    torch.testing.assert_close(FLOW.from_x0_eps(x0, eps, FLOW_T, "flow"), eps - x0)
    assert set(PREDICTION_TYPES) == {"epsilon", "sample", "v_prediction", "flow"}


def test_unknown_prediction_type_raises():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError):
        VP.to_x0_eps(x, x, VP_T[:2], "score")
    with pytest.raises(ValueError):
        VP.from_x0_eps(x, x, VP_T[:2], "score")


# -- forward transition (§1) ----------------------------------------------------------------------
def _coef(sched, s, tau):
    """Hand-derived transition coefficients: ratio = alpha_tau/alpha_s, beta^2 = sigma_tau^2 - ratio^2 sigma_s^2."""
    a = lambda t: sched.alpha(torch.tensor([t], dtype=F64)).item()  # noqa: E731
    sg = lambda t: sched.sigma(torch.tensor([t], dtype=F64)).item()  # noqa: E731
    r = a(tau) / a(s)
    return r, sg(tau) ** 2 - r**2 * sg(s) ** 2


@pytest.mark.parametrize("sched,s,u,tau", [(VP, 100.0, 400.0, 900.0), (VP, 0.0, 20.0, 999.0),
                                           (FLOW, 50.0, 300.0, 800.0), (FLOW, 0.0, 500.0, 1000.0)])
def test_transition_composes(sched, s, u, tau):
    """§1: (s->u) then (u->tau) with independent xi equals (s->tau): same mean coefficient and variance."""
    x_s = torch.full((1, 1), 1.5, dtype=F64)
    z = torch.zeros_like(x_s)
    S, U, TAU = (torch.tensor([v], dtype=F64) for v in (s, u, tau))
    one = lambda a, b, x, xi: sched.transition(x, a, b, xi)  # noqa: E731
    # mean: xi = 0 leaves ratio * x_s
    r1, v1 = _coef(sched, s, u)
    r2, v2 = _coef(sched, u, tau)
    r, v = _coef(sched, s, tau)
    assert one(U, TAU, one(S, U, x_s, z), z).item() == pytest.approx(1.5 * r, rel=1e-12)
    assert one(S, TAU, x_s, z).item() == pytest.approx(1.5 * r, rel=1e-12)
    assert r1 * r2 == pytest.approx(r, rel=1e-12)
    # variance: beta is the coefficient of xi, and r2^2 beta1^2 + beta2^2 = beta^2
    unit = torch.ones_like(x_s)
    beta = one(S, TAU, z, unit).item()
    assert beta**2 == pytest.approx(v, rel=1e-10, abs=1e-14)
    assert r2**2 * v1 + v2 == pytest.approx(v, rel=1e-10, abs=1e-14)


def test_transition_monte_carlo():
    """§1: 200k two-hop vs one-hop draws agree in mean and variance (4-5 standard errors)."""
    g = torch.Generator().manual_seed(2)
    n = 200_000
    S, U, TAU = (torch.full((n,), v, dtype=F64) for v in (150.0, 450.0, 850.0))
    x_s = torch.full((n, 1), 1.5, dtype=F64)
    two = VP.transition(VP.transition(x_s, S, U, torch.randn(n, 1, generator=g, dtype=F64)), U, TAU,
                        torch.randn(n, 1, generator=g, dtype=F64))
    direct = VP.transition(x_s, S, TAU, torch.randn(n, 1, generator=g, dtype=F64))
    r, v = _coef(VP, 150.0, 850.0)
    for x in (two, direct):
        assert abs(x.mean().item() - 1.5 * r) < 5 * math.sqrt(v / n)
        assert x.var().item() == pytest.approx(v, rel=5 * math.sqrt(2 / n))


@pytest.mark.parametrize("sched,s,tau", [(VP, 0.0, 600.0), (VP, 300.0, 700.0), (FLOW, 200.0, 900.0)])
def test_transition_of_noisy_sample_matches_add_noise(sched, s, tau):
    """§1: transition(add_noise(x0, s) -> tau) has the law of add_noise(x0, tau): mean alpha_tau x0,
    variance sigma_tau^2."""
    g = torch.Generator().manual_seed(3)
    n = 200_000
    x0 = torch.full((n, 1), -0.7, dtype=F64)
    S, TAU = torch.full((n,), s, dtype=F64), torch.full((n,), tau, dtype=F64)
    x_s = sched.add_noise(x0, torch.randn(n, 1, generator=g, dtype=F64), S)
    x_tau = sched.transition(x_s, S, TAU, torch.randn(n, 1, generator=g, dtype=F64))
    a, sg = sched.alpha(TAU[:1]).item(), sched.sigma(TAU[:1]).item()
    assert abs(x_tau.mean().item() - a * -0.7) < 5 * sg / math.sqrt(n)
    assert x_tau.var().item() == pytest.approx(sg**2, rel=5 * math.sqrt(2 / n))


def test_flow_transition_from_clean_is_add_noise_exactly():
    """Flow at s = 0 (alpha=1, sigma=0): transition(x0, 0 -> tau, xi) == add_noise(x0, xi, tau)."""
    g = torch.Generator().manual_seed(4)
    x0, xi = torch.randn(3, 4, generator=g, dtype=F64), torch.randn(3, 4, generator=g, dtype=F64)
    tau = torch.tensor([10.0, 500.0, 1000.0], dtype=F64)
    torch.testing.assert_close(FLOW.transition(x0, torch.zeros(3, dtype=F64), tau, xi), FLOW.add_noise(x0, xi, tau),
                               atol=1e-12, rtol=0)


def test_transition_backwards_raises():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError):
        VP.transition(x, torch.tensor([500.0, 100.0]), torch.tensor([400.0, 200.0]), x)


# -- grids (§2) -------------------------------------------------------------------------------
@pytest.mark.parametrize("K,spec,expected", [
    (4, GridSpec("demo", N=900), [899, 674, 449, 224, 0]),
    (1, GridSpec("demo", N=900), [899, 0]),
    (2, GridSpec("demo", N=900), [899, 449, 0]),
    (4, GridSpec("trailing"), [999, 749, 499, 249, 0]),
    (4, GridSpec("shifted", shift=2.0), [999, 856, 665, 399, 0]),  # CogVideoX LoRA grid, §2
])
def test_timestep_grid_golden(K, spec, expected):
    """§2: demo t_k = k N / K - 1; trailing from 999; shifted grid of the video LoRA."""
    grid = timestep_grid(K, spec)
    assert grid.tolist() == expected


def test_grid_errors():
    with pytest.raises(ValueError):
        timestep_grid(0)
    with pytest.raises(ValueError):
        timestep_grid(4, GridSpec("cosine"))
    with pytest.raises(ValueError):
        check_grid(torch.tensor([999.0, 999.0, 0.0]), 1000)
    with pytest.raises(ValueError):
        check_grid(torch.tensor([500.0, 700.0, 0.0]), 1000)
    with pytest.raises(ValueError):
        check_grid(torch.tensor([999.0, 500.0, 1.0]), 1000)
    with pytest.raises(ValueError):
        check_grid(torch.tensor([0.0]), 1000)


@pytest.mark.parametrize("n", [1, 2, 4, 25, 50, 200, 500, 666])
@pytest.mark.parametrize("sched", [VP, FLOW], ids=["vp", "flow"])
def test_teacher_grid(n, sched):
    """Teacher grids have n + 1 strictly descending entries from the top of [0, T] to 0."""
    grid = teacher_grid(n, sched)
    assert len(grid) == n + 1 and grid[-1] == 0
    assert torch.all(grid[1:] < grid[:-1])
    assert grid[0] == (999 if sched is VP else 1000)
    sched.alpha(grid)  # every entry is a valid time


@pytest.mark.parametrize("n", [667, 999])
def test_teacher_grid_too_many_vp_steps_raises(n):
    """Past 666 steps the trailing VP grid would repeat t_1 = t_0 = 0: a clear error, not a silent fix."""
    with pytest.raises(ValueError, match="at most 666"):
        teacher_grid(n, VP)
