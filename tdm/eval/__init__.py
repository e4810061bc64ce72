"""Judging runs: an evaluator per family kind (what `tdm eval` measures and draws), metrics as functions, reports.

An evaluator is built on a loaded family and offers `cond(n, generator)`, `quality(x, cond, generator, **law)`,
`reference(n, cond, generator, **law)`, `trajectory_quality(traj, cond, generator)`, `figures(run_dir, samples, cond,
metrics)`, `teacher_steps` and `student_eval_Ks`; `teacher_law` and `teacher_law_steps` where it can draw its
teacher's own law. Adding a metric is one function and the evaluator line that reports it.
"""

from __future__ import annotations

import importlib

EVALUATORS = {  # family -> (module, class)
    "toy": ("toy", "ToyEvaluator"),
    "digits": ("digits", "DigitsEvaluator"),
    "digits-sd": ("digits", "DigitsSDEvaluator"),
}


def has_evaluator(family: str) -> bool:
    return family in EVALUATORS


def evaluator(family):
    """The evaluator of a loaded family (its `cfg.teacher.family` names it)."""
    module, cls = EVALUATORS[family.cfg.teacher.family]
    return getattr(importlib.import_module(f".{module}", __name__), cls)(family)
