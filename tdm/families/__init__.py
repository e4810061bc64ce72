"""Teacher families: one adapter per family holds its quirks (loading, conditioning, shapes)."""

from __future__ import annotations

import importlib

import torch

from ..config import Config

# frozen networks' dtype under each `train.mixed_precision`
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

FAMILIES = ("toy", "digits", "sd15", "sdxl", "pixart", "sd3", "cogvideox", "digits-sd")
_DIFFUSERS = {  # family -> (module, class): one small adapter file each
    "sd15": ("sd15", "SD15Family"),
    "sdxl": ("sdxl", "SDXLFamily"),
    "pixart": ("pixart", "PixArtFamily"),
    "sd3": ("sd3", "SD3Family"),
    "cogvideox": ("cogvideox", "CogVideoXFamily"),
    "digits-sd": ("digits_sd", "DigitsSDFamily"),   # sd15 plus the digit classifier's metrics
}


def family_class(name: str):
    """A diffusers family's adapter class, without loading anything."""
    module, cls = _DIFFUSERS[name]
    return getattr(importlib.import_module(f".{module}", __name__), cls)


def build_family(cfg: Config, device="cpu", run_dir=None, dtype: torch.dtype = torch.float32):
    """The adapter of `cfg.teacher.family`; `run_dir` holds caches (prompt embeddings); frozen networks are held
    in `dtype` (the toy teacher is exact maths in float64)."""
    if cfg.teacher.family == "toy":
        from .toy import ToyFamily

        return ToyFamily(cfg, device)
    if cfg.teacher.family == "digits":
        from .digits import DigitsFamily

        return DigitsFamily(cfg, device, dtype)
    if cfg.teacher.family in _DIFFUSERS:
        return family_class(cfg.teacher.family)(cfg, device, run_dir, dtype)
    raise ValueError(f"unknown teacher family {cfg.teacher.family!r}; available: {', '.join(FAMILIES)}")
