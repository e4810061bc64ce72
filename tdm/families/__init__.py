"""Teacher families: one adapter per family holds its quirks (loading, conditioning, shapes)."""

from __future__ import annotations

from ..config import Config

FAMILIES = ("toy", "digits", "sd15")


def build_family(cfg: Config, device="cpu", run_dir=None):
    """The adapter of `cfg.teacher.family`; `run_dir` holds caches (prompt embeddings)."""
    if cfg.teacher.family == "toy":
        from .toy import ToyFamily

        return ToyFamily(cfg, device)
    if cfg.teacher.family == "digits":
        from .digits import DigitsFamily

        return DigitsFamily(cfg, device)
    if cfg.teacher.family == "sd15":
        from .sd15 import SD15Family

        return SD15Family(cfg, device, run_dir)
    raise ValueError(f"unknown teacher family {cfg.teacher.family!r}; available: {', '.join(FAMILIES)}")
