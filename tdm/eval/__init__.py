"""Judging runs: an evaluator per family kind (what `tdm eval` measures and draws), metrics as functions, reports.

An evaluator is built on a loaded family and offers `cond(n, generator)`, `quality(x, cond, generator, **law)`,
`figures(run_dir, samples, cond, metrics)`, `teacher_steps` and `student_eval_Ks`; where it has them,
`reference(n, cond, generator, **law)` (true samples: the floor), `trajectory_quality(traj, cond, generator)`,
`teacher_law` and `teacher_law_steps` (draws of its teacher's own law: the toy's exact one), or `teacher_law_sampler`
(the teacher's own law stands for its sampler at its most steps, on the evaluation's noise), `batch_size` (samples
per sampler call) and `settings` (recorded in metrics.json). Adding a metric is one function and the evaluator line
that reports it.
"""

from __future__ import annotations

import importlib

# measured with models the eval section names
LOCAL_MODEL_FAMILIES = ("sd15", "sdxl", "pixart", "sd3", "cogvideox", "flux", "wan")
EVALUATORS = {  # family -> (module, class)
    "toy": ("toy", "ToyEvaluator"),
    "digits": ("digits", "DigitsEvaluator"),
    "digits-sd": ("digits", "DigitsSDEvaluator"),
    **{family: ("diffusers", "DiffusersEvaluator") for family in LOCAL_MODEL_FAMILIES},
}


def evaluator_class(family: str) -> type:
    """The evaluator class of a family name, without loading the family."""
    module, cls = EVALUATORS[family]
    return getattr(importlib.import_module(f".{module}", __name__), cls)


def evaluator(family):
    """The evaluator of a loaded family (its `cfg.teacher.family` names it)."""
    return evaluator_class(family.cfg.teacher.family)(family)
