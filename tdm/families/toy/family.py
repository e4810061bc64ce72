"""Toy family: an exact Gaussian-mixture teacher, MLP student and fake score."""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from ...config import Config
from ...core.denoiser import Denoiser
from ...core.schedules import VPSchedule
from ...eval.plots import scatter_panels
from ...files import save_tensors
from .. import check_grids
from ..base import Family
from .gmm import ExactGMMNet, GaussianMixture
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

    def save_samples(self, x: torch.Tensor, labels: torch.Tensor, path: Path) -> None:
        scatter_panels({path.stem: x}, labels if self.conditional else None, path)
