"""Samplers as plain functions over a `Denoiser` and a descending grid `[t_n, ..., 0]`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .denoiser import Cond, Denoiser, cfg_denoise
from .schedules import _bcast, check_grid


@dataclass
class Trajectory:
    """Every point `x_{t_k}` the sampler visited and its prediction there (§2)."""

    t: list[torch.Tensor]       # t_K, ..., t_1
    x: list[torch.Tensor]       # x_{t_K}, ..., x_{t_1}
    x0_hat: list[torch.Tensor]  # predictions at those points
    eps_hat: list[torch.Tensor]


def randn_from(generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """Noise shaped like `like`, drawn on the generator's own device (a CPU generator cannot fill a CUDA
    tensor) and moved to `like`'s."""
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def ddim_step(schedule, x0_hat: torch.Tensor, eps_hat: torch.Tensor, t_next) -> torch.Tensor:
    """Deterministic DDIM step `x_next = alpha_next x0_hat + sigma_next eps_hat` (§2)."""
    t_next = torch.as_tensor(t_next).reshape(-1)
    return _bcast(schedule.alpha(t_next), x0_hat) * x0_hat + _bcast(schedule.sigma(t_next), x0_hat) * eps_hat


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x: torch.Tensor, grid: torch.Tensor, cond: Cond = None,
                uncond: Cond = None, w: float = 1.0, stochastic: bool = False,
                generator: torch.Generator | None = None, return_trajectory: bool = False, **extra):
    """DDIM (Song et al. 2021, eta=0), which is also TDM's K-step student sampler (§2).

    With `stochastic=True` each step re-noises with fresh noise instead of `eps_hat` (LCM style).
    For a rectified-flow schedule the same step is exactly the Euler step of the flow ODE.
    """
    grid = check_grid(grid, denoiser.schedule.T)
    traj = Trajectory([], [], [], [])
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        x0_hat, eps_hat = cfg_denoise(denoiser, x, t_cur, cond, uncond, w, **extra)
        if return_trajectory:
            traj.t.append(t_cur)
            traj.x.append(x)
            traj.x0_hat.append(x0_hat)
            traj.eps_hat.append(eps_hat)
        if t_next == 0:
            x = x0_hat  # the last step returns the clean prediction
        else:
            noise = randn_from(generator, x) if stochastic else eps_hat
            x = ddim_step(denoiser.schedule, x0_hat, noise, t_next)
    return (x, traj) if return_trajectory else x


def sample_student(student: Denoiser, x_T: torch.Tensor, grid: torch.Tensor, cond: Cond = None,
                   stochastic: bool = False, generator: torch.Generator | None = None,
                   return_trajectory: bool = False, **extra):
    """The K-step student (§2): DDIM on its own grid, guidance 1 (CFG is distilled in)."""
    return sample_ddim(student, x_T, grid, cond, stochastic=stochastic, generator=generator,
                       return_trajectory=return_trajectory, **extra)


# DDIM is exactly Euler on the probability-flow ODE written for `x / alpha` against `sigma / alpha`
# (Karras et al. 2022); for a rectified-flow teacher that is `x + (sigma_next - sigma) v`, the step of
# diffusers' FlowMatchEulerDiscreteScheduler. One function, two names.
sample_euler = sample_ddim


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, grid: torch.Tensor, cond: Cond = None,
                    uncond: Cond = None, w: float = 1.0, **extra) -> torch.Tensor:
    """DPM-Solver++(2M) in data prediction (Lu et al. 2022, Alg. 2), multistep in lambda = log(alpha/sigma)."""
    schedule = denoiser.schedule
    grid = check_grid(grid, schedule.T)
    lam = lambda t: torch.log(schedule.alpha(t) / schedule.sigma(t))  # noqa: E731
    x0_prev, h_prev = None, None
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        x0_hat, _ = cfg_denoise(denoiser, x, t_cur, cond, uncond, w, **extra)
        if t_next == 0:
            return x0_hat
        h = lam(t_next) - lam(t_cur)
        D = x0_hat
        if x0_prev is not None:
            r = h_prev / h
            D = (1 + 1 / (2 * r)) * x0_hat - (1 / (2 * r)) * x0_prev
        s_ratio = (schedule.sigma(t_next) / schedule.sigma(t_cur)).to(x.dtype)
        x = s_ratio * x - (schedule.alpha(t_next) * torch.expm1(-h)).to(x.dtype) * D
        x0_prev, h_prev = x0_hat, h
    return x
