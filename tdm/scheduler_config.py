"""A diffusers scheduler config -> the teacher's `alphas_cumprod`, exactly as diffusers computes it.

Handles every beta schedule diffusers has, `trained_betas`, CogVideoX's SNR shift and zero-terminal-SNR
rescaling (Lin et al. 2023). `vp_schedule` builds the teacher's schedule from it; `tdm.export.scheduler` uses it to
prove that an exported scheduler reproduces the student's sampler.
"""

from __future__ import annotations

import inspect
import math

import torch

from .core.schedules import VPSchedule

ZERO_SNR_TERMINAL = 2.0**-24  # diffusers' DPMSolverMultistep/Euler value for alphas_cumprod[-1] under zero SNR
COGVIDEOX_CLASSES = ("CogVideoXDDIMScheduler", "CogVideoXDPMScheduler")
_BETA_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
              "prediction_type", "rescale_betas_zero_snr", "snr_shift_scale")
_DDPM_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                      trained_betas=None, prediction_type="epsilon", rescale_betas_zero_snr=False)


def _resolved(config: dict) -> dict:
    """The beta-related keys of a training scheduler config, missing ones filled with the defaults of
    the class named in `_class_name` (LCM/TCD/CogVideoX default to scaled_linear 0.00085..0.012,
    DDPM/DDIM/Euler/DPM to linear 0.0001..0.02)."""
    defaults = dict(_DDPM_DEFAULTS)
    name = config.get("_class_name")
    if name:
        try:
            import diffusers

            params = inspect.signature(getattr(diffusers, name).__init__).parameters
            defaults.update({k: params[k].default for k in _BETA_KEYS if k in params})
        except (ImportError, AttributeError):
            pass
    out = {k: config.get(k, defaults.get(k)) for k in _BETA_KEYS}
    if out["snr_shift_scale"] is None:
        out["snr_shift_scale"] = 1.0
    return out


def _base_betas(c: dict) -> torch.Tensor:
    T = int(c["num_train_timesteps"])
    if c["trained_betas"] is not None:
        return torch.as_tensor(c["trained_betas"], dtype=torch.float64)
    if c["beta_schedule"] == "linear":
        return torch.linspace(c["beta_start"], c["beta_end"], T, dtype=torch.float64)
    if c["beta_schedule"] == "scaled_linear":
        return torch.linspace(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, T, dtype=torch.float64) ** 2
    if c["beta_schedule"] == "squaredcos_cap_v2":
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731  (diffusers' cosine)
        return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float64)
    raise ValueError(f"unsupported beta_schedule {c['beta_schedule']!r}")


def _rescale_zero_snr(abar: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Alg. 1 on sqrt(alphas_cumprod): shift the last to 0, keep the first."""
    s = abar.sqrt()
    s0, sT = s[0].clone(), s[-1].clone()
    return ((s - sT) * (s0 / (s0 - sT))) ** 2


def vp_alphas_cumprod(config: dict, terminal: float | None = ZERO_SNR_TERMINAL) -> torch.Tensor:
    """float64 `alphas_cumprod` of a VP teacher as diffusers builds it from `config`.

    Order as in diffusers: betas -> cumprod -> (CogVideoX classes only) SNR shift
    `abar / (s + (1 - s) abar)` -> zero-SNR rescale when `rescale_betas_zero_snr`. A zero terminal value
    is replaced by `terminal` (diffusers' inference schedulers use 2**-24 so sigma stays finite; pass
    None to keep the exact 0).
    """
    c = _resolved(config)
    abar = torch.cumprod(1 - _base_betas(c), 0)
    s = float(c["snr_shift_scale"])
    if s != 1.0:
        abar = abar / (s + (1 - s) * abar)
    if c["rescale_betas_zero_snr"]:
        abar = _rescale_zero_snr(abar)
        abar[-1] = 0.0
    if terminal is not None and abar[-1] == 0:
        abar[-1] = terminal
    return abar




def vp_schedule(config: dict) -> VPSchedule:
    """A VP teacher's schedule from its diffusers scheduler config dict (scheduler_config.json), with the class's own
    defaults, CogVideoX's SNR shift and zero-SNR rescaling (terminal abar 2**-24, as diffusers)."""
    return VPSchedule.from_alphas_cumprod(vp_alphas_cumprod(config))
