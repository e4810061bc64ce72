"""Teacher families: one adapter per family holds its quirks (loading, conditioning, shapes)."""

from __future__ import annotations

from ..config import Config

FAMILIES = ("toy",)


def build_family(cfg: Config, device="cpu"):
    if cfg.teacher.family == "toy":
        from .toy import ToyFamily

        return ToyFamily(cfg, device)
    raise ValueError(f"unknown teacher family {cfg.teacher.family!r}; available: {', '.join(FAMILIES)}")
