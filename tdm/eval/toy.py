"""The toy evaluator: distances to the exact mixture's true law and to the guided teacher's own law."""

from __future__ import annotations

from pathlib import Path

import torch

from ..families.toy.gmm import REFERENCE_STEPS, sample_teacher_law
from .metrics import energy_distance, mode_stats, sliced_wasserstein
from .plots import scatter_panels


class ToyEvaluator:
    """Everything `tdm eval` measures on a toy run."""

    teacher_steps = (1, 2, 4, 8, 50)     # teacher sampler steps that `tdm eval` measures
    student_eval_Ks = ()                 # only the trained K
    teacher_law_steps = REFERENCE_STEPS  # denoiser evaluations of the sampler of the teacher's own law

    def __init__(self, family):
        self.family, self.cfg = family, family.cfg
        self.mixture, self.schedule = family.mixture, family.schedule

    def cond(self, n: int, generator: torch.Generator):
        return self.family.sample_cond(n, generator)

    def quality(self, x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                alpha: float = 1.0, sigma: float = 0.0, teacher_law: torch.Tensor | None = None) -> dict[str, float]:
        """Distances of samples to fresh draws of the true law (the marginal at (alpha, sigma)), and with
        `teacher_law` (draws from `teacher_law()`) to the teacher's own law: `energy_distance_vs_teacher`,
        `sliced_w1_vs_teacher`. `energy_distance` and `sliced_w1` are always to the true law."""
        cond = labels if self.family.conditional else None
        ref, _ = self.mixture.sample(x.shape[0], generator, cond, alpha, sigma)
        x = x.float().cpu()
        out = {"energy_distance": energy_distance(x, ref),
               "sliced_w1": sliced_wasserstein(x, ref, generator=generator)}
        if teacher_law is not None:
            out["energy_distance_vs_teacher"] = energy_distance(x, teacher_law)
            out["sliced_w1_vs_teacher"] = sliced_wasserstein(x, teacher_law, generator=generator)
        if sigma == 0:
            out.update(mode_stats(self.mixture, x, cond))
        return out

    def reference(self, n: int, labels: torch.Tensor, generator: torch.Generator,
                  teacher_law: torch.Tensor | None = None):
        """A second draw of true samples, and its metrics: the floor at `n` samples."""
        true, _ = self.mixture.sample(n, generator, labels if self.family.conditional else None)
        return true, self.quality(true, labels, generator, teacher_law=teacher_law)

    def teacher_law(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Draws of the teacher's own law at its guidance, one per label: what its samplers tend to with many steps.

        The guided probability-flow ODE (`sample_teacher_law`) from the teacher's top time T - 1, started from
        the exact marginal of each sample's class there (the samplers start from N(0, I), which differs from it
        by alpha_{T-1} = 0.068 times the means). With guidance 1 this is the true law.
        """
        t_top = torch.tensor(float(self.schedule.T - 1))
        a, s = self.schedule.alpha(t_top).item(), self.schedule.sigma(t_top).item()
        cond = labels.cpu() if self.family.conditional else None
        x_top, _ = self.mixture.sample(labels.shape[0], generator, cond, a, s)
        return sample_teacher_law(self.mixture, x_top, a, s, cond, self.cfg.teacher.guidance)

    def trajectory_quality(self, traj, labels: torch.Tensor, generator: torch.Generator) -> list[dict]:
        """Distance of every student point x_{t_k} to the true marginal at t_k (§3)."""
        return [{"t": int(t), **self.quality(x, labels, generator, self.schedule.alpha(t).item(),
                                             self.schedule.sigma(t).item())} for t, x in zip(traj.t, traj.x)]

    def figures(self, run_dir: Path, samples: dict, labels: torch.Tensor, metrics: dict) -> None:
        """`samples.png`: true law, the guided teacher's law, students, and the teacher's DDIM at the student's K and at
        its most steps."""
        K = max(samples["student"])
        panels = {"true": samples["true"]}
        if "teacher_law" in samples and self.cfg.teacher.guidance != 1:  # with guidance 1 it is the true law
            panels[f"teacher law (w={self.cfg.teacher.guidance:g})"] = samples["teacher_law"]
        panels.update({f"student K={k}": x for k, x in samples["student"].items()})
        teacher = samples["teacher"]  # empty when evaluated without teacher samplers
        for n_steps in sorted({K, max(teacher, default=K)} & set(teacher)):
            panels[f"teacher DDIM {n_steps} steps"] = teacher[n_steps]
        scatter_panels(panels, labels if self.family.conditional else None, Path(run_dir) / "samples.png")
