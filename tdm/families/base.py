"""The Family contract: what the trainer, the methods, `tdm eval` and `tdm sample` may ask of a teacher family.

A family is one adapter class (registered in `tdm/families/__init__.py`, with a preset and a row in the shared
family suite, tests/test_families.py); its quirks (loading, conditioning, shapes, decoding) stay in it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config
from ..core.denoiser import Cond, Denoiser
from ..core.schedules import Schedule


class Family:
    """Required: the attributes and methods below that raise. Optional (looked up with `hasattr`): `preview`
    (pictures during training), `label_cond` (`tdm sample --labels` on a prompt-conditioned family). What `tdm eval`
    measures lives in the family's evaluator (`tdm/eval/`), not here."""

    conditional: bool                   # conditions exist (classes, prompts): CFG applies
    schedule: Schedule                  # the teacher's noise schedule: the time axis of every role
    teacher: Denoiser                   # frozen; methods guide it at `cfg.teacher.guidance` through its `guided` call
                                        # (two-pass CFG; a family overrides it where guidance is an input)

    @staticmethod
    def check_inputs(cfg: Config, dry: bool = False) -> None:
        """The family's files and fields, reading configs and text only (before any network loads)."""
        raise NotImplementedError

    def sample_shape(self, n: int) -> tuple[int, ...]:
        """The shape of `n` samples (latents for latent teachers)."""
        raise NotImplementedError

    def sample_cond(self, n: int, generator: torch.Generator) -> tuple[Cond, Cond]:
        """`n` training conditions and their unconditional counterparts, drawn with a host `generator`."""
        raise NotImplementedError

    def pretrained_net(self, path: Path | None = None, generator: torch.Generator | None = None) -> torch.nn.Module:
        """What every role starts from (the teacher's network, or a fit cached at `path`)."""
        raise NotImplementedError

    def new_net(self) -> torch.nn.Module:
        """A network of the student's architecture, to load a finished run's weights into."""
        raise NotImplementedError

    def role_nets(self, pretrained: torch.nn.Module, roles: list[str]) -> dict[str, torch.nn.Module]:
        """A trainable network per role of the method (copies, or LoRA adapters on one frozen base)."""
        raise NotImplementedError

    def wrap(self, net: torch.nn.Module) -> Denoiser:
        """A role's network as a `Denoiser` on the teacher's schedule and parameterisation."""
        raise NotImplementedError

    def save_samples(self, x: torch.Tensor, cond: Cond, path: Path) -> None:
        """`tdm sample`'s picture of samples `x`."""
        raise NotImplementedError
