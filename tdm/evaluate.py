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
from .plots import scatter_panels
from .samplers import sample_ddim, sample_dpmpp_2m, sample_student
from .schedules import GridSpec, teacher_grid, timestep_grid

TEACHER_SAMPLERS = {"ddim": sample_ddim, "dpmpp_2m": sample_dpmpp_2m}
TEACHER_NFES = (1, 2, 4, 8, 50)


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


def load_run(run_dir: str | Path) -> Run:
    run_dir = Path(run_dir)
    for name in ("config.yaml", "student.safetensors"):
        if not (run_dir / name).exists():
            raise FileNotFoundError(f"{run_dir} is not a finished run: {name} is missing")
    cfg = Config.from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    validate(cfg)
    cfg.train.progress = False
    family = build_family(cfg)
    net = family.student_and_fake(family.new_net())[0]
    net.load_state_dict(load_file(str(run_dir / "student.safetensors")))
    return Run(cfg, family, family.wrap(net.eval()))


def draw(run: Run, n: int, generator: torch.Generator, labels: torch.Tensor | None = None):
    """Start noise and conditions for `n` samples (labels drawn from the teacher unless given)."""
    fam = run.family
    x_T = torch.randn(fam.sample_shape(n), generator=generator)
    cond, uncond = fam.sample_cond(n, generator)
    if labels is not None:
        cond = labels.to(cond)
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


def evaluate(run_dir: str | Path, n: int | None = None, seed: int = 0, nfes=TEACHER_NFES) -> dict:
    """Student at its trained K (every K for unify) and the teacher's samplers at `nfes`, same metrics.

    Every entry uses the same start noise and labels; `reference` is a second draw of true samples,
    the floor each distance can reach at this sample count. Writes `metrics.json` and `samples.png`.
    """
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    fam, n = run.family, n or run.cfg.train.eval_samples
    g = torch.Generator().manual_seed(seed)
    x_T, cond, uncond = draw(run, n, g)
    qual = lambda x, **kw: _rounded(fam.quality(x, cond, torch.Generator().manual_seed(seed + 1), **kw))  # noqa: E731
    true, _ = fam.mixture.sample(n, torch.Generator().manual_seed(seed + 2), cond if fam.conditional else None)
    out = {"n_samples": n, "guidance": run.cfg.teacher.guidance, "reference": qual(true), "student": {},
           "teacher": {name: {} for name in TEACHER_SAMPLERS}}
    samples = {"true": true}
    for K in run.Ks:
        x0, traj = student_sample(run, K, x_T, cond, return_trajectory=True)
        entry = qual(x0)
        entry["nfe"] = K
        # distance of every trajectory point x_{t_k} to the true marginal at t_k (§3)
        entry["trajectory"] = [
            {"t": int(t), **qual(x, alpha=fam.schedule.alpha(t).item(), sigma=fam.schedule.sigma(t).item())}
            for t, x in zip(traj.t, traj.x)
        ]
        out["student"][f"K={K}"] = entry
        samples[f"student K={K}"] = x0
    for name in TEACHER_SAMPLERS:
        for nfe in nfes:
            x = teacher_sample(run, name, nfe, x_T, cond, uncond)
            out["teacher"][name][f"nfe={nfe}"] = {**qual(x), "nfe": nfe * (1 if run.cfg.teacher.guidance == 1 else 2)}
            if name == "ddim" and nfe in (max(run.Ks), max(nfes)):  # plot the teacher at the student's NFE and its best
                samples[f"teacher DDIM {nfe} steps"] = x
    (run_dir / "metrics.json").write_text(json.dumps(out, indent=2))
    scatter_panels(samples, cond if fam.conditional else None, run_dir / "samples.png")
    return out
