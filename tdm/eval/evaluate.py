"""`tdm eval`: a finished run's student and its teacher's samplers, measured on the same noise and keys by the
family's evaluator."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..core.samplers import sample_ddim, sample_dpmpp_2m
from ..core.schedules import teacher_grid
from ..errors import RunError
from ..files import write_json
from ..run import Run, load_run, run_config
from . import evaluator, has_evaluator

TEACHER_SAMPLERS = {"ddim": sample_ddim, "dpmpp_2m": sample_dpmpp_2m}


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
    each distance can reach at this sample count. Where the evaluator draws the teacher's own law (toy),
    entries also hold distances to it (`*_vs_teacher`) and `teacher_law` a second draw of it (that
    floor). Teacher `nfe` counts both CFG passes. Writes `metrics.json` and the evaluator's figures into
    the run directory.
    """
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    family = cfg.teacher.family
    if not has_evaluator(family):
        raise RunError(f"a {family} run has no built-in metric (`tdm eval` measures toy, digits and digits-sd runs); "
                       f"look at its samples: `tdm sample {run_dir} --n 8`")
    n = cfg.train.eval_samples if n is None else n
    if n < 1:
        raise RunError(f"{run_dir}: its train.eval_samples is 0; give the sample count: tdm eval {run_dir} --n N")
    run = load_run(run_dir)
    judge = evaluator(run.family)
    steps = judge.teacher_steps if steps is None else steps
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(run.family.sample_shape(n), generator=g)
    cond, uncond = judge.cond(n, g)
    # An evaluator that can draw the teacher's own law (the toy's exact teacher) is measured against it too
    # (`*_vs_teacher`); `teacher_law` is a second, independent draw: that distance's floor, and the
    # teacher law's own distance to the true law.
    law = {}
    if hasattr(judge, "teacher_law"):
        law["teacher_law"] = judge.teacher_law(cond, torch.Generator().manual_seed(seed + 4))
    qual = lambda x: _rounded(judge.quality(x, cond, torch.Generator().manual_seed(seed + 1), **law))  # noqa: E731
    true, floor = judge.reference(n, cond, torch.Generator().manual_seed(seed + 2), **law)
    cfg_passes = 1 if run.cfg.teacher.guidance == 1 else 2
    out = {"n_samples": n, "guidance": run.cfg.teacher.guidance, "reference": _rounded(floor), "student": {},
           "teacher": {name: {} for name in TEACHER_SAMPLERS}}
    samples = {"student": {}, "teacher": {}, "true": true}
    if law:
        second = judge.teacher_law(cond, torch.Generator().manual_seed(seed + 5))
        out["teacher_law"] = {**qual(second), "nfe": judge.teacher_law_steps * cfg_passes}
        samples["teacher_law"] = second
    for K in sorted(set(run.Ks) | set(judge.student_eval_Ks)):
        x0, traj = run.sample(K, x_T, cond, return_trajectory=True)
        entry = {**qual(x0), "nfe": K, "trained": K in run.Ks}
        trajectory = judge.trajectory_quality(traj, cond, torch.Generator().manual_seed(seed + 3))
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
    judge.figures(run_dir, samples, cond, out)
    return out
