"""Trajectory Distribution Matching: one training iteration (TDM-METHOD §4, §6)."""

from __future__ import annotations

from typing import Callable

import torch

from ..config import TDMConfig
from ..denoiser import Cond, Denoiser, cfg_denoise, take_cond
from ..losses import fake_score_loss, generator_loss, importance_weight, min_snr_weight
from ..samplers import ddim_step
from ..schedules import GridSpec, Schedule, timestep_grid

Update = Callable[[str, torch.Tensor], None]  # trainer callback: backward + optimiser step of a role


class TDM:
    """Owns the student grid(s) and the sampling of k, t_m and tau; the trainer owns the optimisers."""

    def __init__(self, cfg: TDMConfig, schedule: Schedule, teacher: Denoiser, student: Denoiser, fake: Denoiser,
                 guidance: float, Ks: list[int], grid: GridSpec, k_conditioning: bool):
        self.cfg = cfg
        self.schedule = schedule
        self.teacher = teacher                  # frozen, CFG scale `guidance`
        self.student = student                  # G
        self.fake = fake                        # F, the fake score
        self.guidance = guidance
        self.Ks = Ks                            # one K, or TDM-unify's set (§6)
        self.k_conditioning = k_conditioning    # student and fake see K (§6)
        self.grids = {K: timestep_grid(K, grid, schedule.T, schedule.discrete) for K in Ks}

    # -- sampling of times (§4 steps 2-3) ----------------------------------------------------
    def _uniform(self, lo: torch.Tensor, hi: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Uniform in [lo, hi], drawn in un-shifted time (§5) and integer for VP teachers."""
        r = torch.rand(lo.shape, generator=gen, dtype=torch.float64)
        if self.schedule.discrete:
            return torch.minimum(torch.floor(lo + r * (hi - lo + 1)), hi)
        u_lo, u_hi = self.schedule.unwarp(lo), self.schedule.unwarp(hi)
        return self.schedule.warp(u_lo + r * (u_hi - u_lo))

    def sample_t_m_tau(self, t_k: torch.Tensor, t_prev: torch.Tensor, gen: torch.Generator):
        """Next time `t_m` of the step and the diffusion time `tau` inside its segment."""
        c = self.cfg
        if c.interval == "randmid":
            t_m = self._uniform(t_prev, (t_k - c.randmid_margin - 1).clamp_min(t_prev), gen)
        else:
            t_m = t_prev
        lo = t_m.clamp_min(c.tau_min)
        top = torch.full_like(t_k, self.schedule.T - c.tau_margin) if c.interval == "shared" else t_k - c.tau_margin
        return t_m, self._uniform(lo, top.clamp_min(lo), gen)

    def diffuse(self, x0_hat: torch.Tensor, eps_hat: torch.Tensor, t_m: torch.Tensor, tau: torch.Tensor,
                gen: torch.Generator):
        """`x_m` = the student's next point at `t_m`, then `x_tau = transition(x_m, t_m -> tau, xi)`."""
        x_m = ddim_step(self.schedule, x0_hat, eps_hat, t_m)
        xi = torch.randn(x_m.shape, generator=gen, device=x_m.device, dtype=x_m.dtype)
        return self.schedule.transition(x_m, t_m, tau, xi), xi

    # -- one iteration (§4) --------------------------------------------------------------
    def iteration(self, x_T: torch.Tensor, cond: Cond, uncond: Cond, update: Update,
                  gen: torch.Generator) -> dict[str, float]:
        B, device = x_T.shape[0], x_T.device
        K = self.Ks[torch.randint(len(self.Ks), (1,), generator=gen).item()]
        grid = self.grids[K]                                        # [t_K, ..., t_1, 0]
        extra = {"k_steps": torch.tensor(K, device=device)} if self.k_conditioning else {}
        k_F = torch.randint(1, K + 1, (B,), generator=gen)         # step of the fake update
        k_G = torch.randint(1, K + 1, (B,), generator=gen)         # fresh step of the generator update
        for net in (self.student, self.fake, self.teacher):
            net.reset_counters()

        # 1. Rollout without grad, only as deep as each sample needs: the fake update needs the
        #    prediction at step k_F, the generator update needs the point x_{t_{k_G}}.
        need = torch.minimum(k_F, k_G + 1)
        x, x_G = x_T.clone(), torch.empty_like(x_T)
        x0_F_target, eps_F_target = torch.empty_like(x_T), torch.empty_like(x_T)
        with torch.no_grad():
            for k in range(K, 0, -1):
                at_G = (k_G == k).to(device)
                x_G[at_G] = x[at_G]
                rows = (need <= k).nonzero().squeeze(1).to(device)
                if len(rows) == 0:
                    break
                x0_hat, eps_hat = self.student(x[rows], grid[K - k], take_cond(cond, rows), **extra)
                at_k = k_F.to(device)[rows] == k
                x0_F_target[rows[at_k]], eps_F_target[rows[at_k]] = x0_hat[at_k], eps_hat[at_k]
                if k > 1:
                    x[rows] = ddim_step(self.schedule, x0_hat, eps_hat, grid[K - k + 1])

        # 2-4. Fake-score update on the rollout's own prediction at step k_F.
        t_m, tau = self.sample_t_m_tau(grid[K - k_F], grid[K - k_F + 1], gen)
        x_tau, xi = self.diffuse(x0_F_target, eps_F_target, t_m, tau, gen)
        x0_F, _ = self.fake(x_tau, tau, cond, **extra)
        w_IS = importance_weight(x_tau, x0_F_target, xi, self.schedule.alpha(tau), self.schedule.sigma(tau),
                                 self.cfg.importance_weight)
        if self.fake.prediction_type == "flow":
            # §5: plain MSE on the fake's velocity, no importance weight: |v_F - v|^2 = |x0_F - x0_hat|^2 / sigma^2
            weight = self.schedule.sigma(tau).pow(-2).to(w_IS)
        else:
            weight = min_snr_weight(self.schedule.snr(tau), self.cfg.min_snr_gamma).to(w_IS) * w_IS
        L_F = fake_score_loss(x0_F, x0_F_target, weight)
        if self.cfg.fake_anchor > 0:
            # §5: anchor `fake_anchor * ||v_real - v_fake||^2` to the conditional teacher (one more forward)
            with torch.no_grad():
                x0_real, _ = self.teacher(x_tau, tau, cond)
            L_F = L_F + self.cfg.fake_anchor * fake_score_loss(x0_F, x0_real, self.schedule.sigma(tau).pow(-2))
        update("fake", L_F)

        # 5. Generator update: the single student step k_G with grad, matched at x_tau.
        t_k = grid[K - k_G]
        x0_hat, eps_hat = self.student(x_G, t_k, cond, **extra)
        t_m, tau = self.sample_t_m_tau(t_k, grid[K - k_G + 1], gen)
        x_tau, _ = self.diffuse(x0_hat.detach(), eps_hat.detach(), t_m, tau, gen)
        with torch.no_grad():
            x0_w, _ = cfg_denoise(self.teacher, x_tau, tau, cond, uncond, self.guidance)
            x0_F, _ = self.fake(x_tau, tau, cond, **extra)
        L_G, D = generator_loss(x0_hat, x0_w, x0_F, self.cfg.generator_loss, self.cfg.huber_c)
        update("student", L_G)

        counts = [net.reset_counters() for net in (self.student, self.fake, self.teacher)]
        return {
            "loss_fake": L_F.item(), "loss_student": L_G.item(), "D": D.mean().item(),
            "w_IS": w_IS.mean().item(), "K": K,
            "forwards": sum(c for c, _ in counts),             # network calls (CFG batched = 1)
            "forwards_batch_equiv": sum(r for _, r in counts) / B,  # samples processed / batch size
        }
