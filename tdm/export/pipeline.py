"""Export a diffusers-teacher run for stock pipelines, and load it back (`tdm export`, `load_pipeline`).

`tdm_inference.json` records what inference needs: the scheduler class and config that reproduce
the student's own K-step sampler, its exact timesteps, guidance scale 1 (CFG is distilled in) and
the LoRA scale. The LoRA's `alpha / rank` is baked into its B matrices, so any loader, whatever
alpha it assumes, gets the trained update at scale 1.0: no scale to guess. The same settings go into the LoRA file's
safetensors header and into a model card (README.md) with the stock-pipeline code (`card.py`). Which file each
stock loader reads is the family's `diffusers_reads` / `comfyui_reads`; a kohya file is the family's
`kohya_state_dict` (SD3: sd-scripts' MMDiT layout).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import RunError
from ..families import DIFFUSERS, family_class
from ..families.diffusers.base import scheduler_config
from ..families.diffusers.quiet import quiet_loading
from ..files import read_json, save_tensors, write_json, write_text
from ..run import load_run, run_config
from .card import FILES, lora_metadata, model_card
from .scheduler import build_inference_scheduler, inference_scheduler

FORMATS = ("diffusers", "kohya", "full")


def student_lora_state_dict(base: torch.nn.Module, alpha: float, rank: int) -> dict[str, torch.Tensor]:
    """peft-format weights of the 'student' adapter with `alpha / rank` folded into `lora_B`."""
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(base, adapter_name="student")
    return {k: (v * (alpha / rank) if "lora_B" in k else v).detach().float().cpu().contiguous() for k, v in sd.items()}


def inference_spec(run) -> dict:
    fam, K = run.family, run.cfg.student.steps
    grid = run.grid(K).tolist()
    train_config = scheduler_config(fam.path)
    kind = "flow" if not fam.schedule.discrete else "vp"
    return {
        "family": run.cfg.teacher.family,
        "pipeline_class": fam.pipeline_class,
        "steps": K,
        "timesteps": grid[:-1],
        "guidance_scale": fam.inference_guidance,
        "lora_scale": 1.0,
        # a pipeline that passes no timesteps nor sigmas (Wan) has its family's own
        "scheduler": fam.inference_scheduler(train_config, grid) if hasattr(fam, "inference_scheduler") else
        inference_scheduler(train_config, grid, kind, vp_scheduler=fam.vp_scheduler),
    }


def export_run(run_dir: str | Path, fmt: str = "diffusers", output: str | Path | None = None) -> Path:
    import diffusers

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose from {FORMATS}")
    family = run_config(run_dir).teacher.family
    if family not in DIFFUSERS:
        raise RunError(f"`tdm export` writes diffusers pipelines and LoRAs; a {family} run has no pipeline: sample "
                       f"it with `tdm sample {run_dir}`")
    fam_cls = family_class(family)
    if fmt == "kohya" and "kohya" not in fam_cls.diffusers_reads + fam_cls.comfyui_reads:
        raise ValueError(f"--format kohya: no stock loader reads a kohya LoRA of a {fam_cls.pipeline_class} "
                         f"(diffusers reads {fam_cls.diffusers_reads[0]!r}, ComfyUI "
                         f"{', '.join(map(repr, fam_cls.comfyui_reads)) or 'has no such model'}); export --format "
                         f"{fam_cls.diffusers_reads[0]} or full")
    out = Path(output or Path(run_dir) / f"export_{fmt}")
    if out.exists() and not out.is_dir():
        raise RunError(f"--output {out} is a file; give a folder")
    run = load_run(run_dir)
    fam, cfg = run.family, run.cfg
    spec = inference_spec(run)
    net = run.student.net
    lora_file = None
    if fmt == "full" or not cfg.lora.enabled:
        fmt = "full"
        if cfg.lora.enabled:
            net.base.set_adapter("student")
            net.base.fuse_lora(adapter_names=["student"])
            net.base.unload_lora()
        pipe = diffusers.DiffusionPipeline.from_pretrained(fam.path, local_files_only=True,
                                                          **{fam.network_folder: net.base})
        setattr(pipe, fam.network_folder, net.base)  # WanPipeline's loader ignores a passed optional transformer
        pipe.scheduler = build_inference_scheduler(spec["scheduler"])
        out.mkdir(parents=True, exist_ok=True)
        pipe.save_pretrained(out)
        spec["lora_scale"] = None
    else:
        sd = student_lora_state_dict(net.base, cfg.lora.alpha, cfg.lora.rank)
        pipeline_cls = getattr(diffusers, fam.pipeline_class)
        if fmt == "kohya":
            kohya = type(fam).kohya_state_dict(sd)  # may refuse (lora.targets) before anything is written
        out.mkdir(parents=True, exist_ok=True)
        if fmt == "diffusers" and not hasattr(pipeline_cls, "save_lora_weights"):
            # PixArt-alpha (diffusers 0.42): no LoRA loader on the pipeline nor PEFT mixin on the transformer.
            # peft's own adapter folder instead, loaded by `PeftModel.from_pretrained(pipe.transformer, out)`
            # (the PixArt-LCM-LoRA model card's route); alpha/rank is baked into lora_B, so lora_alpha = r.
            from peft import LoraConfig

            targets = net.base.peft_config["student"].target_modules
            targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
            LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.rank, target_modules=targets).save_pretrained(str(out))
            lora_file = FILES["peft"]
            save_tensors({f"base_model.model.{k}": v for k, v in sd.items()}, out / lora_file,
                         lora_metadata(cfg, spec, "peft"))
        elif fmt == "diffusers":
            lora_file = FILES["diffusers"]
            meta = lora_metadata(cfg, spec, fmt)
            pipeline_cls.save_lora_weights(out, **{f"{fam.network_folder}_lora_layers": sd}, weight_name=lora_file,
                                           save_function=lambda tensors, path: save_tensors(tensors, path, meta))
        else:
            lora_file = FILES["kohya"]
            save_tensors(kohya, out / lora_file, lora_metadata(cfg, spec, fmt))
    write_json(out / "tdm_inference.json", spec)
    write_text(out / "README.md", model_card(type(fam), cfg, spec, fmt, out, lora_file))
    return out


def _lora_file(lora: Path) -> Path:
    """The LoRA file of an export folder (its one .safetensors), or `lora` itself."""
    if lora.is_file():
        return lora
    files = sorted(lora.glob("*.safetensors"))
    if len(files) != 1:
        raise FileNotFoundError(f"--lora {lora} holds {len(files)} .safetensors files; give the folder `tdm export` "
                                "wrote or the LoRA file itself")
    return files[0]


def _check_attached(lora_file: Path, attached: int, loader: str) -> None:
    """Every LoRA module of the file must have found its layer: loaders skip keys they cannot place, silently or
    with a log line, and a partly loaded LoRA is another model."""
    from safetensors import safe_open

    with safe_open(str(lora_file), "pt") as f:
        total = sum(k.endswith(("lora_A.weight", "lora_down.weight")) for k in f.keys())
    if attached != total:
        raise ValueError(f"{lora_file}: {loader} attached {attached} of its {total} LoRA modules (a layout this loader "
                         "does not read?); load the folder `tdm export --format diffusers` writes")


def _lora_layers(modules, adapter: str | None = None) -> int:
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(m, LoraLayer) and (adapter is None or adapter in m.lora_A)
               for module in modules for m in module.modules())


def load_pipeline(teacher: str | Path, lora: str | Path | None = None, inference: str | Path | None = None,
                  device: str | torch.device = "cpu", dtype: torch.dtype | None = None, fuse: bool = False):
    """A stock diffusers pipeline set up from `tdm_inference.json`; returns `(pipe, call_kwargs)`.

    `lora` is an exported folder or its LoRA file; `inference` defaults to the `tdm_inference.json` beside it.
    Every LoRA module of the file must attach. `fuse`: the LoRA folded into the weights at its scale (no adapter
    arithmetic per call). Call `pipe(prompt, **call_kwargs)`.
    """
    import diffusers

    lora = Path(lora) if lora else None
    if not (Path(teacher) / "model_index.json").is_file():
        raise FileNotFoundError(f"--teacher {teacher} is not a diffusers pipeline folder (no model_index.json)")
    if lora is not None and not lora.exists():
        raise FileNotFoundError(f"--lora {lora} does not exist; give the folder `tdm export` wrote")
    inference = Path(inference) if inference else (lora if lora and lora.is_dir() else
                                                   (lora.parent if lora else Path(teacher))) / "tdm_inference.json"
    if not inference.is_file():
        raise FileNotFoundError(f"{inference} does not exist: `tdm export` writes it beside the LoRA (or pass "
                                "--inference FILE)")
    spec = read_json(inference)
    lora_file = _lora_file(lora) if lora is not None else None
    with quiet_loading():  # the loading bars; the caller prints what it wrote
        pipe = diffusers.DiffusionPipeline.from_pretrained(teacher, local_files_only=True, dtype=dtype)
    pipe.scheduler = build_inference_scheduler(spec["scheduler"])
    if lora_file is not None and hasattr(pipe, "load_lora_weights"):
        pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name, adapter_name="tdm")
        modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
        _check_attached(lora_file, _lora_layers(modules, "tdm"), f"{type(pipe).__name__}.load_lora_weights")
        if fuse:
            pipe.fuse_lora(lora_scale=spec["lora_scale"], adapter_names=["tdm"])
            pipe.unload_lora_weights()  # the fused weights stay; the adapter layers go
        else:
            pipe.set_adapters(["tdm"], adapter_weights=[spec["lora_scale"]])
    elif lora_file is not None:  # PixArt-alpha: peft's adapter folder (see export_run), merged into a stock network
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer

        folder = family_class(spec["family"]).network_folder
        peft_net = PeftModel.from_pretrained(getattr(pipe, folder), str(lora_file.parent))
        _check_attached(lora_file, _lora_layers([peft_net]), "PeftModel.from_pretrained")
        for m in peft_net.modules():
            if isinstance(m, LoraLayer):
                m.set_scale("default", spec["lora_scale"])
        setattr(pipe, folder, peft_net.merge_and_unload())
    pipe.to(device)
    kwargs = {"guidance_scale": spec["guidance_scale"], **spec["scheduler"]["set_timesteps_kwargs"]}
    return pipe, kwargs
