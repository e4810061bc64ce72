"""`tdm distill --dry-run`: what a run will cost, from configs only (no weights are loaded)."""

from __future__ import annotations

import json
from pathlib import Path

from .config import Config

BYTES = {"no": 4, "fp16": 2, "bf16": 2}
GiB = 1024**3


def forwards_per_iteration(K: int, guidance: float, anchor: bool = False) -> dict[str, float]:
    """Upper bounds of one TDM iteration (§4): rollout K, fake update 1 (+1 teacher with the §5 anchor),
    student 1, teacher 1, fake 1."""
    calls = K + 4 + int(anchor)
    return {"network_calls": calls, "batch_equivalents": calls + (1 if guidance != 1 else 0), "demo": 11}


def _meta_network(path: Path, folder: str):
    """The teacher's network built on the meta device from its config: shapes without weights."""
    import diffusers
    from accelerate import init_empty_weights

    config = json.loads((path / folder / "config.json").read_text())
    with init_empty_weights():
        return getattr(diffusers, config["_class_name"]).from_config(config)


def lora_parameters(net, targets: list[str], rank: int) -> int:
    """Exact LoRA size: `rank * (d_in + d_out)` for every Linear whose name ends with a target."""
    from torch import nn

    return sum(rank * (m.in_features + m.out_features) for name, m in net.named_modules()
               if isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets))


def memory_estimate(cfg: Config, family_cls) -> dict:
    """Weights, gradients and AdamW states in GiB; activations excluded (they scale with batch and resolution)."""
    net = _meta_network(Path(cfg.teacher.path), family_cls.network_folder)
    n = sum(p.numel() for p in net.parameters())
    w = BYTES[cfg.train.mixed_precision]
    out = {"network": type(net).__name__, "base_params_M": round(n / 1e6, 2), "base_GiB": round(n * w / GiB, 3)}
    if cfg.lora.enabled:
        n_lora = lora_parameters(net, cfg.lora.targets or list(family_cls.lora_targets), cfg.lora.rank)
        train = 2 * n_lora * (4 + 4 + 8)  # 'student' and 'fake' adapters: fp32 weight, grad, two Adam moments
        out.update(copies_of_base=1, lora_params=n_lora)
    else:
        train = 2 * n * (4 + 4 + 8)       # student and fake: full fp32 copies with grads and Adam moments
        out.update(copies_of_base=3)
    out.update(trainable_GiB=round(train / GiB, 3), total_GiB_excl_activations=round((n * w + train) / GiB, 3))
    return out
