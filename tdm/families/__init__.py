"""Teacher families: one adapter per family holds its quirks (loading, conditioning, shapes)."""

from __future__ import annotations

from ..config import Config

FAMILIES = ("toy", "digits")


def build_family(cfg: Config, device="cpu"):
    if cfg.teacher.family == "toy":
        from .toy import ToyFamily

        return ToyFamily(cfg, device)
    if cfg.teacher.family == "digits":
        from .digits import DigitsFamily

        return DigitsFamily(cfg, device)
    raise ValueError(f"unknown teacher family {cfg.teacher.family!r}; available: {', '.join(FAMILIES)}")
