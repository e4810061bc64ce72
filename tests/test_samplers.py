"""Samplers: DDIM (the student, §2), DPM-Solver++(2M) and flow Euler (§5)."""

import math

import pytest
import torch
from torch import nn

from tdm.core.denoiser import Denoiser
from tdm.core.samplers import sample_ddim, sample_dpmpp_2m, sample_euler, sample_student
from tdm.core.schedules import FlowSchedule, VPSchedule, teacher_grid, timestep_grid
from tdm.families.toy.gmm import ExactGMMNet, GaussianMixture

pytestmark = pytest.mark.usefixtures("one_thread")

VP = VPSchedule.from_betas("scaled_linear")
MU = torch.tensor([1.0, -2.0], dtype=torch.float64)
S = torch.tensor([0.5, 1.5], dtype=torch.float64)


def gaussian_teacher(sched=VP):
    """Exact teacher of the single Gaussian N(MU, diag(S^2)): the posterior mean in closed form."""
    mix = GaussianMixture([1.0], [MU.tolist()], [S.tolist()])
    return Denoiser(ExactGMMNet(mix, sched), sched, "sample")


def exact_map(sched, grid, x_T):
    """Golden flow map, derived by hand. For Gaussian data the PF-ODE keeps
    (x_t - alpha_t MU) / r_t constant, r_t = sqrt(alpha_t^2 S^2 + sigma_t^2). The sampler ends with
    x0_hat(x_{t_1}) = MU + alpha_1 S^2 / r_1^2 (x_{t_1} - alpha_1 MU), so the output is
    MU + alpha_1 S^2 / (r_1 r_K) (x_T - alpha_K MU)."""
    tK, t1 = grid[:1], grid[-2:-1]
    aK, sK, a1, s1 = sched.alpha(tK), sched.sigma(tK), sched.alpha(t1), sched.sigma(t1)
    rK, r1 = (aK**2 * S**2 + sK**2).sqrt(), (a1**2 * S**2 + s1**2).sqrt()
    return MU + a1 * S**2 / (r1 * rK) * (x_T.double() - aK * MU)


def _noise(n, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sampler,steps,tol,n", [(sample_ddim, 200, 0.05, 20_000), (sample_dpmpp_2m, 20, 0.03, 20_000)])
def test_gaussian_teacher_is_solved(sampler, steps, tol, n):
    """A deterministic sampler with an exact teacher maps N(0, I) onto the hand-derived affine image
    (per sample, up to discretisation error), hence onto a Gaussian of the golden mean and std."""
    den = gaussian_teacher()
    grid = teacher_grid(steps, VP)
    x_T = _noise(n)
    out = sampler(den, x_T, grid).double()
    assert (out - exact_map(VP, grid, x_T)).abs().max().item() < tol
    # golden moments of the image of N(0, I): mean = map(0), std = slope of the map
    a1, s1, aK, sK = (f(grid[i:i + 1]) for i in (-2, 0) for f in (VP.alpha, VP.sigma))
    r1, rK = (a1**2 * S**2 + s1**2).sqrt(), (aK**2 * S**2 + sK**2).sqrt()
    slope = a1 * S**2 / (r1 * rK)
    mean_gold = MU - slope * aK * MU
    assert torch.all((out.mean(0) - mean_gold).abs() < 5 * slope / math.sqrt(n) + tol)
    assert torch.all((out.std(0) / slope - 1).abs() < 5 / math.sqrt(2 * n) + tol)
    # from the teacher's marginal at t_K the output is the data law N(MU, S^2), shrunk by the
    # final Tweedie step at t_1 to std alpha_1 S^2 / r_1 (-> S as t_1 -> 0)
    x_T = (aK * MU + rK * x_T.double()).float()
    out = sampler(den, x_T, grid).double()
    assert torch.all((out.mean(0) - MU).abs() < 5 * S / math.sqrt(n) + tol)
    assert torch.all((out.std(0) / (a1 * S**2 / r1) - 1).abs() < 5 / math.sqrt(2 * n) + tol)


def test_dpmpp_second_order_beats_ddim():
    """DPM-Solver++(2M) is second order: at 10 steps its error is far below DDIM's (a wrong correction is not)."""
    den = gaussian_teacher()
    grid = teacher_grid(10, VP)
    x_T = _noise(2000, seed=1)
    ref = exact_map(VP, grid, x_T)
    err_ddim = (sample_ddim(den, x_T, grid).double() - ref).abs().max().item()
    err_dpm = (sample_dpmpp_2m(den, x_T, grid).double() - ref).abs().max().item()
    assert err_dpm < 0.3 * err_ddim


def test_dpmpp_first_step_is_ddim():
    """With no history DPM-Solver++ is first order, which is exactly the DDIM step: 2-step grids agree."""
    den = tiny_eps()
    grid = torch.tensor([900.0, 400.0, 0.0], dtype=torch.float64)
    x = _noise(16, seed=2)
    torch.testing.assert_close(sample_dpmpp_2m(den, x, grid), sample_ddim(den, x, grid), atol=1e-5, rtol=1e-5)


class _Lin(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = nn.Linear(3, 2)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(2, 3, generator=g) * 0.5)
            self.lin.bias.copy_(torch.randn(2, generator=g) * 0.1)

    def forward(self, x, t, cond):
        return self.lin(torch.cat([x, t.float()[:, None] / 1000], 1))


def tiny_eps():
    return Denoiser(_Lin(), VP, "epsilon")


def test_trajectory():
    """§2: K points x_{t_K..t_1}, x[0] the input noise, x_{k-1} = alpha x0_hat + sigma eps_hat, output x0_hat."""
    den = tiny_eps()
    grid = timestep_grid(4)
    x_T = _noise(8, seed=3)
    out, traj = sample_ddim(den, x_T, grid, return_trajectory=True)
    assert len(traj.x) == len(traj.x0_hat) == len(traj.eps_hat) == len(traj.t) == 4
    assert torch.equal(traj.x[0], x_T)
    assert [float(t) for t in traj.t] == grid[:-1].tolist()
    for k in range(3):
        t_next = grid[k + 1:k + 2]
        nxt = VP.alpha(t_next).float() * traj.x0_hat[k] + VP.sigma(t_next).float() * traj.eps_hat[k]
        torch.testing.assert_close(traj.x[k + 1], nxt)
        ref = den(traj.x[k], grid[k:k + 1].expand(8))  # the stored prediction is the denoiser's at that point
        torch.testing.assert_close(traj.x0_hat[k], ref[0])
    torch.testing.assert_close(out, traj.x0_hat[-1])
    assert den.calls == 4 + 3  # one forward per step (+ the 3 checks)
    torch.testing.assert_close(sample_student(den, x_T, grid), out)


def test_stochastic_reproducible():
    """§2 LCM-style variant: fixed generator -> same samples; differs from the deterministic sampler."""
    den = tiny_eps()
    grid = timestep_grid(4)
    x_T = _noise(8, seed=4)
    a = sample_ddim(den, x_T, grid, stochastic=True, generator=torch.Generator().manual_seed(5))
    b = sample_ddim(den, x_T, grid, stochastic=True, generator=torch.Generator().manual_seed(5))
    c = sample_ddim(den, x_T, grid, stochastic=True, generator=torch.Generator().manual_seed(6))
    det = sample_ddim(den, x_T, grid)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c) and not torch.allclose(a, det)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_on_flow(shift):
    """§5: on a rectified flow the student step is Euler, x <- x + (sigma_next - sigma) v, v the raw velocity."""
    sched = FlowSchedule(shift)
    net = _Lin(seed=1)
    den = Denoiser(net, sched, "flow")
    grid = teacher_grid(8, sched)
    x_T = _noise(8, seed=5)
    x = x_T.clone()
    with torch.no_grad():
        for t, t_next in zip(grid[:-1], grid[1:]):
            v = net(x, t.expand(8), None)
            x = x + float(t_next - t) / 1000 * v
    torch.testing.assert_close(sample_euler(den, x_T, grid), x, atol=1e-5, rtol=1e-5)
