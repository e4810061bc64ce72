"""The Method contract and the registry chosen by the config's `method:` key.

A method is one module `tdm/methods/<name>.py` defining `METHOD`, a `Method` subclass, plus its config section in
`tdm/config.py`. The trainer never names a method: it builds one network, optimiser and LR schedule per declared
role, calls `step` once per iteration and applies each role's update when the method asks for it.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from ..config import Config
    from ..core.denoiser import Cond, Denoiser
    from ..core.rng import RunRNG
    from ..core.schedules import Schedule

Update = Callable[[str, torch.Tensor], None]  # trainer callback: backward + optimiser step of a role
NOT_METHODS = {"base", "losses", "rows"}      # modules of the package that are no method


@dataclass(frozen=True)
class Role:
    """A trained network of a method. 'student' is the one sampled, saved and exported; every role starts from the
    family's pretrained network (a LoRA adapter of its own in LoRA mode) and trains with `optim.lr_<name>`."""

    name: str
    title: str                      # in messages: 'the fake score'
    clip: bool = False              # gradient norm clipped to optim.grad_clip
    metrics: tuple[str, ...] = ()   # metric keys computed from this role's update (null in the log if it is skipped)


class Method:
    """One training iteration of a distillation method.

    Subclasses set `roles` and `progress` (progress-bar label -> metric key) and implement `step` and `forwards`.
    """

    roles: tuple[Role, ...] = ()
    progress: tuple[tuple[str, str], ...] = ()
    student_ema: Denoiser | None = None   # the trainer's EMA of the student when optim.ema > 0 (set after __init__)

    def __init__(self, cfg: Config, schedule: Schedule, teacher: Denoiser, nets: dict[str, Denoiser],
                 fixed_shapes: bool = False):
        self.cfg = cfg
        self.schedule = schedule
        self.teacher = teacher                                # frozen, guided with cfg.teacher.guidance
        self.nets = nets                                      # role name -> Denoiser
        self.fixed_shapes = fixed_shapes                      # the same tensor shapes every call (torch.compile)
        self.Ks = cfg.student.unify or [cfg.student.steps]    # one K, or TDM-unify's set (§6)
        self.grids = {K: schedule.grid(K, cfg.student.grid_spec()) for K in self.Ks}

    @property
    def student(self) -> Denoiser:
        return self.nets["student"]

    def step(self, x_T: torch.Tensor, cond: Cond, uncond: Cond, update: Update, rng: RunRNG) -> dict:
        """One iteration: every role's update through `update(role, loss)`; returns metrics (device tensors are
        read by the trainer at log steps only)."""
        raise NotImplementedError

    @classmethod
    def forwards(cls, cfg: Config) -> dict[str, float]:
        """Upper bounds of one iteration's cost: `network_calls` (CFG batched = 1) and `batch_equivalents`."""
        raise NotImplementedError


def method_names() -> list[str]:
    """Every method module of this package."""
    from .. import methods

    return sorted(m.name for m in pkgutil.iter_modules(methods.__path__) if m.name not in NOT_METHODS)


def method_class(name: str) -> type[Method]:
    if name not in method_names():
        raise ValueError(f"method={name!r} is not one of {', '.join(method_names())}")
    return importlib.import_module(f"{__package__}.{name}").METHOD


def role_names(cfg: Config) -> list[str]:
    """The roles the configured method trains, 'student' first."""
    return [r.name for r in method_class(cfg.method).roles]
