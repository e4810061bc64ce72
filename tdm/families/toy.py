"""Toy family: an exact Gaussian-mixture teacher, MLP student and fake score."""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from ..config import Config
from ..core.denoiser import Denoiser
from ..core.schedules import VPSchedule
from ..gmm import REFERENCE_STEPS, ExactGMMNet, GaussianMixture, sample_teacher_law
from ..metrics import energy_distance, mode_stats, sliced_wasserstein
from ..plots import scatter_panels
from ..run import save_tensors
from . import check_grids
from .base import Family
from .mlp import MLPDenoiserNet, fit_diffusion


def load_mixture(name_or_path: str) -> GaussianMixture:
    """An embedded mixture by name (`ring8`, `cond4d`) or a YAML/JSON file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml", ".json"):
        if not path.is_file():
            raise FileNotFoundError(f"teacher.mixture: {path} is not a file; give a .yaml/.json mixture file or "
                                    "one of ring8, cond4d")
        return GaussianMixture.from_file(path)
    embedded = resources.files("tdm.presets") / f"{name_or_path}.yaml"
    if not embedded.is_file():
        raise ValueError(f"teacher.mixture={name_or_path!r} is neither a .yaml/.json file nor one of ring8, cond4d")
    return GaussianMixture.from_dict(yaml.safe_load(embedded.read_text()), source=name_or_path)


class ToyFamily(Family):
    """Everything the method and trainer need to know about the toy teacher."""

    teacher_steps = (1, 2, 4, 8, 50)   # teacher sampler steps that `tdm eval` measures
    student_eval_Ks = ()               # only the trained K
    teacher_law_steps = REFERENCE_STEPS  # denoiser evaluations of the sampler of the teacher's own law

    @staticmethod
    def check_inputs(cfg: Config, dry: bool = False) -> None:
        """The mixture reads, CFG has classes to guide towards, the student's grid fits the schedule."""
        t = cfg.teacher
        mixture = load_mixture(t.mixture)
        if t.guidance != 1 and mixture.labels is None:
            raise ValueError(f"teacher.guidance={t.guidance:g} needs a class-conditional mixture; {t.mixture} has no "
                             "labels (use teacher.guidance=1, or cond4d)")
        check_grids(cfg, VPSchedule.from_betas(t.beta_schedule, t.beta_start, t.beta_end))

    def __init__(self, cfg: Config, device: torch.device | str = "cpu"):
        t = cfg.teacher
        self.cfg = cfg
        self.device = torch.device(device)
        self.mixture = load_mixture(t.mixture)
        self.schedule = VPSchedule.from_betas(t.beta_schedule, t.beta_start, t.beta_end)
        self.teacher = Denoiser(ExactGMMNet(self.mixture, self.schedule), self.schedule, "sample")
        self.max_K = max(cfg.student.unify) if cfg.student.unify else 0

    @property
    def conditional(self) -> bool:
        return self.mixture.labels is not None

    @property
    def num_classes(self) -> int:
        return self.mixture.num_classes

    def sample_shape(self, n: int) -> tuple[int, ...]:
        return (n, self.mixture.dim)

    def sample_cond(self, n: int, generator: torch.Generator):
        """Conditions for a batch (class labels) and the matching unconditional ones."""
        labels = self.mixture.sample_labels(n, generator).to(self.device)
        return labels, torch.full_like(labels, self.mixture.null_label)

    # -- networks -----------------------------------------------------------------------
    def new_net(self) -> MLPDenoiserNet:
        n = self.cfg.net
        return MLPDenoiserNet(self.mixture.dim, self.mixture.num_classes, n.hidden, n.depth)

    def pretrained_net(self, path: Path | None = None, generator: torch.Generator | None = None) -> MLPDenoiserNet:
        """The 'pretrained diffusion model' fitted to mixture samples; cached at `path`."""
        net = self.new_net()
        if path is not None and path.exists():
            net.load_state_dict(load_file(str(path)))
            return net
        n = self.cfg.net
        fit_diffusion(net, self.mixture, self.schedule, n.prediction_type, n.pretrain_steps, n.pretrain_batch,
                      n.pretrain_lr, generator=generator, progress=self.cfg.train.progress)
        if path is not None:
            save_tensors(net.state_dict(), path)
        return net

    def role_nets(self, pretrained: MLPDenoiserNet, roles: list[str]) -> dict[str, MLPDenoiserNet]:
        """A copy of the pretrained network per role, K-conditioned for TDM-unify (§6); TDM's fake score told the
        step k under `tdm.interval=shared` (§4 step 3)."""
        nets = {role: copy.deepcopy(pretrained) for role in roles}
        if self.max_K:
            for net in nets.values():
                net.add_k_conditioning(self.max_K)
        s = self.cfg.student
        if "fake" in nets and self.cfg.method == "tdm" and self.cfg.tdm.interval == "shared":
            nets["fake"].add_step_conditioning(max(s.unify or [s.steps]))
        return nets

    def wrap(self, net) -> Denoiser:
        return Denoiser(net, self.schedule, self.cfg.net.prediction_type)

    # -- evaluation ---------------------------------------------------------------------
    def eval_cond(self, n: int, generator: torch.Generator):
        return self.sample_cond(n, generator)

    def quality(self, x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                alpha: float = 1.0, sigma: float = 0.0, teacher_law: torch.Tensor | None = None) -> dict[str, float]:
        """Distances of samples to fresh draws of the true law (the marginal at (alpha, sigma)), and with
        `teacher_law` (draws from `teacher_law()`) to the teacher's own law: `energy_distance_vs_teacher`,
        `sliced_w1_vs_teacher`. `energy_distance` and `sliced_w1` are always to the true law."""
        cond = labels if self.conditional else None
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
        true, _ = self.mixture.sample(n, generator, labels if self.conditional else None)
        return true, self.quality(true, labels, generator, teacher_law=teacher_law)

    def teacher_law(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Draws of the teacher's own law at its guidance, one per label: what its samplers tend to with many steps.

        The guided probability-flow ODE (`sample_teacher_law`) from the teacher's top time T - 1, started from
        the exact marginal of each sample's class there (the samplers start from N(0, I), which differs from it
        by alpha_{T-1} = 0.068 times the means). With guidance 1 this is the true law.
        """
        t_top = torch.tensor(float(self.schedule.T - 1))
        a, s = self.schedule.alpha(t_top).item(), self.schedule.sigma(t_top).item()
        cond = labels.cpu() if self.conditional else None
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
        scatter_panels(panels, labels if self.conditional else None, Path(run_dir) / "samples.png")

    def save_samples(self, x: torch.Tensor, labels: torch.Tensor, path: Path) -> None:
        scatter_panels({path.stem: x}, labels if self.conditional else None, path)
