"""Teacher families: one adapter per family holds its quirks (loading, conditioning, shapes)."""

from __future__ import annotations

import importlib
import importlib.util

import torch

from ..config import FAMILIES, Config, validate
from ..eval import LOCAL_MODEL_FAMILIES
from ..eval.encoders import check_eval_section

# frozen networks' dtype under each `train.mixed_precision`
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

DIFFUSERS = {  # family -> (module, class): one small adapter file each
    "sd15": ("diffusers.sd15", "SD15Family"),
    "sdxl": ("diffusers.sdxl", "SDXLFamily"),
    "pixart": ("diffusers.pixart", "PixArtFamily"),
    "sd3": ("diffusers.sd3", "SD3Family"),
    "cogvideox": ("diffusers.cogvideox", "CogVideoXFamily"),
    "wan": ("diffusers.wan", "WanFamily"),
    "digits-sd": ("digits.sd", "DigitsSDFamily"),   # sd15 plus the digit classifier's metrics
    "flux": ("diffusers.flux", "FluxFamily"),
}
_CLASSES = {"toy": ("toy.family", "ToyFamily"), "digits": ("digits.family", "DigitsFamily"), **DIFFUSERS}

# Fields that only some families read: set for another family, they would be silently ignored.
_TOY, _DIFF = ("toy",), tuple(DIFFUSERS)
ONLY = {
    "teacher.path": tuple(f for f in FAMILIES if f != "toy"),
    **{f"teacher.{k}": _TOY for k in ("mixture", "beta_schedule", "beta_start", "beta_end")},
    **{f"net.{k}": _TOY for k in ("prediction_type", "hidden", "depth", "pretrain_steps", "pretrain_batch",
                                  "pretrain_lr")},
    # the step-count embedding (§6): the toy MLP's, and added to a diffusers network's time embedding (RoleNet)
    "student.unify": ("toy", *_DIFF),
    "teacher.resolution": _DIFF, "teacher.frames": ("cogvideox", "wan"), "teacher.width": ("wan",),
    "student.guidance_embedding": ("flux",),
    **{f"data.{k}": _DIFF for k in ("prompts", "max_prompt_chars")},
    **{f"lora.{k}": _DIFF for k in ("enabled", "rank", "alpha", "targets")},
    **{f"train.{k}": _DIFF for k in ("preview_every", "validation_prompts", "gradient_checkpointing",
                                     "channels_last", "compile", "teacher_offload")},
    **{f"eval.{k}": LOCAL_MODEL_FAMILIES for k in ("clip", "features", "real_images", "teacher_steps", "batch_size")},
}


def fields_read(cfg: Config) -> dict:
    """`cfg` as a nested dict without the fields its family never reads (ONLY) and the sections of methods that do
    not run: what `tdm presets --show` prints, itself a valid `--config` file."""
    from ..methods.base import method_names

    d = cfg.to_dict()
    for key, families in ONLY.items():
        section, name = key.split(".")
        if cfg.teacher.family not in families:
            del d[section][name]
    for name in method_names():
        if name != cfg.method:
            del d[name]
    return {k: v for k, v in d.items() if v != {}}


def family_class(name: str):
    """A family's adapter class, without loading anything."""
    if name not in _CLASSES:
        raise ValueError(f"unknown teacher family {name!r}; available: {', '.join(FAMILIES)}")
    module, cls = _CLASSES[name]
    return getattr(importlib.import_module(f".{module}", __name__), cls)


def check_inputs(cfg: Config, dry: bool = False) -> None:
    """Validation before anything loads: every field (`config.validate`), fields the family would ignore, then the
    family's own inputs (teacher folder against the family, prompts, mixture file), reading configs and text only.
    `dry` (a dry run): inputs not given yet are not required."""
    validate(cfg)
    family = cfg.teacher.family
    default = Config()
    for key, families in ONLY.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if family not in families and value != getattr(getattr(default, section), name):
            raise ValueError(f"{key}={value!r} is not used by the {family} family (only by {', '.join(families)}); "
                             "remove it")
    if cfg.method == "tdm" and cfg.tdm.interval == "shared" and family != "toy":
        raise ValueError(f"tdm.interval=shared needs a fake score told the step k (§4 step 3), which only the toy "
                         f"family's MLP has, not the {family} family; use tdm.interval=separate or randmid")
    cls = family_class(family)
    if family in LOCAL_MODEL_FAMILIES:
        check_eval_section(cfg)
    if cfg.train.validation_prompts and not cfg.train.preview_every:
        raise ValueError("train.validation_prompts are sampled at preview steps: set train.preview_every=N")
    if cfg.optim.adam_8bit and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("optim.adam_8bit=true needs bitsandbytes: pip install bitsandbytes")
    tracker = cfg.train.report_to
    if tracker != "none" and importlib.util.find_spec(tracker) is None:
        raise ValueError(f"train.report_to={tracker} needs the {tracker} package: pip install {tracker}, or set "
                         "train.report_to=none")
    cls.check_inputs(cfg, dry)


def check_grids(cfg: Config, schedule) -> None:
    """The student's grid(s) and the tau margins on the teacher's schedule (its timestep count), before any network
    loads; each family calls it once its schedule is known."""
    s, c = cfg.student, cfg.tdm
    for K in s.unify or [s.steps]:
        try:
            schedule.grid(K, s.grid_spec())
        except ValueError as err:
            raise ValueError(f"student.grid={s.grid} with K={K} steps (grid_N={s.grid_N}) does not fit the "
                             f"teacher's {schedule.T} timesteps: {err}") from None
    for key, v in (("tdm.tau_min", c.tau_min), ("tdm.tau_margin", c.tau_margin)):
        if v >= schedule.T:
            raise ValueError(f"{key}={v} must be below the teacher's {schedule.T} timesteps")


def build_family(cfg: Config, device="cpu", run_dir=None, dtype: torch.dtype = torch.float32):
    """The adapter of `cfg.teacher.family`; `run_dir` holds caches (prompt embeddings); frozen networks are held
    in `dtype` (the toy teacher is exact maths in float64). Checks the config and inputs first."""
    check_inputs(cfg)
    cls = family_class(cfg.teacher.family)
    if cfg.teacher.family == "toy":
        return cls(cfg, device)
    if cfg.teacher.family == "digits":
        return cls(cfg, device, dtype)
    return cls(cfg, device, run_dir, dtype)
