"""TDM's losses as pure functions of tensors (TDM-METHOD §4, §5)."""

from __future__ import annotations

import torch

IS_MODES = ("tempered", "none")
GENERATOR_LOSSES = ("huber_demo", "huber_paper", "mse")


def _mean_elems(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch."""
    return x.flatten(1).mean(1)


def importance_weight(x_tau: torch.Tensor, x0_hat: torch.Tensor, xi: torch.Tensor, alpha_tau: torch.Tensor,
                      sigma_tau: torch.Tensor, mode: str = "tempered") -> torch.Tensor:
    """Per-sample weight `w_IS` of the fake-score loss (§4 step 4).

    'tempered' (demo): `exp(-mean(m^2)/2) / exp(-mean(xi^2)/2)` with `m = (x_tau - alpha_tau x0_hat) / sigma_tau`,
    a per-element-mean (tempered) ratio q(x_tau | x0_hat) / q(x_tau | x_m). 'none': all ones.
    """
    if mode == "none":
        return torch.ones(x_tau.shape[0], device=x_tau.device, dtype=x_tau.dtype)
    if mode != "tempered":
        raise ValueError(f"unknown importance weight mode {mode!r}; expected one of {IS_MODES}")
    a = alpha_tau.reshape(-1, *[1] * (x_tau.ndim - 1)).to(x_tau)
    s = sigma_tau.reshape(-1, *[1] * (x_tau.ndim - 1)).to(x_tau)
    m = (x_tau - a * x0_hat) / s
    return torch.exp(-0.5 * _mean_elems(m**2) + 0.5 * _mean_elems(xi**2))


def min_snr_weight(snr: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-gamma weighting `min(SNR(tau), gamma)` (Hang et al. 2023), §4 step 4."""
    return snr.clamp(max=gamma)


def fake_score_loss(x0_F: torch.Tensor, x0_hat: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`L_F = mean_b[ weight_b * mean_elems (x0_F - x0_hat)^2 ]`, `x0_hat` a constant target (§4 step 4).

    `weight` is `min(SNR(tau), 5) * w_IS`, or ones for the flow variant of §5.
    """
    return (weight.to(x0_F) * _mean_elems((x0_F - x0_hat.detach()) ** 2)).mean()


def normaliser(x0_hat: torch.Tensor, x0_w: torch.Tensor) -> torch.Tensor:
    """`D = mean_elems |x0_hat - x0_w|` per sample, a constant (§4 step 5)."""
    return _mean_elems((x0_hat - x0_w).abs()).detach().clamp_min(1e-12)


def generator_loss(x0_hat: torch.Tensor, x0_w: torch.Tensor, x0_F: torch.Tensor, kind: str = "huber_demo",
                   huber_c: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Score-distillation loss of the student step (§4 step 5); returns `(loss, D)`.

    The target `x_target = x0_hat + (x0_w - x0_F)` is a constant, so the gradient w.r.t. `x0_hat`
    points along `-(x0_w - x0_F) / D`: descent moves the student toward the teacher and away from
    its own fake score. Kinds:
      'huber_demo'  element-wise `sqrt(diff^2 + c^2) - c`, c = 1e-3, over D;
      'huber_paper' per sample `sqrt(||diff||^2 + c^2) - c`, c = 0.00054 sqrt(d), over D;
      'mse'         `diff^2` over D.
    """
    x_target = (x0_hat + (x0_w - x0_F)).detach()
    D = normaliser(x0_hat, x0_w)
    Db = D.reshape(-1, *[1] * (x0_hat.ndim - 1))
    diff = x0_hat - x_target
    if kind == "huber_demo":
        c = 1e-3 if huber_c is None else huber_c
        loss = ((diff**2 + c**2).sqrt() - c) / Db
    elif kind == "huber_paper":
        d = diff[0].numel()
        c = 0.00054 * d**0.5 if huber_c is None else huber_c
        loss = ((diff.flatten(1).pow(2).sum(1) + c**2).sqrt() - c) / D
    elif kind == "mse":
        loss = diff**2 / Db
    else:
        raise ValueError(f"unknown generator loss {kind!r}; expected one of {GENERATOR_LOSSES}")
    return loss.mean(), D

