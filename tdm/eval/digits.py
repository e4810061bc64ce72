"""The digits evaluators: samples (decoded for `digits-sd`) shown to the committed digit classifier, on the held-out
set's labels; FD, accuracy, precision and recall in its features (`digit_metrics.py`)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ..core.denoiser import Denoiser
from ..core.samplers import sample_ddim
from ..core.schedules import teacher_grid
from ..families.digits.teacher import NUM_CLASSES, load_teacher
from .digit_metrics import digit_metrics
from .report import image_grid, quality_plot, write_report


class DigitsEvaluator:
    """The pixel digits teacher's runs."""

    teacher_steps = (1, 2, 4, 8, 25, 50)   # teacher sampler steps that `tdm eval` measures
    student_eval_Ks = (1, 2, 4)            # the student is shown at these K whatever it was trained for
    columns = 20                           # samples per row of `grid.png`

    def __init__(self, family):
        self.family, self.cfg = family, family.cfg
        self.metrics = digit_metrics()  # the classifier and the real digits: loaded once per process

    def held_out(self, n: int) -> torch.Tensor:
        """The held-out set's labels, cycled to `n`, so FD compares like with like."""
        test_y = self.metrics.split.test_y
        return test_y[torch.arange(n) % len(test_y)]

    def cond(self, n: int, generator: torch.Generator):
        labels = self.held_out(n).to(self.family.device)
        return labels, torch.full_like(labels, NUM_CLASSES)

    def labels(self, cond) -> torch.Tensor:
        return cond.cpu()

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Samples clamped to the pixel range [-1, 1], as saving them as images would."""
        return x.float().cpu().clamp(-1, 1)

    def quality(self, x: torch.Tensor, cond, generator: torch.Generator) -> dict[str, float]:
        return self.metrics.evaluate(self.pixels(x), self.labels(cond))

    def reference(self, n: int, cond, generator: torch.Generator):
        """Real training digits with the held-out class shares, and their metrics: the floor at `n`."""
        return None, self.metrics.floor(n, generator)

    def trajectory_quality(self, traj, cond, generator: torch.Generator) -> None:
        """The classifier only knows clean digits, so trajectory points are not scored."""

    def figures(self, run_dir: Path, samples: dict, cond, metrics: dict) -> None:
        """`grid.png` (teacher at its most steps with CFG beside the student at each K), `quality.png`, `report.md`."""
        run_dir, rows = Path(run_dir), {}
        if samples["teacher"]:  # an evaluation of the student alone has none
            n_steps = max(samples["teacher"])
            rows[f"teacher {n_steps} steps, CFG {self.cfg.teacher.guidance:g}"] = samples["teacher"][n_steps]
        rows.update({f"student {K} step{'s' * (K > 1)}": x for K, x in samples["student"].items()})
        image_grid({name: self.pixels(x[:self.columns]) for name, x in rows.items()}, self.labels(cond),
                   run_dir / "grid.png", self.columns)
        quality_plot(metrics, run_dir / "quality.png")
        write_report(metrics, run_dir / "report.md", self.cfg.student.steps)


class DigitsSDEvaluator(DigitsEvaluator):
    """The `digits-sd` pipeline's runs: a prompt of each held-out label; latents decoded and pooled to 8x8."""

    teacher_steps = (4, 8, 25, 50)

    def cond(self, n: int, generator: torch.Generator):
        fam = self.family
        idx = fam.prompts_for(self.held_out(n), generator).to(fam.device)
        return fam._cond(idx), fam._cond(torch.full_like(idx, len(fam.prompts)))

    def labels(self, cond: dict) -> torch.Tensor:
        return cond["labels"].cpu()

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        return self.family.digits(x)


def teacher_check(path: str | Path, n_steps: int = 25, w: float = 2.0, seed: int = 0) -> dict:
    """FD and accuracy of a pixel digits teacher's DDIM at `n_steps` with CFG `w` on the held-out labels.

    `tdm teacher train` records it in teacher.json, so a test can show the committed files reproduce it.
    """
    net, schedule, _ = load_teacher(path)
    teacher = Denoiser(net.eval(), schedule, "epsilon")
    metrics = digit_metrics()
    labels = metrics.split.test_y
    x_T = torch.randn((len(labels), 1, 8, 8), generator=torch.Generator().manual_seed(seed))
    x = sample_ddim(teacher, x_T, teacher_grid(n_steps, schedule), labels, torch.full_like(labels, NUM_CLASSES), w)
    return {"sampler": "ddim", "steps": n_steps, "guidance": w, "seed": seed,
            **metrics.evaluate(x.clamp(-1, 1), labels)}


def sd_teacher_check(path: str | Path, n_steps: int = 25, w: float | None = None, seed: int = 0,
                     n: int = 450) -> dict:
    """FD and accuracy of a `digits-sd` teacher's DDIM at `n_steps` with CFG `w` (the preset's by default), on the
    same noise and prompts as `tdm eval` draws with `seed`. `tdm teacher train` records it in teacher.json."""
    from ..config import resolve
    from ..families.digits.sd import DigitsSDFamily

    cfg = resolve("digits-sd", [f"teacher.path={path}", "lora.enabled=false"])
    w = cfg.teacher.guidance if w is None else w
    with tempfile.TemporaryDirectory() as cache:   # prompt embeddings: not into the teacher folder
        fam = DigitsSDFamily(cfg, run_dir=cache)
    judge = DigitsSDEvaluator(fam)
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(fam.sample_shape(n), generator=g)
    cond, uncond = judge.cond(n, g)
    x = sample_ddim(fam.teacher, x_T, teacher_grid(n_steps, fam.schedule), cond, uncond, w)
    return {"sampler": "ddim", "steps": n_steps, "guidance": w, "seed": seed, "n": n, **judge.quality(x, cond, g)}
