"""Digits family: the committed pixel-space UNet teacher on scikit-learn's 8x8 handwritten digits."""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path

import torch

from ..config import Config
from ..core.denoiser import Denoiser
from ..images.metrics import DigitEvaluator, digit_evaluator
from ..images.report import image_grid, quality_plot, write_report
from ..images.teacher import NUM_CLASSES, LabelUNet, load_teacher
from ..run import read_json
from ..scheduler_config import vp_schedule
from . import check_grids
from .base import Family


def teacher_dir(path: str) -> Path:
    """`digits` names the committed teacher; anything else is a folder written by `tdm teacher train`."""
    if path in ("", "digits"):
        return Path(str(resources.files("tdm") / "assets" / "digits" / "teacher"))
    return Path(path)


class DigitsFamily(Family):
    """Class-conditional 8x8 images; the distillation loop sees labels only, never images."""

    conditional = True
    num_classes = NUM_CLASSES
    teacher_steps = (1, 2, 4, 8, 25, 50)   # teacher sampler steps that `tdm eval` measures
    student_eval_Ks = (1, 2, 4)            # the student is shown at these K whatever it was trained for

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

    @property
    def evaluator(self) -> DigitEvaluator:
        return digit_evaluator()  # the classifier and the real digits: loaded on the first evaluation

    def sample_shape(self, n: int) -> tuple[int, ...]:
        return (n, 1, 8, 8)

    def sample_cond(self, n: int, generator: torch.Generator):
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=generator).to(self.device)
        return labels, torch.full_like(labels, NUM_CLASSES)

    def eval_cond(self, n: int, generator: torch.Generator):
        """The held-out set's labels (cycled to `n`), so FD compares like with like."""
        test_y = self.evaluator.split.test_y
        labels = test_y[torch.arange(n) % len(test_y)].to(self.device)
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

    # -- evaluation ---------------------------------------------------------------------
    def quality(self, x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> dict[str, float]:
        """Samples are clamped to the pixel range [-1, 1], as saving them as images would."""
        return self.evaluator.evaluate(x.float().cpu().clamp(-1, 1), labels.cpu())

    def reference(self, n: int, cond: torch.Tensor, generator: torch.Generator):
        """Real training digits with the held-out class shares, and their metrics: the floor at `n`."""
        return None, self.evaluator.floor(n, generator)

    def trajectory_quality(self, traj, labels: torch.Tensor, generator: torch.Generator) -> None:
        """The classifier only knows clean digits, so trajectory points are not scored for images."""
        return

    def figures(self, run_dir: Path, samples: dict, labels: torch.Tensor, metrics: dict) -> None:
        """`grid.png` (teacher at its most steps with CFG beside the student at each K), `quality.png`, `report.md`."""
        run_dir = Path(run_dir)
        rows = {}
        if samples["teacher"]:  # an evaluation of the student alone has none
            n_steps = max(samples["teacher"])
            rows[f"teacher {n_steps} steps, CFG {self.cfg.teacher.guidance:g}"] = samples["teacher"][n_steps]
        rows.update({f"student {K} step{'s' * (K > 1)}": x for K, x in samples["student"].items()})
        image_grid(rows, labels, run_dir / "grid.png")
        quality_plot(metrics, run_dir / "quality.png")
        write_report(metrics, run_dir / "report.md", self.cfg.student.steps)

    def save_samples(self, x: torch.Tensor, labels: torch.Tensor, path: Path) -> None:
        image_grid({"samples": x}, labels, path, columns=min(len(x), 40))


def teacher_check(path: str | Path, n_steps: int = 25, w: float = 2.0, seed: int = 0) -> dict:
    """FD and accuracy of a teacher's DDIM at `n_steps` with CFG `w` on the held-out labels.

    `tdm teacher train` records it in teacher.json, so a test can show the committed files reproduce it.
    """
    from ..core.samplers import sample_ddim
    from ..core.schedules import teacher_grid

    net, schedule, _ = load_teacher(path)
    teacher = Denoiser(net.eval(), schedule, "epsilon")
    evaluator = digit_evaluator()
    labels = evaluator.split.test_y
    x_T = torch.randn((len(labels), 1, 8, 8), generator=torch.Generator().manual_seed(seed))
    x = sample_ddim(teacher, x_T, teacher_grid(n_steps, schedule), labels, torch.full_like(labels, NUM_CLASSES), w)
    return {"sampler": "ddim", "steps": n_steps, "guidance": w, "seed": seed,
            **evaluator.evaluate(x.clamp(-1, 1), labels)}
