"""Trajectory Distribution Matching: one training iteration (TDM-METHOD §4, §6)."""

from __future__ import annotations

import torch

from ..config import Config
from ..core.denoiser import Cond, Denoiser, cfg_denoise, take_cond
from ..core.rng import RunRNG
from ..core.samplers import ddim_step
from ..core.schedules import Schedule
from .base import Method, Role, Update
from .losses import fake_score_loss, generator_loss, importance_weight, min_snr_weight
from .rows import index_of, put, take


class TDM(Method):
    """Owns the sampling of K, k, t_m and tau; the trainer owns the optimisers of the two roles."""

    roles = (Role("student", "the student", clip=True, metrics=("loss_student", "grad_norm_student", "D")),
             Role("fake", "the fake score", metrics=("loss_fake", "grad_norm_fake", "w_IS")))
    progress = (("L_F", "loss_fake"), ("L_G", "loss_student"), ("D", "D"))

    def __init__(self, cfg: Config, schedule: Schedule, teacher: Denoiser, nets: dict[str, Denoiser],
                 fixed_shapes: bool = False):
        super().__init__(cfg, schedule, teacher, nets, fixed_shapes)
        self.c = cfg.tdm
        self.fake = nets["fake"]                        # F, the fake score; self.student is G
        self.guidance = cfg.teacher.guidance            # CFG scale w distilled into the student
        self.k_conditioning = bool(cfg.student.unify)   # student and fake see K (§6)
        self.step_conditioning = self.c.interval == "shared"  # the fake sees the step k (§4 step 3)
        self.stochastic = cfg.student.stochastic        # re-noise with fresh noise between steps (§2)

    @classmethod
    def forwards(cls, cfg: Config) -> dict[str, float]:
        """Upper bounds (§4): rollout K, fake update 1 (+1 teacher with the §5 anchor), student 1, teacher 1,
        fake 1; CFG's unconditional half adds one batch equivalent. The public demo's order takes 11 at K = 4.
        The other switches (`tdm.interval`, `tdm.matching`, `student.stochastic`) change no count: clean matching
        needs the same prediction at k_F and the same point x_{t_{k_G}}, the stochastic rollout only other noise."""
        calls = max(cfg.student.unify or [cfg.student.steps]) + 4 + int(cfg.tdm.fake_anchor > 0)
        return {"network_calls": calls, "batch_equivalents": calls + (cfg.teacher.guidance != 1), "demo": 11}

    # -- sampling of times (§4 steps 2-3), on the host ---------------------------------------
    def _uniform(self, lo: torch.Tensor, hi: torch.Tensor, rng: RunRNG) -> torch.Tensor:
        """Uniform in [lo, hi], drawn in un-shifted time (§5) and integer for VP teachers."""
        r = rng.rand(lo.shape[0])
        if self.schedule.discrete:
            return torch.minimum(torch.floor(lo + r * (hi - lo + 1)), hi)
        u_lo, u_hi = self.schedule.unwarp(lo), self.schedule.unwarp(hi)
        return self.schedule.warp(u_lo + r * (u_hi - u_lo))

    def sample_t_m_tau(self, grid: torch.Tensor, k: torch.Tensor, rng: RunRNG):
        """Next time `t_m` of step `k` (per sample) on `grid` and the diffusion time `tau` (§4 steps 2-3).

        'separate': tau in `[max(tau_min, t_m), t_k - tau_margin]`, the step's own segment. 'shared': tau in
        `[max(tau_min, t_m), N - tau_margin]` with `N = t_K + 1` (the demo grid's N, T for trailing and shifted
        grids); the segments overlap, so the fake score is told the step k (§4 step 3 points to §6's K embedding; what
        tells overlapping segments apart is k). 'randmid': t_m in `[t_{k-1}, t_k - randmid_margin)`.
        """
        c, K = self.c, len(grid) - 1
        t_k, t_prev = grid[K - k], grid[K - k + 1]
        if c.interval == "randmid":
            t_m = self._uniform(t_prev, (t_k - c.randmid_margin - 1).clamp_min(t_prev), rng)
        else:
            t_m = t_prev
        lo = t_m.clamp_min(c.tau_min)
        top = torch.full_like(t_k, float(grid[0]) + 1 - c.tau_margin) if c.interval == "shared" else t_k - c.tau_margin
        return t_m, self._uniform(lo, top.clamp_min(lo), rng)

    def diffuse(self, x0_hat: torch.Tensor, eps_hat: torch.Tensor, t_m: torch.Tensor, tau: torch.Tensor,
                rng: RunRNG):
        """`x_tau` and its noise `xi` (§3, §4 step 3).

        Noisy matching (TDM): `x_m` = the student's next point at `t_m`, `x_tau = transition(x_m, t_m -> tau, xi)`.
        Clean matching (paper Table 7, §7): `x_tau = alpha_tau x0_hat + sigma_tau xi`. A stochastic student's next
        point is `alpha_m x0_hat + sigma_m z` with fresh z, so its `x_tau` has that same law and is drawn so; then
        `m = xi` and the importance weight is 1: nothing to correct.
        """
        xi = rng.randn(x0_hat.shape, x0_hat.dtype)
        if self.c.matching == "clean" or self.stochastic:
            return self.schedule.add_noise(x0_hat, xi, tau), xi
        x_m = ddim_step(self.schedule, x0_hat, eps_hat, t_m)
        return self.schedule.transition(x_m, t_m, tau, xi), xi

    def _fake_extra(self, extra: dict, k: torch.Tensor, device: torch.device) -> dict:
        """The fake score's conditioning: K under TDM-unify (§6), and the step k of each sample in 'shared'."""
        return {**extra, "step_k": k.to(device)} if self.step_conditioning else extra

    # -- one iteration (§4) --------------------------------------------------------------
    def step(self, x_T: torch.Tensor, cond: Cond, uncond: Cond, update: Update,
             rng: RunRNG) -> dict[str, torch.Tensor | int | float]:
        """One iteration; metrics stay on the device (reading them waits for it: the trainer does so at log steps).

        Steps, times and row indices are drawn and computed on the host, so the device is never waited on.
        """
        B, device = x_T.shape[0], x_T.device
        K = self.Ks[rng.choice(len(self.Ks))]
        grid = self.grids[K]                                        # [t_K, ..., t_1, 0]
        extra = {"k_steps": torch.tensor(K, device=device)} if self.k_conditioning else {}
        k_F = rng.randint(1, K + 1, B)                              # step of the fake update
        k_G = rng.randint(1, K + 1, B)                              # fresh step of the generator update
        # the stochastic student's fresh noise of every step (§2), drawn whole: the same draws at any rollout depth
        z = rng.randn((B, K - 1, *x_T.shape[1:]), x_T.dtype) if self.stochastic and K > 1 else None
        for net in (self.student, self.fake, self.teacher):
            net.reset_counters()

        # 1. Rollout without grad, only as deep as each sample needs: the fake update needs the
        #    prediction at step k_F, the generator update needs the point x_{t_{k_G}}. With
        #    `fixed_shapes` every step runs on the whole batch (one graph shape for torch.compile).
        need = torch.minimum(k_F, k_G + 1)
        x, x_G = x_T.clone(), torch.empty_like(x_T)
        x0_F_target, eps_F_target = torch.empty_like(x_T), torch.empty_like(x_T)
        with torch.no_grad():
            for k in range(K, 0, -1):
                put(x_G, k_G == k, x)
                if k < int(need.min()):
                    break
                rows = torch.arange(B) if self.fixed_shapes else (need <= k).nonzero().squeeze(1)
                x0_hat, eps_hat = self.student(take(x, rows), grid[K - k], take_cond(cond, index_of(rows, B, device)),
                                               **extra)
                at_k = (k_F[rows] == k).nonzero().squeeze(1)
                put(x0_F_target, rows[at_k], take(x0_hat, at_k))
                put(eps_F_target, rows[at_k], take(eps_hat, at_k))
                if k > 1:
                    noise = eps_hat if z is None else take(z[:, K - k], rows)
                    put(x, rows, ddim_step(self.schedule, x0_hat, noise, grid[K - k + 1]))

        # 2-4. Fake-score update on the rollout's own prediction at step k_F.
        t_m, tau = self.sample_t_m_tau(grid, k_F, rng)
        x_tau, xi = self.diffuse(x0_F_target, eps_F_target, t_m, tau, rng)
        x0_F, _ = self.fake(x_tau, tau, cond, **self._fake_extra(extra, k_F, device))
        w_IS = importance_weight(x_tau, x0_F_target, xi, self.schedule.alpha(tau), self.schedule.sigma(tau),
                                 self.c.importance_weight)
        if self.fake.prediction_type == "flow":
            # §5: plain MSE on the fake's velocity, no importance weight: |v_F - v|^2 = |x0_F - x0_hat|^2 / sigma^2
            weight = self.schedule.sigma(tau).pow(-2).to(w_IS)
        else:
            weight = min_snr_weight(self.schedule.snr(tau), self.c.min_snr_gamma).to(w_IS) * w_IS
        L_F = fake_score_loss(x0_F, x0_F_target, weight)
        if self.c.fake_anchor > 0:
            # §5: anchor `fake_anchor * ||v_real - v_fake||^2` to the conditional teacher (one more forward)
            with torch.no_grad():
                x0_real, _ = self.teacher(x_tau, tau, cond)
            L_F = L_F + self.c.fake_anchor * fake_score_loss(x0_F, x0_real, self.schedule.sigma(tau).pow(-2))
        update("fake", L_F)

        # 5. Generator update: the single student step k_G with grad, matched at x_tau.
        t_k = grid[K - k_G]
        x0_hat, eps_hat = self.student(x_G, t_k, cond, **extra)
        t_m, tau = self.sample_t_m_tau(grid, k_G, rng)
        x_tau, _ = self.diffuse(x0_hat.detach(), eps_hat.detach(), t_m, tau, rng)
        with torch.no_grad():
            x0_w, _ = cfg_denoise(self.teacher, x_tau, tau, cond, uncond, self.guidance)
            x0_F, _ = self.fake(x_tau, tau, cond, **self._fake_extra(extra, k_G, device))
        L_G, D = generator_loss(x0_hat, x0_w, x0_F, self.c.generator_loss, self.c.huber_c)
        update("student", L_G)

        counts = [net.reset_counters() for net in (self.student, self.fake, self.teacher)]
        return {
            "loss_fake": L_F.detach(), "loss_student": L_G.detach(), "D": D.mean(), "w_IS": w_IS.mean(), "K": K,
            "forwards": sum(c for c, _ in counts),             # network calls (CFG batched = 1)
            "forwards_batch_equiv": sum(r for _, r in counts) / B,  # samples processed / batch size
        }


METHOD = TDM
