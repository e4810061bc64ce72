"""A small MLP diffusion network for low-dimensional data, and its ordinary diffusion pre-training."""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from ...core.schedules import Schedule
from .gmm import GaussianMixture


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in DDPM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], -1)


class MLPDenoiserNet(nn.Module):
    """`net(x_t, t, labels, k_steps=None, step_k=None)`: residual MLP with time, class, step-count and step embeddings.

    The step-count embedding (K, TDM-unify, §6) and the step embedding (k, the fake score of
    `tdm.interval=shared`, §4 step 3) start at zero, so a conditioned copy of a pretrained network
    computes exactly what the pretrained network did.
    """

    def __init__(self, dim: int, num_classes: int = 0, hidden: int = 256, depth: int = 3, max_K: int = 0):
        super().__init__()
        self.dim = dim                          # data dimension
        self.hidden = hidden                    # width of every layer
        self.inp = nn.Linear(dim, hidden)
        self.t_embed = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.c_embed = nn.Embedding(num_classes + 1, hidden)  # last index: the null label for CFG
        self.k_embed = nn.Embedding(max_K + 1, hidden) if max_K else None
        if self.k_embed is not None:
            nn.init.zeros_(self.k_embed.weight)
        self.step_embed = None                  # added by `add_step_conditioning`
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(depth)
        )
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def add_k_conditioning(self, max_K: int) -> None:
        """Give a pretrained network a zero-initialised embedding of the step count K (§6)."""
        self.k_embed = nn.Embedding(max_K + 1, self.hidden).to(self.inp.weight)
        nn.init.zeros_(self.k_embed.weight)

    def add_step_conditioning(self, max_K: int) -> None:
        """A zero-initialised embedding of the step k in 1..max_K, one value per sample (§4 step 3, 'shared')."""
        self.step_embed = nn.Embedding(max_K + 1, self.hidden).to(self.inp.weight)
        nn.init.zeros_(self.step_embed.weight)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                k_steps: torch.Tensor | None = None, step_k: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.t_embed(timestep_embedding(t, self.hidden))
        if labels is None:
            labels = torch.full((x_t.shape[0],), self.c_embed.num_embeddings - 1, device=x_t.device)
        emb = emb + self.c_embed(labels)
        if k_steps is not None:
            if self.k_embed is None:
                raise ValueError("this network has no step-count embedding; build it with max_K > 0")
            emb = emb + self.k_embed(torch.as_tensor(k_steps, device=x_t.device).expand(x_t.shape[0]))
        if step_k is not None:
            if self.step_embed is None:
                raise ValueError("this network has no step embedding; give it one with add_step_conditioning")
            emb = emb + self.step_embed(step_k.to(x_t.device))
        h = self.inp(x_t) + emb
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


def fit_diffusion(net: MLPDenoiserNet, mixture: GaussianMixture, schedule: Schedule, prediction_type: str,
                  steps: int, batch_size: int = 1024, lr: float = 2e-3, p_uncond: float = 0.1,
                  generator: torch.Generator | None = None, progress: bool = True) -> list[float]:
    """Ordinary denoising training on mixture samples: the only place data is used.

    Labels are dropped to the null label with probability `p_uncond` so the network also learns the
    unconditional score that CFG needs. Returns the loss of every step.
    """
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    losses = []
    for _ in tqdm(range(steps), desc="pretrain MLP teacher", disable=not progress, leave=False):
        labels = mixture.sample_labels(batch_size, generator)
        x0, _ = mixture.sample(batch_size, generator, labels)
        drop = torch.rand(batch_size, generator=generator) < p_uncond
        labels = labels.masked_fill(drop, mixture.null_label)
        t = torch.randint(0, schedule.T, (batch_size,), generator=generator).float()
        eps = torch.randn(x0.shape, generator=generator)
        x_t = schedule.add_noise(x0, eps, t)
        target = schedule.from_x0_eps(x0, eps, t, prediction_type)
        loss = ((net(x_t, t, labels) - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses
