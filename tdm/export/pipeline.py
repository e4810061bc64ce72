"""Export a diffusers-teacher run for stock pipelines, and load it back (`tdm export`, `load_pipeline`).

`tdm_inference.json` records what inference needs: the scheduler class and config that reproduce
the student's own K-step sampler, its exact timesteps, guidance scale 1 (CFG is distilled in) and
the LoRA scale. The LoRA's `alpha / rank` is baked into its B matrices, so any loader, whatever
alpha it assumes, gets the trained update at scale 1.0: no scale to guess.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import RunError
from ..families import DIFFUSERS
from ..families.diffusers.base import scheduler_config
from ..files import read_json, write_json
from ..run import load_run, run_config
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
        "guidance_scale": 1.0,
        "lora_scale": 1.0,
        "scheduler": inference_scheduler(train_config, grid, kind, vp_scheduler=fam.vp_scheduler),
    }


def export_run(run_dir: str | Path, fmt: str = "diffusers", output: str | Path | None = None) -> Path:
    import diffusers

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose from {FORMATS}")
    family = run_config(run_dir).teacher.family
    if family not in DIFFUSERS:
        raise RunError(f"`tdm export` writes diffusers pipelines and LoRAs; a {family} run has no pipeline: sample "
                       f"it with `tdm sample {run_dir}`")
    out = Path(output or Path(run_dir) / f"export_{fmt}")
    if out.exists() and not out.is_dir():
        raise RunError(f"--output {out} is a file; give a folder")
    run = load_run(run_dir)
    fam, cfg = run.family, run.cfg
    out.mkdir(parents=True, exist_ok=True)
    spec = inference_spec(run)
    net = run.student.net
    if fmt == "full" or not cfg.lora.enabled:
        if cfg.lora.enabled:
            net.base.set_adapter("student")
            net.base.fuse_lora(adapter_names=["student"])
            net.base.unload_lora()
        pipe = diffusers.DiffusionPipeline.from_pretrained(fam.path, local_files_only=True,
                                                          **{fam.network_folder: net.base})
        pipe.scheduler = build_inference_scheduler(spec["scheduler"])
        pipe.save_pretrained(out)
        spec["lora_scale"] = None
    else:
        sd = student_lora_state_dict(net.base, cfg.lora.alpha, cfg.lora.rank)
        pipeline_cls = getattr(diffusers, fam.pipeline_class)
        if fmt == "diffusers" and not hasattr(pipeline_cls, "save_lora_weights"):
            # PixArt-alpha (diffusers 0.42): no LoRA loader on the pipeline nor PEFT mixin on the transformer.
            # peft's own adapter folder instead, loaded by `PeftModel.from_pretrained(pipe.transformer, out)`
            # (the PixArt-LCM-LoRA model card's route); alpha/rank is baked into lora_B, so lora_alpha = r.
            from peft import LoraConfig

            targets = net.base.peft_config["student"].target_modules
            targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
            LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.rank, target_modules=targets).save_pretrained(str(out))
            save_file({f"base_model.model.{k}": v for k, v in sd.items()}, str(out / "adapter_model.safetensors"))
        elif fmt == "diffusers":
            pipeline_cls.save_lora_weights(out, **{f"{fam.network_folder}_lora_layers": sd})
        elif not hasattr(pipeline_cls, "save_lora_weights"):
            raise ValueError(f"{fam.pipeline_class} has no kohya LoRA loader; "
                             "export 'diffusers' (peft folder) or 'full'")
        else:
            from diffusers.utils import convert_state_dict_to_kohya

            prefixed = {f"{fam.network_folder}.{k}": v for k, v in sd.items()}
            kohya = {k: v.contiguous() for k, v in convert_state_dict_to_kohya(prefixed).items()}
            save_file(kohya, str(out / "pytorch_lora_weights_kohya.safetensors"))
    write_json(out / "tdm_inference.json", spec)
    return out


def load_pipeline(teacher: str | Path, lora: str | Path | None = None, inference: str | Path | None = None,
                  device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """A stock diffusers pipeline set up from `tdm_inference.json`; returns `(pipe, call_kwargs)`.

    `lora` is an exported folder or its `pytorch_lora_weights.safetensors`; `inference` defaults to
    the `tdm_inference.json` beside it. Call `pipe(prompt, **call_kwargs)`.
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
    pipe = diffusers.DiffusionPipeline.from_pretrained(teacher, local_files_only=True, dtype=dtype)
    pipe.scheduler = build_inference_scheduler(spec["scheduler"])
    if lora is not None and hasattr(pipe, "load_lora_weights"):
        pipe.load_lora_weights(str(lora), adapter_name="tdm")
        pipe.set_adapters(["tdm"], adapter_weights=[spec["lora_scale"]])
    elif lora is not None:  # PixArt-alpha: peft's adapter folder (see export_run), merged into a stock network
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer

        from ..families import family_class

        folder = family_class(spec["family"]).network_folder
        peft_net = PeftModel.from_pretrained(getattr(pipe, folder), str(lora if lora.is_dir() else lora.parent))
        for m in peft_net.modules():
            if isinstance(m, LoraLayer):
                m.set_scale("default", spec["lora_scale"])
        setattr(pipe, folder, peft_net.merge_and_unload())
    pipe.to(device)
    kwargs = {"guidance_scale": spec["guidance_scale"], **spec["scheduler"]["set_timesteps_kwargs"]}
    return pipe, kwargs
