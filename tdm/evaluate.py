"""Load a run directory, sample its student or its teacher, and measure both on the same keys."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

from .config import Config, validate
from .core.denoiser import Denoiser
from .core.samplers import sample_ddim, sample_dpmpp_2m, sample_student
from .core.schedules import teacher_grid
from .errors import RunError
from .families import build_family, family_class
from .run import CONFIG, STUDENT, write_json

TEACHER_SAMPLERS = {"ddim": sample_ddim, "dpmpp_2m": sample_dpmpp_2m}


@dataclass
class Run:
    cfg: Config
    family: object
    student: Denoiser

    @property
    def Ks(self) -> list[int]:
        return self.cfg.student.unify or [self.cfg.student.steps]

    def grid(self, K: int) -> torch.Tensor:
        return self.family.schedule.grid(K, self.cfg.student.grid_spec())


def run_config(run_dir: str | Path) -> Config:
    """A finished run's config, checked; nothing loads."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a run folder (it does not exist or is a file)")
    for name in (CONFIG, STUDENT):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir} is not a finished run: {name} is missing (`tdm distill` writes it at "
                                    "the end of training)")
    try:
        cfg = Config.from_dict(yaml.safe_load((run_dir / CONFIG).read_text(encoding="utf-8")))
    except (yaml.YAMLError, UnicodeDecodeError, AttributeError, KeyError, ValueError) as err:
        raise RunError(f"{run_dir / CONFIG} is not a config this tdm reads ({_first_line(err)})") from None
    validate(cfg)
    cfg.train.progress = False
    return cfg


def load_run(run_dir: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Run:
    """A finished run's family and student on `device`, its frozen networks in `dtype`."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    family = build_family(cfg, device, run_dir, dtype)
    net = family.role_nets(family.new_net(), ["student"])["student"]
    try:
        weights = load_file(str(run_dir / STUDENT), device=str(device))
        net.load_state_dict(weights)
    except (SafetensorError, RuntimeError, KeyError) as err:
        raise RunError(f"{run_dir / STUDENT} does not load into the run's network ({_first_line(err)}); it is "
                       "damaged or from another config") from None
    if not all(torch.isfinite(w).all() for w in weights.values()):
        raise RunError(f"{run_dir / STUDENT} holds non-finite weights (written before tdm's non-finite guard); "
                       "train the run again in another --output")
    return Run(cfg, family, family.wrap(net.eval()))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def draw(run: Run, n: int, generator: torch.Generator, labels: torch.Tensor | None = None):
    """Start noise and conditions for `n` samples (labels drawn from the teacher unless given)."""
    fam = run.family
    classes = getattr(fam, "num_classes", 0)
    if labels is not None and not classes:
        raise ValueError(f"--labels needs a class-conditional run; this {run.cfg.teacher.family} run has no classes")
    if labels is not None and not ((labels >= 0) & (labels < classes)).all():
        raise ValueError(f"--labels {labels.unique().tolist()}: this run's classes are 0..{classes - 1}")
    x_T = torch.randn(fam.sample_shape(n), generator=generator)
    cond, uncond = fam.sample_cond(n, generator)
    if labels is not None and torch.is_tensor(cond):
        cond = labels.to(cond)
    elif labels is not None:  # prompt-conditioned: the family picks a prompt per label
        cond = fam.label_cond(labels, generator)
    return x_T, cond, uncond


def student_sample(run: Run, K: int, x_T, cond, return_trajectory: bool = False):
    extra = {"k_steps": torch.tensor(K)} if run.cfg.student.unify else {}
    return sample_student(run.student, x_T, run.grid(K), cond, stochastic=run.cfg.student.stochastic,
                          generator=torch.Generator().manual_seed(0), return_trajectory=return_trajectory, **extra)


def teacher_sample(run: Run, sampler: str, nfe: int, x_T, cond, uncond):
    if sampler not in TEACHER_SAMPLERS:
        raise ValueError(f"unknown teacher sampler {sampler!r}; choose from {sorted(TEACHER_SAMPLERS)}")
    grid = teacher_grid(nfe, run.family.schedule)
    return TEACHER_SAMPLERS[sampler](run.family.teacher, x_T, grid, cond, uncond, run.cfg.teacher.guidance)


def _rounded(d: dict) -> dict:
    """Six decimals; a non-finite value (a metric undefined on these samples) is null: JSON has no NaN."""
    return {k: (round(v, 6) if math.isfinite(v) else None) if isinstance(v, float) else v for k, v in d.items()}


def evaluate(run_dir: str | Path, n: int | None = None, seed: int = 0, steps=None) -> dict:
    """Student at its trained K (and the family's display Ks) and the teacher's samplers at `steps`.

    Every entry uses the same start noise and conditions; `reference` holds real samples, the floor
    each distance can reach at this sample count. Where the family draws its teacher's own law (toy),
    entries also hold distances to it (`*_vs_teacher`) and `teacher_law` a second draw of it (that
    floor). Teacher `nfe` counts both CFG passes. Writes `metrics.json` and the family's figures into
    the run directory.
    """
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    family = cfg.teacher.family
    if not hasattr(family_class(family), "quality"):
        raise RunError(f"a {family} run has no built-in metric (`tdm eval` measures toy, digits and digits-sd runs); "
                       f"look at its samples: `tdm sample {run_dir} --n 8`")
    n = cfg.train.eval_samples if n is None else n
    if n < 1:
        raise RunError(f"{run_dir}: its train.eval_samples is 0; give the sample count: tdm eval {run_dir} --n N")
    run = load_run(run_dir)
    fam = run.family
    steps = fam.teacher_steps if steps is None else steps
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(fam.sample_shape(n), generator=g)
    cond, uncond = fam.eval_cond(n, g)
    # A family that can draw its teacher's own law (the toy's exact teacher) is measured against it too
    # (`*_vs_teacher`); `teacher_law` is a second, independent draw: that distance's floor, and the
    # teacher law's own distance to the true law.
    law = {}
    if hasattr(fam, "teacher_law"):
        law["teacher_law"] = fam.teacher_law(cond, torch.Generator().manual_seed(seed + 4))
    qual = lambda x: _rounded(fam.quality(x, cond, torch.Generator().manual_seed(seed + 1), **law))  # noqa: E731
    true, floor = fam.reference(n, cond, torch.Generator().manual_seed(seed + 2), **law)
    cfg_passes = 1 if run.cfg.teacher.guidance == 1 else 2
    out = {"n_samples": n, "guidance": run.cfg.teacher.guidance, "reference": _rounded(floor), "student": {},
           "teacher": {name: {} for name in TEACHER_SAMPLERS}}
    samples = {"student": {}, "teacher": {}, "true": true}
    if law:
        second = fam.teacher_law(cond, torch.Generator().manual_seed(seed + 5))
        out["teacher_law"] = {**qual(second), "nfe": fam.teacher_law_steps * cfg_passes}
        samples["teacher_law"] = second
    for K in sorted(set(run.Ks) | set(fam.student_eval_Ks)):
        x0, traj = student_sample(run, K, x_T, cond, return_trajectory=True)
        entry = {**qual(x0), "nfe": K, "trained": K in run.Ks}
        trajectory = fam.trajectory_quality(traj, cond, torch.Generator().manual_seed(seed + 3))
        if trajectory is not None:
            entry["trajectory"] = [_rounded(p) for p in trajectory]
        out["student"][f"K={K}"] = entry
        samples["student"][K] = x0
    for name in TEACHER_SAMPLERS:
        for n_steps in steps:
            x = teacher_sample(run, name, n_steps, x_T, cond, uncond)
            out["teacher"][name][f"steps={n_steps}"] = {**qual(x), "nfe": n_steps * cfg_passes}
            if name == "ddim":
                samples["teacher"][n_steps] = x
    write_json(run_dir / "metrics.json", out)
    fam.figures(run_dir, samples, cond, out)
    return out
