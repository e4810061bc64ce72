"""DMD2: multi-step distribution matching distillation (Yin et al., "Improved Distribution Matching Distillation for
Fast Image Synthesis", NeurIPS 2024), without its GAN term.

What is here: the distribution-matching generator gradient of DMD (Yin et al., CVPR 2024), a fake score trained by
denoising score matching on the student's samples, the two-time-scale update rule (DMD2 §4.2: `dmd2.fake_updates`
fake-score updates per student update) and the multi-step student trained on its own backward simulation (DMD2
§4.4-4.5: the input at step k is the student's own rollout from noise, never noised data: there is no data).

What is not: DMD2's GAN head on the fake score's bottleneck and its real-data loss (§4.3). It needs real samples and
a classifier branch per family; it is future work. Without it the student is bounded by the teacher's score, as TDM.
"""

from __future__ import annotations

import torch

from ..config import Config
from ..core.denoiser import Cond, Denoiser, cfg_denoise, take_cond
from ..core.rng import RunRNG
from ..core.samplers import ddim_step
from ..core.schedules import Schedule
from .base import Method, Role, Update
from .losses import fake_score_loss, min_snr_weight, normaliser
from .rows import index_of, put, take


def distribution_matching_loss(x0_hat: torch.Tensor, x0_real: torch.Tensor,
                               x0_fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DMD's generator loss; returns `(loss, D)`.

    DMD2 Eq. 1 (DMD Eq. 7): grad_theta KL = E[(s_fake - s_real) dG/dtheta]; in clean predictions
    s_fake - s_real ~ (x0_fake - x0_real), weighted by DMD Eq. 8's `w_t ~ 1 / mean|x0_hat - x0_real|` (= D).
    As an MSE to a detached target, `0.5 * mean (x0_hat - (x0_hat - g))^2` with `g = (x0_fake - x0_real) / D`,
    the gradient w.r.t. `x0_hat` is `g / numel`: descent moves the student along `-(x0_fake - x0_real) / D`.
    """
    D = normaliser(x0_hat, x0_real)
    g = (x0_fake - x0_real) / D.reshape(-1, *[1] * (x0_hat.ndim - 1))
    return 0.5 * ((x0_hat - (x0_hat - g).detach()) ** 2).mean(), D


class DMD2(Method):
    """One iteration: `fake_updates` fake-score updates, each on a fresh backward simulation, then one student update.

    `train.iterations` therefore counts student updates, as for TDM; an iteration costs `fake_updates` rollouts
    and fake updates, then one student update (see `forwards`).
    """

    roles = (Role("student", "the student", clip=True, metrics=("loss_student", "grad_norm_student", "D")),
             Role("fake", "the fake score", metrics=("loss_fake", "grad_norm_fake")))
    progress = (("L_F", "loss_fake"), ("L_G", "loss_student"), ("D", "D"))

    def __init__(self, cfg: Config, schedule: Schedule, teacher: Denoiser, nets: dict[str, Denoiser],
                 fixed_shapes: bool = False):
        super().__init__(cfg, schedule, teacher, nets, fixed_shapes)
        self.c = cfg.dmd2
        self.fake = nets["fake"]                        # the fake score; self.student is the generator G
        self.guidance = cfg.teacher.guidance            # CFG scale w of the real score, distilled into the student
        self.stochastic = cfg.student.stochastic        # rollout re-noises with fresh noise (DMD2's sampler)
        self.k_conditioning = bool(cfg.student.unify)   # student and fake see K (TDM-METHOD §6)
        top = schedule.T - 1 if schedule.discrete else schedule.T
        if not 0 <= self.c.tau_min < self.c.tau_max <= top:
            raise ValueError(f"dmd2.tau_min={self.c.tau_min} and dmd2.tau_max={self.c.tau_max} must satisfy "
                             f"0 <= tau_min < tau_max <= {top} on this teacher's time axis")

    @classmethod
    def forwards(cls, cfg: Config) -> dict[str, float]:
        """Upper bounds: per fake update a rollout of at most K student calls and 1 fake call (the first rollout
        also yields the student's input); then student 1, teacher 1 (CFG batched), fake 1. K = 4: 8 calls with
        one fake update, 28 with DMD2's 5; CFG's unconditional half adds one batch equivalent."""
        K, N = max(cfg.student.unify or [cfg.student.steps]), cfg.dmd2.fake_updates
        calls = N * (K + 1) + 3
        return {"network_calls": calls, "batch_equivalents": calls + (cfg.teacher.guidance != 1)}

    def sample_tau(self, n: int, rng: RunRNG) -> torch.Tensor:
        """tau uniform in [tau_min, tau_max] on the host: integer for VP teachers, drawn in un-shifted time for flow
        teachers (TDM-METHOD §5)."""
        lo, hi = torch.tensor(float(self.c.tau_min)), torch.tensor(float(self.c.tau_max))
        r = rng.rand(n)
        if self.schedule.discrete:
            return torch.minimum(torch.floor(lo + r * (hi - lo + 1)), hi)
        u_lo, u_hi = self.schedule.unwarp(lo), self.schedule.unwarp(hi)
        return self.schedule.warp(u_lo + r * (u_hi - u_lo))

    @torch.no_grad()
    def backward_simulation(self, x_T: torch.Tensor, K: int, cond: Cond, extra: dict, k_x0: torch.Tensor,
                            k_x: torch.Tensor | None, rng: RunRNG) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's own K-step rollout from `x_T` (DMD2 §4.5), without grad: per sample, its prediction
        `x0_hat` at step `k_x0` and the point `x_{t_k}` it reached at step `k_x` (if given).

        It runs only as deep as each sample needs (every row with `fixed_shapes`); a stochastic student re-noises
        with fresh noise drawn for the whole batch at every step, so both ways draw alike.
        """
        B, grid, device = x_T.shape[0], self.grids[K], x_T.device
        need = k_x0 if k_x is None else torch.minimum(k_x0, k_x + 1)
        x, x_k, x0_k = x_T.clone(), torch.empty_like(x_T), torch.empty_like(x_T)
        for k in range(K, 0, -1):
            if k_x is not None:
                at_x = (k_x == k).nonzero().squeeze(1)
                put(x_k, at_x, take(x, at_x))
            if k < int(need.min()):
                break
            rows = torch.arange(B) if self.fixed_shapes else (need <= k).nonzero().squeeze(1)
            x0_hat, eps_hat = self.student(take(x, rows), grid[K - k], take_cond(cond, index_of(rows, B, device)),
                                           **extra)
            at_k = (k_x0[rows] == k).nonzero().squeeze(1)
            put(x0_k, rows[at_k], take(x0_hat, at_k))
            if k > 1:
                noise = take(rng.randn(x.shape, x.dtype), rows) if self.stochastic else eps_hat
                put(x, rows, ddim_step(self.schedule, x0_hat, noise, grid[K - k + 1]))
        return x0_k, x_k

    def step(self, x_T: torch.Tensor, cond: Cond, uncond: Cond, update: Update,
             rng: RunRNG) -> dict[str, torch.Tensor | int | float]:
        """One iteration; steps, times and rows drawn on the host, metrics left on the device."""
        B, device = x_T.shape[0], x_T.device
        K = self.Ks[rng.choice(len(self.Ks))]
        grid = self.grids[K]                                        # [t_K, ..., t_1, 0]
        extra = {"k_steps": torch.tensor(K, device=device)} if self.k_conditioning else {}
        k_G = rng.randint(1, K + 1, B)                              # step of the student update
        for net in (self.student, self.fake, self.teacher):
            net.reset_counters()

        # Two-time-scale rule (DMD2 §4.2): the fake score tracks the student's law with several updates per
        # student update, each on fresh student samples (a fresh start noise; the same conditions). The
        # first rollout also yields the student's own input point x_{t_{k_G}} (backward simulation, §4.5).
        losses_F = []
        for j in range(self.c.fake_updates):
            k_F = rng.randint(1, K + 1, B)                          # step whose prediction the fake learns
            x_start = x_T if j == 0 else rng.randn(x_T.shape, x_T.dtype)
            x0_F_target, x_k = self.backward_simulation(x_start, K, cond, extra, k_F, k_G if j == 0 else None, rng)
            if j == 0:
                x_G = x_k                                           # the student's input at its step k_G
            # denoising score matching on the detached samples at tau, weighted as TDM's fake (TDM-METHOD §4-5)
            tau = self.sample_tau(B, rng)
            x_tau = self.schedule.add_noise(x0_F_target, rng.randn(x_T.shape, x_T.dtype), tau)
            x0_F, _ = self.fake(x_tau, tau, cond, **extra)
            if self.fake.prediction_type == "flow":  # velocity MSE: |v_F - v|^2 = |x0_F - x0|^2 / sigma^2
                weight = self.schedule.sigma(tau).pow(-2)
            else:
                weight = min_snr_weight(self.schedule.snr(tau), self.c.min_snr_gamma)
            L_F = fake_score_loss(x0_F, x0_F_target, weight)
            update("fake", L_F)
            losses_F.append(L_F.detach())

        # Student update at its own step k_G: x0_hat with grad, noised to tau (a value), then the guided
        # teacher (real score) and the fake score there; DMD's gradient (x0_fake - x0_real) / D.
        x0_hat, _ = self.student(x_G, grid[K - k_G], cond, **extra)
        tau = self.sample_tau(B, rng)
        x_tau = self.schedule.add_noise(x0_hat.detach(), rng.randn(x_T.shape, x_T.dtype), tau)
        with torch.no_grad():
            x0_real, _ = cfg_denoise(self.teacher, x_tau, tau, cond, uncond, self.guidance)
            x0_fake, _ = self.fake(x_tau, tau, cond, **extra)
        L_G, D = distribution_matching_loss(x0_hat, x0_real, x0_fake)
        update("student", L_G)

        counts = [net.reset_counters() for net in (self.student, self.fake, self.teacher)]
        return {
            "loss_fake": torch.stack(losses_F).mean(), "loss_student": L_G.detach(), "D": D.mean(), "K": K,
            "forwards": sum(c for c, _ in counts),                 # network calls (CFG batched = 1)
            "forwards_batch_equiv": sum(r for _, r in counts) / B,  # samples processed / batch size
        }


METHOD = DMD2
