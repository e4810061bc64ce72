"""`tdm eval`: a finished run's student and its teacher's samplers, measured on the same noise and keys by the
family's evaluator."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import yaml

from ..config import set_field, validate
from ..core.denoiser import take_cond
from ..core.samplers import sample_ddim, sample_dpmpp_2m
from ..core.schedules import teacher_grid
from ..errors import RunError
from ..files import write_json
from ..run import Run, load_run, run_config
from . import evaluator_class

TEACHER_SAMPLERS = {"ddim": sample_ddim, "dpmpp_2m": sample_dpmpp_2m}


def teacher_sample(run: Run, sampler: str, nfe: int, x_T, cond, uncond):
    if sampler not in TEACHER_SAMPLERS:
        raise ValueError(f"unknown teacher sampler {sampler!r}; choose from {sorted(TEACHER_SAMPLERS)}")
    grid = teacher_grid(nfe, run.family.schedule)
    return TEACHER_SAMPLERS[sampler](run.family.teacher, x_T, grid, cond, uncond, run.cfg.teacher.guidance)


def _rounded(d: dict) -> dict:
    """Six decimals; a non-finite value (a metric undefined on these samples) is null: JSON has no NaN."""
    return {k: (round(v, 6) if math.isfinite(v) else None) if isinstance(v, float) else v for k, v in d.items()}


def _batched(sample, size: int, device, x_T: torch.Tensor, *conds) -> torch.Tensor:
    """`sample(x_T, *conds)` over `size` samples at a time on `device`; the samples on the CPU."""
    return torch.cat([sample(x_T[i:i + size].to(device), *(take_cond(c, slice(i, i + size)) for c in conds)).cpu()
                      for i in range(0, len(x_T), size)])


def apply_eval_overrides(cfg, overrides) -> None:
    """`tdm eval RUN eval.clip=PATH ...`: how to measure may differ from what training recorded; nothing else may,
    since the rest of the config is what the student was trained with."""
    for item in overrides:
        key, sep, raw = (part.strip() for part in item.partition("="))
        if not sep or not key.startswith("eval."):
            raise ValueError(f"{item!r}: `tdm eval` takes eval.* settings (key=value) only; the rest of a run's "
                             "config is what its student was trained with")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ValueError(f"{item!r}: the value is not valid YAML; e.g. {key}=[4,25] for a list") from None
        set_field(cfg, key, value, raw)
    validate(cfg)


def evaluate(run_dir: str | Path, n: int | None = None, seed: int = 0, steps=None, overrides=()) -> dict:
    """Student at its trained K (and the family's display Ks) and the teacher's samplers at `steps`.

    Every entry uses the same start noise and conditions; `reference` (where the evaluator has true samples) holds
    real samples, the floor each distance can reach at this sample count. Where the evaluator has the teacher's own
    law (toy: exact draws; diffusers: its DDIM at its most steps on the same noise), entries also hold distances to
    it (`*_vs_teacher`) and `teacher_law` a second, independent draw of it: what a sampler of exactly that law reads
    at this count (toy: the floor; diffusers: paired with the same noise, a student can read below it). Teacher
    `nfe` counts both CFG passes.
    `overrides`: eval.* settings for this evaluation. Writes `metrics.json` and the evaluator's figures into the
    run directory.
    """
    from ..families import DTYPES

    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    apply_eval_overrides(cfg, overrides)
    n = cfg.train.eval_samples if n is None else n
    judge_class = evaluator_class(cfg.teacher.family)
    if hasattr(judge_class, "check_run"):
        judge_class.check_run(cfg, run_dir, n)
    if n < 1:
        raise RunError(f"{run_dir}: its train.eval_samples is 0; give the sample count: tdm eval {run_dir} --n N")
    # Large teachers are measured on the GPU, their frozen networks in the run's precision; the toy and digits
    # numbers stay those of the CPU.
    on_gpu = getattr(judge_class, "accelerated", False) and torch.cuda.is_available()
    device, dtype = ("cuda", DTYPES[cfg.train.mixed_precision]) if on_gpu else ("cpu", torch.float32)
    run = load_run(run_dir, device, dtype, cfg)
    judge = judge_class(run.family)
    steps = judge.teacher_steps if steps is None else steps
    size = getattr(judge, "batch_size", n)
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(run.family.sample_shape(n), generator=g)
    cond, uncond = judge.cond(n, g)
    cfg_passes = 1 if run.cfg.teacher.guidance == 1 else 2
    samplers = getattr(judge, "teacher_samplers", tuple(TEACHER_SAMPLERS))
    teacher = {name: {} for name in samplers}
    for name in samplers:
        for n_steps in steps:
            sample = lambda x, c, u, s=name, k=n_steps: teacher_sample(run, s, k, x, c, u)  # noqa: E731
            teacher[name][n_steps] = _batched(sample, size, device, x_T, cond, uncond)
    # The teacher's own law: the toy's exact teacher, drawn; or a diffusers teacher's sampler at its most steps on
    # the same noise (the distillation's target). `second` is an independent draw of it: what every `*_vs_teacher`
    # distance reads at n for exactly the teacher's law, and (toy) the teacher law's own distance to the true law.
    law, second = {}, None
    if hasattr(judge, "teacher_law"):
        law["teacher_law"] = judge.teacher_law(cond, torch.Generator().manual_seed(seed + 4))
        second, law_nfe = judge.teacher_law(cond, torch.Generator().manual_seed(seed + 5)), judge.teacher_law_steps
    elif hasattr(judge, "teacher_law_sampler"):
        name, law_nfe = judge.teacher_law_sampler, max(steps)
        law["teacher_law"] = teacher[name][law_nfe]
        x_T2 = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(seed + 5))
        second = _batched(lambda x, c, u: teacher_sample(run, name, law_nfe, x, c, u), size, device, x_T2, cond,
                          uncond)
    qual = lambda x: _rounded(judge.quality(x, cond, torch.Generator().manual_seed(seed + 1), **law))  # noqa: E731
    out = {"n_samples": n, "guidance": run.cfg.teacher.guidance, **getattr(judge, "settings", {})}
    samples = {"student": {}, "teacher": teacher.get("ddim", {})}
    if hasattr(judge, "reference"):
        samples["true"], floor = judge.reference(n, cond, torch.Generator().manual_seed(seed + 2), **law)
        out["reference"] = _rounded(floor)
    if second is not None:
        out["teacher_law"] = {**qual(second), "nfe": law_nfe * cfg_passes}
        samples["teacher_law"] = second
    out["student"], out["teacher"] = {}, {name: {} for name in samplers}
    for K in sorted(set(run.Ks) | set(judge.student_eval_Ks)):
        entry = {"nfe": K, "trained": K in run.Ks}
        if hasattr(judge, "trajectory_quality"):  # one batch: the trajectory of the whole set
            x0, traj = run.sample(K, x_T, cond, return_trajectory=True)
            trajectory = judge.trajectory_quality(traj, cond, torch.Generator().manual_seed(seed + 3))
            if trajectory is not None:
                entry["trajectory"] = [_rounded(p) for p in trajectory]
        else:
            student_g = torch.Generator().manual_seed(0)
            x0 = _batched(lambda x, c, k=K: run.sample(k, x, c, generator=student_g), size, device, x_T, cond)
        out["student"][f"K={K}"] = {**qual(x0), **entry}
        samples["student"][K] = x0
    for name in samplers:
        for n_steps in steps:
            out["teacher"][name][f"steps={n_steps}"] = {**qual(teacher[name][n_steps]), "nfe": n_steps * cfg_passes}
    write_json(run_dir / "metrics.json", out)
    judge.figures(run_dir, samples, cond, out)
    return out
