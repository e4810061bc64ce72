"""Any network -> `(x0_hat, eps_hat)`, and classifier-free guidance (TDM-METHOD §1)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .schedules import PREDICTION_TYPES, Schedule

Cond = Any  # a tensor or a (nested) dict of tensors with the batch on dim 0


def concat_cond(a: Cond, b: Cond) -> Cond:
    """Stack two conditionings along the batch so cond and uncond share one forward."""
    if torch.is_tensor(a):
        return torch.cat([a, b])
    if isinstance(a, dict):
        return {key: concat_cond(a[key], b[key]) for key in a}
    if a is None:
        return None
    raise TypeError(f"cannot batch conditioning of type {type(a).__name__}")


def take_cond(c: Cond, index: torch.Tensor) -> Cond:
    """Rows `index` of a conditioning."""
    if torch.is_tensor(c):
        return c[index]
    if isinstance(c, dict):
        return {key: take_cond(v, index) for key, v in c.items()}
    return c


def host_times(t, n: int) -> torch.Tensor:
    """Times of `n` samples on the host: schedule arithmetic there never waits on the device; the network
    gets its own copy."""
    t = torch.as_tensor(t).cpu()
    return t.expand(n) if t.ndim == 0 else t


class Denoiser(nn.Module):
    """Wraps `net(x_t, t, cond, **extra) -> output` of a given parameterisation.

    Calling it returns `(x0_hat, eps_hat)`. It also counts network calls (`calls`) and the
    samples they processed (`rows`), so a training loop can report forwards per iteration.
    """

    def __init__(self, net: nn.Module | Callable, schedule: Schedule, prediction_type: str,
                 learned_sigma: bool = False):
        super().__init__()
        self.net = net                          # the network, or any callable
        self.schedule = schedule                # owns alpha, sigma and the conversions
        self.prediction_type = prediction_type  # 'epsilon', 'sample', 'v_prediction' or 'flow'
        self.learned_sigma = learned_sigma      # PixArt: output has extra variance channels
        self.calls = 0
        self.rows = 0
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}")

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond = None, **extra):
        t = host_times(t, x_t.shape[0])
        out = self.net(x_t, t.to(x_t.device), cond, **extra)
        if self.learned_sigma:
            out = out[:, : out.shape[1] // 2]  # keep the mean channels (§1)
        self.calls += 1
        self.rows += x_t.shape[0]
        x0_hat, eps_hat = self.schedule.to_x0_eps(out.to(x_t.dtype), x_t, t, self.prediction_type)
        return x0_hat, eps_hat

    def guided(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond, w: float, **extra):
        """The prediction guided at scale `w`: classifier-free guidance, cond and uncond in one batched call.
        A family whose teacher takes the guidance scale as an input (FLUX.1-dev's embedding) overrides this with
        its one call; every method and sampler reaches the teacher's guidance through here (`cfg_denoise`)."""
        if w == 1:
            return self(x_t, t, cond, **extra)
        t = host_times(t, x_t.shape[0])
        extra2 = {key: concat_cond(v, v) for key, v in extra.items()}
        x0, eps = self(torch.cat([x_t, x_t]), torch.cat([t, t]), concat_cond(cond, uncond), **extra2)
        (x0_c, x0_u), (eps_c, eps_u) = x0.chunk(2), eps.chunk(2)
        return x0_u + w * (x0_c - x0_u), eps_u + w * (eps_c - eps_u)

    def reset_counters(self) -> tuple[int, int]:
        counts = (self.calls, self.rows)
        self.calls = self.rows = 0
        return counts


def cfg_denoise(denoiser: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond,
                w: float, **extra):
    """Classifier-free guidance `x0_w = x0(uncond) + w (x0(cond) - x0(uncond))`, one batched forward (§1), or the
    denoiser's own guided call where it overrides `Denoiser.guided`.

    `w = 1` means no guidance and costs a single conditional pass.
    """
    return denoiser.guided(x_t, t, cond, uncond, w, **extra)
