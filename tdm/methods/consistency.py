"""Latent consistency distillation (LCM: Luo et al. 2023, arXiv 2310.04378, §4.1-4.3 and Algorithm 1; Song et al.
2023, consistency distillation) in tdm's notation (TDM-METHOD §1).

Consistency function, with LCM's boundary scalings (s = `timestep_scaling`, sigma_d = `sigma_data`, t on the
teacher's axis):
    f(x, t) = c_skip(t) x + c_out(t) x0_hat(x, t),  c_skip = sigma_d^2 / ((s t)^2 + sigma_d^2),
    c_out = s t / sqrt((s t)^2 + sigma_d^2),        so f(x, 0) = x.
One iteration (LCM Algorithm 1, one fixed guidance scale w in place of LCM's w-conditioned student):
    t_n uniform on {0, ..., T-1-k}, t_{n+k} = t_n + k            (LCM §4.3: n ~ U[1, N-k], skipping step k)
    x_{t_n} = alpha_{t_n} x0_w + sigma_{t_n} eps_w               (the guided teacher's DDIM step from t_{n+k}, §1
                                                                   CFG: LCM's omega is w - 1)
    L = d(f_theta(x_{t_{n+k}}, t_{n+k}), f_theta-(x_{t_n}, t_n))  (d pseudo-Huber, c = 0.001, or L2; f_theta- no grad)
The target f_theta- is the student itself without grad (`target=student`: EMA rate 0, as diffusers' LCM-LoRA
script) or the trainer's EMA of the student (`target=ema`, rate `optim.ema`; diffusers' full LCM script: 0.95). That
EMA is the trainer's: saved in checkpoints (a resumed run stays bit-identical) and saved as the student at the end.

Data-free (`source`): LCM noises real data to t_{n+k}; tdm has no data set. 'student' (default): x0 = a sample of
the student's own K-step LCM sampler (no grad), x_{t_{n+k}} = alpha x0 + sigma eps; K + 3 network calls per
iteration. The loss's minimiser, f = the teacher's ODE map, does not depend on the law of x_{t_{n+k}}; that law
only decides where a finite network is accurate, and this one weights the inputs the LCM sampler feeds the student
(its own x0, re-noised). 'teacher': x_{t_{n+k}} on the guided teacher's DDIM path from noise at T-1 in steps of k,
its ODE marginal without the student's errors, at up to ceil((T-1-k)/k) more guided teacher calls (49 at k = 20).
On toy-gmm 'student' was both cheaper and better (README).

Sampling is LCM's multistep sampler (predict f, re-noise with fresh noise to the next grid time: student.stochastic,
which config.validate requires). It uses x0_hat for f: on a student grid the boundary scalings change nothing that
matters (|c_skip| < 1e-6 and |1 - c_out| < 1e-6 from t = 50 at s = 10; tests/test_consistency.py).
"""

from __future__ import annotations

import math

import torch

from ..config import Config
from ..core.denoiser import Cond, Denoiser, cfg_denoise, take_cond
from ..core.rng import RunRNG
from ..core.samplers import ddim_step
from ..core.schedules import Schedule, _bcast
from .base import Method, Role, Update


def boundary_scalings(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """LCM's `(c_skip(t), c_out(t))`: 1 and 0 at t = 0, then c_out -> 1 as `t * timestep_scaling` >> sigma_data."""
    st = timestep_scaling * torch.as_tensor(t, dtype=torch.float64)
    return sigma_data**2 / (st**2 + sigma_data**2), st / (st**2 + sigma_data**2).sqrt()


def consistency_loss(f: torch.Tensor, f_target: torch.Tensor, kind: str = "huber", c: float = 1e-3) -> torch.Tensor:
    """`d(f, f_target)`, element-wise mean: pseudo-Huber `sqrt(diff^2 + c^2) - c` (LCM) or `diff^2`."""
    diff = f - f_target.detach()
    if kind == "huber":
        return ((diff**2 + c**2).sqrt() - c).mean()
    if kind == "l2":
        return (diff**2).mean()
    raise ValueError(f"unknown consistency loss {kind!r}; expected 'huber' or 'l2'")


class Consistency(Method):
    """Owns the draws of t_n and the data-free points x_{t_{n+k}}; the trainer owns the student's optimiser."""

    roles = (Role("student", "the student", clip=True, metrics=("loss_student", "grad_norm_student")),)
    progress = (("L", "loss_student"),)

    def __init__(self, cfg: Config, schedule: Schedule, teacher: Denoiser, nets: dict[str, Denoiser],
                 fixed_shapes: bool = False):
        super().__init__(cfg, schedule, teacher, nets, fixed_shapes)
        self.c = cfg.consistency
        self.guidance = cfg.teacher.guidance            # CFG scale w distilled into the student
        self.k_conditioning = bool(cfg.student.unify)   # the student network then takes K (TDM-unify's embedding)
        if self.c.skip >= schedule.T:
            raise ValueError(f"consistency.skip={self.c.skip} must be below the teacher's {schedule.T} timesteps")

    @classmethod
    def forwards(cls, cfg: Config, T: int = 1000) -> dict[str, float]:
        """Upper bounds: source (K student calls, or the teacher's path to t_{n+k}), teacher 1, student 1, target 1.
        T: the teacher's timesteps (1000 for every supported family)."""
        guided = 1 + (cfg.teacher.guidance != 1)        # batch equivalents of a teacher call
        if cfg.consistency.source == "teacher":
            path = math.ceil((T - 1 - cfg.consistency.skip) / cfg.consistency.skip)
            return {"network_calls": path + 3, "batch_equivalents": (path + 1) * guided + 2}
        K = max(cfg.student.unify or [cfg.student.steps])
        return {"network_calls": K + 3, "batch_equivalents": K + 2 + guided}

    def f(self, net: Denoiser, x: torch.Tensor, t: torch.Tensor, cond: Cond, **extra) -> torch.Tensor:
        """The consistency function `c_skip(t) x + c_out(t) x0_hat(x, t)`."""
        c_skip, c_out = boundary_scalings(t, self.c.sigma_data, self.c.timestep_scaling)
        x0_hat, _ = net(x, t, cond, **extra)
        return _bcast(c_skip, x) * x + _bcast(c_out, x) * x0_hat

    # -- data-free points x_{t_{n+k}} ---------------------------------------------------
    def student_points(self, x_T: torch.Tensor, t_nk: torch.Tensor, grid: torch.Tensor, cond: Cond, rng: RunRNG,
                       **extra) -> torch.Tensor:
        """The student's LCM sampler from x_T on its grid (no grad), its sample noised to t_{n+k}."""
        x = x_T
        with torch.no_grad():
            for t_cur, t_next in zip(grid[:-1], grid[1:]):
                x0_hat, _ = self.student(x, t_cur, cond, **extra)
                x = x0_hat if t_next == 0 else self.schedule.add_noise(x0_hat, rng.randn(x.shape, x.dtype),
                                                                       t_next.reshape(1))
        return self.schedule.add_noise(x, rng.randn(x.shape, x.dtype), t_nk)

    def teacher_points(self, x_T: torch.Tensor, u_nk: torch.Tensor, cond: Cond, uncond: Cond) -> torch.Tensor:
        """The guided teacher's DDIM path from x_T at the top time down to t_{n+k}, in steps of k (no grad).
        Row r takes m_r = ceil((top - u_r) / k) steps: top -> u_r + (m_r - 1) k -> ... -> u_r."""
        k, B = self.c.skip, x_T.shape[0]
        top = self.schedule.T - 1 if self.schedule.discrete else self.schedule.T
        m = torch.ceil((top - u_nk) / k).long()
        x = x_T.clone()
        with torch.no_grad():
            for j in range(int(m.max()), 0, -1):
                rows = torch.arange(B) if self.fixed_shapes else (m >= j).nonzero().squeeze(1)
                u = u_nk[rows]
                # clamped for fixed_shapes' rows that have not started (their result is dropped)
                t_cur, t_next = (self.schedule.warp((u + i * k).clamp(max=top)) for i in (j, j - 1))
                idx = rows.to(x.device)
                x0_w, eps_w = cfg_denoise(self.teacher, x[idx], t_cur, take_cond(cond, idx), take_cond(uncond, idx),
                                          self.guidance)
                step = ddim_step(self.schedule, x0_w, eps_w, t_next)
                keep = (m[rows] >= j).nonzero().squeeze(1)  # all of `rows` unless fixed_shapes
                x.index_copy_(0, rows[keep].to(x.device), step.index_select(0, keep.to(x.device)))
        return x

    # -- one iteration (LCM Algorithm 1) --------------------------------------------------
    def step(self, x_T: torch.Tensor, cond: Cond, uncond: Cond, update: Update,
             rng: RunRNG) -> dict[str, torch.Tensor | int | float]:
        B, device, k = x_T.shape[0], x_T.device, self.c.skip
        K = self.Ks[rng.choice(len(self.Ks))]
        extra = {"k_steps": torch.tensor(K, device=device)} if self.k_conditioning else {}
        target = self.student_ema if self.c.target == "ema" else self.student
        nets = (self.student, self.teacher) + ((target,) if target is not self.student else ())
        for net in nets:
            net.reset_counters()

        # times on the teacher's axis, drawn un-shifted (identity for VP teachers): n uniform, t_{n+k} = t_n + k
        u_n = rng.randint(0, self.schedule.T - k, B).to(torch.float64)
        t_n, t_nk = self.schedule.warp(u_n), self.schedule.warp(u_n + k)
        if self.c.source == "teacher":
            x_nk = self.teacher_points(x_T, u_n + k, cond, uncond)
        else:
            x_nk = self.student_points(x_T, t_nk, self.grids[K], cond, rng, **extra)

        with torch.no_grad():
            # the augmented PF-ODE's solver: one guided DDIM step of the teacher, t_{n+k} -> t_n
            x0_w, eps_w = cfg_denoise(self.teacher, x_nk, t_nk, cond, uncond, self.guidance)
            x_n = ddim_step(self.schedule, x0_w, eps_w, t_n)
            f_target = self.f(target, x_n, t_n, cond, **extra)
        f_theta = self.f(self.student, x_nk, t_nk, cond, **extra)
        L = consistency_loss(f_theta, f_target, self.c.loss, self.c.huber_c)
        update("student", L)

        counts = [net.reset_counters() for net in nets]
        return {
            "loss_student": L.detach(), "K": K,
            "forwards": sum(c for c, _ in counts),                 # network calls (CFG batched = 1)
            "forwards_batch_equiv": sum(r for _, r in counts) / B,  # samples processed / batch size
        }


METHOD = Consistency
