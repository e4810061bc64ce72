"""Noise schedules: `x_t = alpha_t * x0 + sigma_t * eps` (TDM-METHOD §1).

Time runs on the teacher's own axis `t in [0, T]` with `T = num_train_timesteps` (1000 for every
family we support): VP teachers see integer `t in {0..T-1}`, rectified-flow teachers see
`t = T * sigma` (diffusers' SD3 convention). Thresholds of the method (20, 10 steps) therefore
mean the same thing for both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow")
BETA_SCHEDULES = ("linear", "scaled_linear")
GRID_KINDS = ("demo", "trailing", "shifted", "linear")


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample values of shape (B,) broadcast against a (B, ...) tensor, in its dtype."""
    v = v.to(device=like.device, dtype=like.dtype)
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


class Schedule:
    """Base class: subclasses define `alpha(t)` and `sigma(t)` on the time axis [0, T]."""

    T: int = 1000       # number of training timesteps of the teacher
    discrete: bool      # VP teachers are trained on integer t only

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def warp(self, u: torch.Tensor) -> torch.Tensor:
        """Map un-shifted time `u in [0, T]` to the model's time (identity unless shifted)."""
        return u

    def unwarp(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def grid(self, K: int, spec: "GridSpec") -> torch.Tensor:
        """The student's grid `[t_K, ..., t_1, 0]` on this schedule's time axis (§2): the one place grids are made."""
        return timestep_grid(K, spec, self.T, self.discrete)

    # -- derived quantities -------------------------------------------------------------
    def snr(self, t: torch.Tensor) -> torch.Tensor:
        return (self.alpha(t) / self.sigma(t)) ** 2

    def check_t(self, t) -> torch.Tensor:
        """Times as float64 (alpha and sigma are computed in float64), validated against [0, T]."""
        t = torch.as_tensor(t).to(torch.float64)
        hi = self.T - 1 if self.discrete else self.T
        if torch.any(t < 0) or torch.any(t > hi):
            raise ValueError(f"t must lie in [0, {hi}], got range [{t.min().item()}, {t.max().item()}]")
        return t

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward process q(x_t | x0) (§1)."""
        return _bcast(self.alpha(t), x0) * x0 + _bcast(self.sigma(t), x0) * eps

    def transition(self, x_s: torch.Tensor, s: torch.Tensor, tau: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        """Forward transition q(x_tau | x_s) from a less noisy `s` to `tau >= s` (§1)."""
        s, tau = torch.as_tensor(s), torch.as_tensor(tau)
        if torch.any(tau < s):
            raise ValueError("transition needs tau >= s")
        ratio = self.alpha(tau) / self.alpha(s)
        beta = (self.sigma(tau) ** 2 - ratio**2 * self.sigma(s) ** 2).clamp_min(0).sqrt()
        return _bcast(ratio, x_s) * x_s + _bcast(beta, x_s) * xi

    # -- parameterisation conversions (§1) ------------------------------------------------
    def to_x0_eps(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction_type: str):
        """Network output of `prediction_type` -> `(x0_hat, eps_hat)`."""
        a, s = _bcast(self.alpha(t), x_t), _bcast(self.sigma(t), x_t)
        if prediction_type == "epsilon":
            return (x_t - s * out) / a, out
        if prediction_type == "sample":
            return out, (x_t - a * out) / s
        if prediction_type == "v_prediction":
            return a * x_t - s * out, s * x_t + a * out
        if prediction_type == "flow":
            # velocity d x_t / d sigma = eps - x0 for alpha = 1 - sigma (§5)
            return x_t - s * out, x_t + a * out
        raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}")

    def from_x0_eps(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, prediction_type: str) -> torch.Tensor:
        """`(x0, eps)` -> the target a network of `prediction_type` regresses."""
        a, s = _bcast(self.alpha(t), x0), _bcast(self.sigma(t), x0)
        if prediction_type == "epsilon":
            return eps
        if prediction_type == "sample":
            return x0
        if prediction_type == "v_prediction":
            return a * eps - s * x0
        if prediction_type == "flow":
            return eps - x0
        raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


class VPSchedule(Schedule):
    """Variance preserving: `alpha_t = sqrt(abar_t)`, `sigma_t = sqrt(1 - abar_t)` from betas (§1).

    Non-integer t interpolates `log abar` linearly, so continuous times stay well defined.
    """

    discrete = True

    def __init__(self, betas: torch.Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or torch.any(betas <= 0) or torch.any(betas >= 1):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1)")
        self.T = len(betas)
        self.log_abar = torch.cumsum(torch.log1p(-betas), 0)

    @classmethod
    def from_alphas_cumprod(cls, abar: torch.Tensor) -> "VPSchedule":
        """From `abar_t` directly: zero-SNR teachers have no betas in (0, 1) that reproduce it."""
        abar = torch.as_tensor(abar, dtype=torch.float64)
        if abar.ndim != 1 or torch.any(abar <= 0) or torch.any(abar > 1):
            raise ValueError("alphas_cumprod must be a 1-D tensor with values in (0, 1]")
        schedule = cls.__new__(cls)
        schedule.T = len(abar)
        schedule.log_abar = abar.log()
        return schedule

    @classmethod
    def from_betas(cls, beta_schedule: str = "scaled_linear", beta_start: float = 0.00085,
                   beta_end: float = 0.012, num_train_timesteps: int = 1000) -> "VPSchedule":
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        else:
            raise ValueError(f"unknown beta_schedule {beta_schedule!r}; expected one of {BETA_SCHEDULES}")
        return cls(betas)

    def _log_abar(self, t) -> torch.Tensor:
        t = self.check_t(t)
        lo = t.floor().long().clamp(max=self.T - 1)
        hi = (lo + 1).clamp(max=self.T - 1)
        frac = t - lo
        table = self.log_abar.to(t.device)
        return table[lo] * (1 - frac) + table[hi] * frac

    def alpha(self, t):
        return self._log_abar(t).mul(0.5).exp()

    def sigma(self, t):
        return (-torch.expm1(self._log_abar(t))).sqrt()


class FlowSchedule(Schedule):
    """Rectified flow: `alpha_t = 1 - t/T`, `sigma_t = t/T`, with time shift `s` (§1, §5)."""

    discrete = False

    def __init__(self, shift: float = 1.0, num_train_timesteps: int = 1000):
        if shift <= 0:
            raise ValueError(f"shift must be positive, got {shift}")
        self.shift = float(shift)
        self.T = num_train_timesteps

    @classmethod
    def from_config(cls, config: dict, image_seq_len: int) -> "FlowSchedule":
        """A FlowMatchEulerDiscreteScheduler config as the schedule the teacher samples on. Dynamic shifting (FLUX)
        is a shift as well: `time_shift(mu, 1, sigma) = e^mu sigma / (1 + (e^mu - 1) sigma)`, with `mu` linear in
        the image's token count as the pipeline's `calculate_shift` sets it, so the resolution fixes it."""
        if config.get("shift_terminal") or config.get("invert_sigmas"):
            raise ValueError("scheduler_config.json: shift_terminal / invert_sigmas are not supported")
        T = config.get("num_train_timesteps", 1000)
        if not config.get("use_dynamic_shifting"):
            return cls(shift=config.get("shift", 1.0), num_train_timesteps=T)
        if config.get("time_shift_type", "exponential") != "exponential":
            raise ValueError(f"scheduler_config.json: time_shift_type={config['time_shift_type']!r} is not "
                             "supported (only 'exponential', FLUX's)")
        lo, hi = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        shift_lo, shift_hi = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        mu = shift_lo + (shift_hi - shift_lo) * (image_seq_len - lo) / (hi - lo)
        return cls(shift=math.exp(mu), num_train_timesteps=T)

    def alpha(self, t):
        return 1 - self.check_t(t) / self.T

    def sigma(self, t):
        return self.check_t(t) / self.T

    def warp(self, u):
        # t' = s t / (1 + (s - 1) t) on the unit interval
        u = u / self.T
        return self.T * self.shift * u / (1 + (self.shift - 1) * u)

    def unwarp(self, t):
        t = t / self.T
        return self.T * t / (self.shift - (self.shift - 1) * t)


@dataclass(frozen=True)
class GridSpec:
    """How the student's timesteps `t_K > ... > t_1 > t_0 = 0` are laid out (§2)."""

    kind: str = "demo"    # 'demo' (k*N/K - 1), 'trailing' (uniform from T-1), 'shifted' or 'linear' (flow: T k/K)
    N: int = 900          # top of the demo grid
    shift: float = 2.0    # for 'shifted': t_k = floor(T * warp_s(k/K)) - 1


def timestep_grid(K: int, spec: GridSpec = GridSpec(), T: int = 1000, discrete: bool = True) -> torch.Tensor:
    """Descending student grid `[t_K, ..., t_1, t_0 = 0]` of K + 1 times (§2)."""
    if K < 1:
        raise ValueError(f"K must be >= 1, got {K}")
    k = torch.arange(K, 0, -1, dtype=torch.float64)
    if spec.kind == "demo":
        if not 0 < spec.N <= T:
            raise ValueError(f"demo grid needs 0 < N <= T, got N={spec.N}")
        t = k * spec.N / K - 1
    elif spec.kind == "trailing":
        if discrete and K > (2 * T) // 3:
            raise ValueError(f"a trailing grid on {T} integer timesteps has at most {(2 * T) // 3} steps, got K={K}")
        t = torch.round(k * T / K) - 1
    elif spec.kind == "shifted":
        u = k / K
        t = torch.floor(T * spec.shift * u / (1 + (spec.shift - 1) * u) + 1e-6) - 1
    elif spec.kind == "linear":  # T k / K from pure noise: what flow-match Euler's set_timesteps(K) can make
        if discrete:
            raise ValueError("the linear grid starts at t = T, beyond a VP teacher's last timestep; use another grid")
        t = T * k / K
    else:
        raise ValueError(f"unknown grid kind {spec.kind!r}; expected one of {GRID_KINDS}")
    t = torch.floor(t + 1e-6) if discrete else t
    grid = torch.cat([t, torch.zeros(1, dtype=torch.float64)])
    return check_grid(grid, T)


def check_grid(grid: torch.Tensor, T: int) -> torch.Tensor:
    """Validate a descending grid that ends at 0 and stays inside [0, T]."""
    grid = torch.as_tensor(grid, dtype=torch.float64)
    if grid.ndim != 1 or len(grid) < 2:
        raise ValueError("a timestep grid needs at least two entries [t_K, ..., 0]")
    if torch.any(grid[1:] >= grid[:-1]):
        raise ValueError(f"timestep grid must be strictly descending, got {_shown(grid)}")
    if grid[-1] != 0 or grid[0] > T:
        raise ValueError(f"timestep grid must end at 0 and start at most at T={T}, got {_shown(grid)}")
    return grid


def _shown(grid: torch.Tensor) -> str:
    """A grid for a message: whole if short, else its ends (an error stays one readable line)."""
    g = grid.tolist()
    return str(g) if len(g) <= 10 else f"[{', '.join(map(str, g[:4]))}, ..., {', '.join(map(str, g[-4:]))}] " \
                                         f"({len(g)} entries)"


def teacher_grid(nfe_steps: int, schedule: Schedule) -> torch.Tensor:
    """Grid for the teacher's own samplers: uniform 'trailing' steps, shifted for flow teachers."""
    if isinstance(schedule, FlowSchedule):
        u = torch.linspace(schedule.T, 0, nfe_steps + 1, dtype=torch.float64)
        return check_grid(schedule.warp(u), schedule.T)
    return timestep_grid(nfe_steps, GridSpec("trailing"), schedule.T, discrete=True)
