"""Load a run directory, sample its student or its teacher, and measure both on the same keys."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from .config import Config, validate
from .denoiser import Denoiser
from .families import build_family
from .samplers import sample_ddim, sample_dpmpp_2m, sample_student
from .schedules import GridSpec, teacher_grid, timestep_grid

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
        s = self.cfg.student
        return timestep_grid(K, GridSpec(s.grid, s.grid_N, s.grid_shift), self.family.schedule.T,
                             self.family.schedule.discrete)


def load_run(run_dir: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Run:
    """A finished run's family and student on `device`, its frozen networks in `dtype`."""
    run_dir = Path(run_dir)
    for name in ("config.yaml", "student.safetensors"):
        if not (run_dir / name).exists():
            raise FileNotFoundError(f"{run_dir} is not a finished run: {name} is missing")
    cfg = Config.from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    validate(cfg)
    cfg.train.progress = False
    family = build_family(cfg, device, run_dir, dtype)
    net = family.student_and_fake(family.new_net())[0]
    net.load_state_dict(load_file(str(run_dir / "student.safetensors"), device=str(device)))
    return Run(cfg, family, family.wrap(net.eval()))


def draw(run: Run, n: int, generator: torch.Generator, labels: torch.Tensor | None = None):
    """Start noise and conditions for `n` samples (labels drawn from the teacher unless given)."""
    fam = run.family
    x_T = torch.randn(fam.sample_shape(n), generator=generator)
    cond, uncond = fam.sample_cond(n, generator)
    if labels is not None and torch.is_tensor(cond):
        cond = labels.to(cond)
    elif labels is not None:  # prompt-conditioned: the family picks a prompt per label, if it knows labels
        if not hasattr(fam, "label_cond"):
            raise ValueError(f"--labels needs a label-conditioned run; {run.cfg.teacher.family} runs take prompts")
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
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in d.items()}


def evaluate(run_dir: str | Path, n: int | None = None, seed: int = 0, steps=None) -> dict:
    """Student at its trained K (and the family's display Ks) and the teacher's samplers at `steps`.

    Every entry uses the same start noise and conditions; `reference` holds real samples, the floor
    each distance can reach at this sample count. Teacher `nfe` counts both CFG passes. Writes
    `metrics.json` and the family's figures into the run directory.
    """
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    fam, n = run.family, n or run.cfg.train.eval_samples
    steps = fam.teacher_steps if steps is None else steps
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(fam.sample_shape(n), generator=g)
    cond, uncond = fam.eval_cond(n, g)
    qual = lambda x: _rounded(fam.quality(x, cond, torch.Generator().manual_seed(seed + 1)))  # noqa: E731
    true, floor = fam.reference(n, cond, torch.Generator().manual_seed(seed + 2))
    cfg_passes = 1 if run.cfg.teacher.guidance == 1 else 2
    out = {"n_samples": n, "guidance": run.cfg.teacher.guidance, "reference": _rounded(floor), "student": {},
           "teacher": {name: {} for name in TEACHER_SAMPLERS}}
    samples = {"student": {}, "teacher": {}, "true": true}
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
    (run_dir / "metrics.json").write_text(json.dumps(out, indent=2))
    fam.figures(run_dir, samples, cond, out)
    return out
