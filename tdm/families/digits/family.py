"""Digits family: the committed pixel-space UNet teacher on scikit-learn's 8x8 handwritten digits."""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path

import torch

from ...config import Config
from ...core.denoiser import Denoiser
from ...eval.report import image_grid
from ...files import read_json
from ...scheduler_config import vp_schedule
from .. import check_grids
from ..base import Family
from .teacher import NUM_CLASSES, LabelUNet, load_teacher


def teacher_dir(path: str) -> Path:
    """`digits` names the committed teacher; anything else is a folder written by `tdm teacher train`."""
    if path in ("", "digits"):
        return Path(str(resources.files("tdm") / "assets" / "digits" / "teacher"))
    return Path(path)


class DigitsFamily(Family):
    """Class-conditional 8x8 images; the distillation loop sees labels only, never images."""

    conditional = True
    num_classes = NUM_CLASSES

    @staticmethod
    def check_inputs(cfg: Config, dry: bool = False) -> None:
        """A folder written by `tdm teacher train --preset digits`: a UNet2DModel and its scheduler config."""
        folder = teacher_dir(cfg.teacher.path)
        if (folder / "model_index.json").is_file():
            raise ValueError(f"teacher.path={folder} is a diffusers pipeline folder; the digits preset takes a "
                             "folder written by `tdm teacher train --preset digits` (pipelines: sd15, sdxl, ... "
                             "presets)")
        for name in ("unet/config.json", "scheduler/scheduler_config.json"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"teacher.path={folder} holds no digits teacher ({name} is missing); train "
                                        "one with `tdm teacher train --preset digits --output DIR`")
        kind = read_json(folder / "unet" / "config.json").get("_class_name")
        if kind != "UNet2DModel":
            raise ValueError(f"teacher.path={folder}: unet/config.json names {kind}, not the UNet2DModel of a "
                             "digits teacher")
        check_grids(cfg, vp_schedule(read_json(folder / "scheduler" / "scheduler_config.json")))

    def __init__(self, cfg: Config, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.cfg = cfg
        self.device = torch.device(device)
        self.teacher_net, self.schedule, self.teacher_info = load_teacher(teacher_dir(cfg.teacher.path))
        self.teacher_net.requires_grad_(False).eval().to(self.device)
        self.frozen_teacher = copy.deepcopy(self.teacher_net).to(dtype)  # students start from the fp32 weights
        self.teacher = Denoiser(self.frozen_teacher, self.schedule, "epsilon")

    def sample_shape(self, n: int) -> tuple[int, ...]:
        return (n, 1, 8, 8)

    def sample_cond(self, n: int, generator: torch.Generator):
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=generator).to(self.device)
        return labels, torch.full_like(labels, NUM_CLASSES)

    # -- networks -----------------------------------------------------------------------
    def new_net(self) -> LabelUNet:
        return copy.deepcopy(self.teacher_net).requires_grad_(True).train()

    def pretrained_net(self, path: Path | None = None, generator: torch.Generator | None = None) -> LabelUNet:
        """Student and fake score start from the teacher itself (§2)."""
        return self.new_net()

    def role_nets(self, pretrained: LabelUNet, roles: list[str]) -> dict[str, LabelUNet]:
        return {role: copy.deepcopy(pretrained) for role in roles}

    def wrap(self, net) -> Denoiser:
        return Denoiser(net, self.schedule, "epsilon")

    def save_samples(self, x: torch.Tensor, labels: torch.Tensor, path: Path) -> None:
        image_grid({"samples": x}, labels, path, columns=min(len(x), 40))
