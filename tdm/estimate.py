"""`tdm distill --dry-run`: what a run will cost, from configs only (no weights are loaded).

Memory, in the dtypes the trainer holds (README, "The dry-run memory model"): weights, AdamW state,
text encoders and the VAE are counted exactly from configs and safetensors headers; activations are
measured by running the real network at the real batch and resolution on the meta device
(tdm.meta_probe), pass by pass, and composed into the phases of one TDM iteration (§4).
"""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path

import torch
import yaml

from .config import Config, set_field
from .families import DTYPES
from .meta_probe import (
    bare_family,
    decode_pass,
    grad_pass,
    kept_in_fp32,
    meta_model,
    meta_net,
    no_grad_pass,
)

GiB = 1024**3
USABLE = 0.9  # of a GPU's memory: the CUDA context and allocator fragmentation take the rest


def parse_size(text: str) -> int:
    """'24GB', '24GiB', '80G', '512MB' -> bytes; GPU makers' GB are GiB, so both mean 2**30."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([MGT])(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"--gpu-memory {text!r}: give a size such as 24GB, 24GiB, 80G or 512MB")
    return int(float(m[1]) * 1024 ** (2 + "MGT".index(m[2].upper())))


def lora_parameters(net, targets: list[str], rank: int) -> int:
    """Exact LoRA size: `rank * (d_in + d_out)` for every Linear whose name ends with a target."""
    from torch import nn

    return sum(rank * (m.in_features + m.out_features) for name, m in net.named_modules()
               if isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets))


# -- exact sizes of what lies in the teacher folder --------------------------------------------
_ITEM = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # non-float bytes


def folder_bytes(folder: Path, dtype: torch.dtype) -> int:
    """Bytes of a model folder's tensors once loaded in `dtype` (integer tensors keep theirs), from the
    safetensors headers (a sharded model's index names its files; variants hold the same shapes), else
    from the config on the meta device."""
    from safetensors import safe_open

    index = sorted(folder.glob("*.safetensors.index.json"))
    files = sorted({folder / f for f in json.loads(index[0].read_text())["weight_map"].values()}) if index \
        else sorted(folder.glob("*.safetensors"))[:1]
    if not files:
        return module_bytes(meta_model(folder), dtype)
    size, total = torch.empty((), dtype=dtype).element_size(), 0
    for f in files:
        with safe_open(f, "pt") as st:
            for k in st.keys():  # noqa: SIM118  (safe_open has no __iter__)
                s = st.get_slice(k)
                n = torch.Size(s.get_shape()).numel()
                total += n * (size if s.get_dtype() in ("F64", "F32", "F16", "BF16") else _ITEM[s.get_dtype()])
    return total


def module_bytes(net, dtype: torch.dtype) -> int:
    """Bytes of a module loaded in `dtype` (`from_pretrained(dtype=...)`): parameters and saved buffers in it,
    buffers the module makes itself (not saved, e.g. PixArt's position table) as it makes them, integers as
    they are."""
    size = torch.empty((), dtype=dtype).element_size()
    made = {id(b) for m in net.modules() for k, b in m._buffers.items() if k in m._non_persistent_buffers_set}
    return sum(t.numel() * (t.element_size() if not t.is_floating_point() or id(t) in made else
                            max(size, 4) if kept_in_fp32(net, name, dtype) else size)
               for name, t in [*net.named_parameters(), *net.named_buffers()])


def text_encoder_folders(path: Path) -> list[Path]:
    """The pipeline's text encoders (model_index.json entries `text_encoder*` that are not None)."""
    index = json.loads((path / "model_index.json").read_text())
    return [path / k for k, v in sorted(index.items()) if k.startswith("text_encoder") and v and v[0]]


# -- the estimate ----------------------------------------------------------------------------------
@functools.cache
def _template(family_cls, path: str):
    """The teacher's network on the meta device, for counting and shapes only (never modified)."""
    return meta_net(family_cls, path)


@functools.cache
def _prompt_count(prompts: str, max_chars: int) -> int:
    from .families.diffusers.prompts import read_prompts

    return len(read_prompts(prompts, max_chars)) if prompts else 0


def _lora_spec(cfg: Config, family_cls) -> tuple | None:
    if not cfg.lora.enabled:
        return None
    return cfg.lora.rank, cfg.lora.alpha, tuple(cfg.lora.targets or family_cls.lora_targets)


def _name(precision: str) -> str:
    return "fp32" if precision == "no" else precision


def _latent_shape(cfg: Config, family_cls) -> tuple:
    fam = bare_family(family_cls, cfg.teacher.path, cfg.teacher.resolution, cfg.teacher.frames, cfg.teacher.width)
    fam.base = _template(family_cls, cfg.teacher.path)
    return tuple(fam.latent_shape())


def caching_bytes(cfg: Config) -> int:
    """Prompt caching: the text encoders in the mixed-precision dtype, alone on the device (before the network)."""
    return sum(folder_bytes(f, DTYPES[cfg.train.mixed_precision]) for f in text_encoder_folders(Path(cfg.teacher.path)))


def _trainable_per_role(cfg: Config, family_cls) -> int:
    """Parameters the student (or the fake) trains: its LoRA adapter, or the whole network."""
    net = _template(family_cls, cfg.teacher.path)
    if cfg.lora.enabled:
        return lora_parameters(net, list(_lora_spec(cfg, family_cls)[2]), cfg.lora.rank)
    return sum(p.numel() for p in net.parameters())


def static_bytes(cfg: Config, family_cls) -> dict[str, int]:
    """Bytes held on the device through training, by role and kind, in the dtypes the trainer holds them."""
    tr, precision = cfg.train, cfg.train.mixed_precision
    net, dtype = _template(family_cls, cfg.teacher.path), DTYPES[precision]
    n = _trainable_per_role(cfg, family_cls)
    moments = 2 if cfg.optim.adam_8bit else 8  # two AdamW moments per trainable parameter, 1 or 4 bytes each
    if cfg.lora.enabled:
        out = {f"base network ({_name(precision)})": module_bytes(net, dtype),
               "LoRA student + fake: fp32 weights, AdamW": 2 * n * (4 + moments)}
    else:
        out = {f"teacher ({_name(precision)}{', offloaded' if tr.teacher_offload else ''})":
               0 if tr.teacher_offload else module_bytes(net, dtype),
               "student + fake: fp32 weights, AdamW": 2 * (module_bytes(net, torch.float32) + n * moments)}
        if cfg.optim.ema > 0:
            out["student EMA (fp32)"] = module_bytes(net, torch.float32)
    row = family_cls.probe_cond(net.config, 1)
    rows = _prompt_count(cfg.data.prompts, cfg.data.max_prompt_chars) + 1 + len(tr.validation_prompts)  # "" too
    out["prompt embeddings (fp32)"] = rows * sum(
        v.numel() * (4 if v.is_floating_point() else v.element_size()) for v in row.values())
    if tr.preview_every > 0:
        out[f"VAE for previews ({_name(precision)})"] = folder_bytes(Path(cfg.teacher.path) / "vae", dtype)
    return out


def phase_bytes(cfg: Config, family_cls) -> dict[str, int]:
    """Bytes above the static ones at the peak of each phase of one iteration (§4), from the measured passes:
    rollout, a no-grad student forward at <= B rows; fake update, a forward with grad (+ a no-grad teacher
    forward with the §5 anchor) and its backward; generator update, a student forward with grad, the
    teacher with CFG at 2B and the fake at B rows without grad, the backward; the preview's VAE decode.
    With mixed precision, a forward with grad saves the low-precision casts of the trainable weights for its
    backward (the trainer turns autocast's cache off, so no cast outlives its pass)."""
    t, tr = cfg.teacher, cfg.train
    key = (family_cls, t.path, t.resolution, t.frames, _lora_spec(cfg, family_cls), tr.mixed_precision)
    B = tr.batch_size
    n_teacher = family_cls.guided_rows(t.path) * B if t.guidance != 1 else B
    w = t.width  # Wan's; a keyword, so that the other families' cached passes keep their keys
    forward, saved, backward = grad_pass(*key, tr.gradient_checkpointing, B, width=w)
    fake = no_grad_pass(*key, "fake", B, width=w)  # the student's rollout call is the same network at <= B rows
    anchor = no_grad_pass(*key, "teacher", B, width=w) if cfg.tdm.fake_anchor > 0 else 0
    cast = 0 if tr.mixed_precision == "no" else (DTYPES[tr.mixed_precision].itemsize
                                                 * _trainable_per_role(cfg, family_cls))
    out = {"rollout": fake,
           "fake update": cast + max(forward, saved + anchor, backward),
           "generator update": cast + max(forward, saved + max(no_grad_pass(*key, "teacher", n_teacher, width=w), fake),
                                          backward)}
    latent = _latent_shape(cfg, family_cls)
    if tr.preview_every > 0 and len(latent) == 3:  # image latents; video VAEs decode chunks of frames, not probed
        out["preview decode"] = decode_pass(t.path, tr.mixed_precision, latent)
    return out


def peak_bytes(cfg: Config, family_cls) -> int:
    """The configured peak: prompt caching, or the static bytes plus the largest phase."""
    training = sum(static_bytes(cfg, family_cls).values()) + max(phase_bytes(cfg, family_cls).values())
    return max(caching_bytes(cfg), training)


def memory_estimate(cfg: Config, family_cls) -> dict:
    """Bytes of each phase of a run, with and without gradient checkpointing (README, "The dry-run memory model").

    `prompt caching`: the text encoders, alone on the device before the network is loaded; `static`: what
    training holds throughout; `phases[gc]`: live activations (and the updated role's grads) at the peak of
    each phase of one iteration; `peak[gc]`: the largest total; `peak_GiB`: the configured one."""
    net = _template(family_cls, cfg.teacher.path)
    out = {"network": type(net).__name__, "base_params_M": round(sum(p.numel() for p in net.parameters()) / 1e6, 2)}
    if cfg.lora.enabled:
        out.update(copies_of_base=1, lora_params=_trainable_per_role(cfg, family_cls))
    else:
        out.update(copies_of_base=2 if cfg.train.teacher_offload else 3)
    phases, peak = {}, {}
    for gc in (False, True):
        c = copy.deepcopy(cfg)
        c.train.gradient_checkpointing = gc
        phases[gc], peak[gc] = phase_bytes(c, family_cls), peak_bytes(c, family_cls)
    return {**out, "precision": cfg.train.mixed_precision, "batch_size": cfg.train.batch_size,
            "gradient_checkpointing": cfg.train.gradient_checkpointing, "prompt caching": caching_bytes(cfg),
            "static": static_bytes(cfg, family_cls), "phases": phases, "peak": peak,
            "peak_GiB": round(peak[cfg.train.gradient_checkpointing] / GiB, 3)}


def advise(cfg: Config, family_cls, gpu: int) -> list[tuple[str, int]]:
    """Switches to turn on, cheapest first, each with the peak once it and those before it are on, until the
    peak fits `USABLE * gpu`: bf16, gradient checkpointing, 8-bit AdamW, teacher offload (full mode), a halved
    batch (down to 1); in full mode last LoRA, at the configured batch, halved again if need be."""
    budget, c, steps = USABLE * gpu, copy.deepcopy(cfg), []

    def turn_on(overrides: list[str]) -> bool:
        for o in overrides:
            key, value = o.split("=")
            set_field(c, key, yaml.safe_load(value))
        steps.append((" ".join(overrides), peak_bytes(c, family_cls)))
        return steps[-1][1] <= budget

    switches = [["train.mixed_precision=bf16"]] * (c.train.mixed_precision == "no")
    switches += [["train.gradient_checkpointing=true"]] * (not c.train.gradient_checkpointing)
    switches += [["optim.adam_8bit=true"]] * (not c.optim.adam_8bit)
    switches += [["train.teacher_offload=true"]] * (not (c.lora.enabled or c.train.teacher_offload))
    for switch in switches:
        if turn_on(switch):
            return steps
    for lora in [False] + [True] * (not cfg.lora.enabled):
        if lora and turn_on(["lora.enabled=true", "train.teacher_offload=false",
                             f"train.batch_size={cfg.train.batch_size}"]):
            return steps
        while c.train.batch_size > 1:
            if turn_on([f"train.batch_size={c.train.batch_size // 2}"]):
                return steps
    return steps
