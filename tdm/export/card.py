"""What travels with an export: safetensors metadata in every LoRA file, and a model card (README.md) in every export
folder with the stock-pipeline code that runs the student and, for ComfyUI, the student's sigmas."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .scheduler import build_inference_scheduler

FILES = {"diffusers": "pytorch_lora_weights.safetensors", "kohya": "pytorch_lora_weights_kohya.safetensors",
         "peft": "adapter_model.safetensors"}


def comfyui_sigmas(spec: dict) -> list[float]:
    """The student's noise levels in ComfyUI's units, then 0: `t / T` for flow teachers, k-diffusion's
    `sqrt((1 - abar_t) / abar_t)` for VP ones (`abar` of the exported scheduler)."""
    kwargs = spec["scheduler"]["set_timesteps_kwargs"]
    if "sigmas" in kwargs:
        return [*kwargs["sigmas"], 0.0]
    if "timesteps" not in kwargs:  # a flow grid made from K (Wan)
        return [t / spec["scheduler"]["config"]["num_train_timesteps"] for t in spec["timesteps"]] + [0.0]
    abar = build_inference_scheduler(spec["scheduler"]).alphas_cumprod.double()
    return [math.sqrt((1 - abar[t]) / abar[t]) for t in kwargs["timesteps"]] + [0.0]


def lora_metadata(cfg, spec: dict, fmt: str) -> dict[str, str]:
    """The safetensors header of an exported LoRA: what it was distilled from and how to sample it."""
    return {"format": "pt",  # safetensors' own key, which diffusers writes too
            "tdm.format": fmt, "tdm.base_model": Path(cfg.teacher.path).resolve().name,
            "tdm.base_model_path": str(Path(cfg.teacher.path).resolve()), "tdm.family": cfg.teacher.family,
            "tdm.pipeline_class": spec["pipeline_class"], "tdm.rank": str(cfg.lora.rank),
            "tdm.alpha": str(cfg.lora.alpha), "tdm.alpha_folded": "true", "tdm.lora_scale": str(spec["lora_scale"]),
            "tdm.student_steps": str(spec["steps"]), "tdm.timesteps": json.dumps(spec["timesteps"]),
            "tdm.comfyui_sigmas": json.dumps(comfyui_sigmas(spec)),
            "tdm.guidance_scale": str(spec["guidance_scale"]),
            "tdm.scheduler_class": spec["scheduler"]["class_name"],
            "tdm.scheduler_config": json.dumps(spec["scheduler"]["config"]),
            "tdm.set_timesteps_kwargs": json.dumps(spec["scheduler"]["set_timesteps_kwargs"])}


def _snippet(family, cfg, spec: dict, fmt: str, out: Path, lora_file: str | None) -> str:
    """Python that runs the student from a stock pipeline: the teacher, the LoRA, the scheduler, its timesteps."""
    sched = spec["scheduler"]
    name, config = sched["class_name"], sched["config"]
    video = spec["pipeline_class"] in ("CogVideoXPipeline", "WanPipeline")
    head = ["import torch", f"from diffusers import DiffusionPipeline, {name}"]
    body = ['device, dtype = ("cuda", torch.float16) if torch.cuda.is_available() else ("cpu", torch.float32)']
    if fmt == "full":
        body.append(f'pipe = DiffusionPipeline.from_pretrained("{out}", dtype=dtype)  # the scheduler in it is the '
                    "student's")
    else:
        body.append(f'pipe = DiffusionPipeline.from_pretrained("{Path(cfg.teacher.path).resolve()}", dtype=dtype)')
        if lora_file == FILES["peft"]:  # no LoRA loader on the pipeline: peft's own (PixArt-LCM-LoRA's route)
            head.append("from peft import PeftModel")
            body.append(f'pipe.{family.network_folder} = PeftModel.from_pretrained(pipe.{family.network_folder}, '
                        f'"{out}").merge_and_unload()')
        else:
            body.append(f'pipe.load_lora_weights("{out}", weight_name="{lora_file}")')
        if config.get("trained_betas") is None:
            body += [f"pipe.scheduler = {name}.from_config({{", *(f"    {k!r}: {v!r}," for k, v in config.items()),
                     "})"]
        else:  # a thousand betas (CogVideoX's SNR-shifted schedule): read them from the file beside the LoRA
            head.insert(0, "import json")
            body.append(f'config = json.load(open("{out / "tdm_inference.json"}"))["scheduler"]["config"]')
            body.append(f"pipe.scheduler = {name}.from_config(config)")
    kwargs = {"guidance_scale": spec["guidance_scale"], **sched["set_timesteps_kwargs"]}
    body += ["pipe.to(device)", f"kwargs = {kwargs!r}",
             f'{"video" if video else "image"} = pipe("a photo of a cat", **kwargs).'
             f'{"frames" if video else "images"}[0]']
    return "\n".join(head + [""] + body)


def model_card(family, cfg, spec: dict, fmt: str, out: Path, lora_file: str | None) -> str:
    """README.md of an export folder. `family`: the family class; `fmt`: 'diffusers', 'kohya' or 'full' (then
    `lora_file` is None); `lora_file`: the LoRA's file name in `out`."""
    out, base = Path(out).resolve(), Path(cfg.teacher.path).resolve()
    K, kind, pipeline = spec["steps"], spec["scheduler"]["class_name"], spec["pipeline_class"]
    sigmas = comfyui_sigmas(spec)
    flow = "timesteps" not in spec["scheduler"]["set_timesteps_kwargs"]
    timesteps = spec["timesteps"] if flow else spec["scheduler"]["set_timesteps_kwargs"]["timesteps"]  # VP: integers
    lines = [f"# {base.name}: a {K}-step TDM student", "",
             f"Distilled from `{base}` ({pipeline}) by Trajectory Distribution Matching with tdm. Classifier-free "
             f"guidance is distilled in: sample with guidance {spec['guidance_scale']:g}"
             f"{' (the guidance embedding the student was trained at)' if spec['guidance_scale'] != 1 else ''} and "
             f"the scheduler below ({kind} on the student's exact timesteps), which reproduces the library's own "
             f"{K}-step sampler.", "",
             "| | |", "|---|---|", f"| student steps | {K} |", f"| timesteps | {timesteps} |",
             f"| guidance scale | {spec['guidance_scale']} |",
             f"| scheduler | `{kind}`, config below and in `tdm_inference.json` |"]
    if lora_file is None:
        what = "the student's LoRA fused into the teacher" if cfg.lora.enabled else "the fully trained student"
        lines.append(f"| weights | {what}: a whole diffusers pipeline folder |")
    else:
        readers = [who for who, reads in (("diffusers", family.diffusers_reads), ("ComfyUI", family.comfyui_reads))
                   if fmt in reads]
        lines += [f"| LoRA | `{lora_file}`, rank {cfg.lora.rank}, alpha / rank folded into its up weights: apply at "
                  "scale 1.0; its safetensors header holds these settings (`tdm.*` keys) |",
                  f"| read by | {', '.join(readers)} |"]

    lines += ["", "## diffusers", ""]
    if lora_file is None or fmt in family.diffusers_reads:
        load = f'tdm.load_pipeline("{base}", lora="{out}")' if lora_file else f'tdm.load_pipeline("{out}")'
        lines += ["```python", _snippet(family, cfg, spec, fmt, out, lora_file), "```", "",
                  f"`{load}` does the same from `tdm_inference.json`."]
    else:
        lines.append(f"diffusers has no loader for this file's layout ({pipeline}): `tdm export --format "
                     f"{family.diffusers_reads[0]}` writes the file it reads.")

    lines += ["", "## ComfyUI", ""]
    if not family.comfyui_reads:
        lines.append(getattr(family, "comfyui_note", f"ComfyUI core has no {pipeline.removesuffix('Pipeline')} model."))
    elif lora_file is None or fmt not in family.comfyui_reads:
        lines.append(f"ComfyUI's LoRA key map does not read this export: `tdm export --format "
                     f"{family.comfyui_reads[0]}` writes the file it reads.")
    else:
        # ComfyUI starts from sigma * noise (VP: sqrt(1 + sigma^2) * noise when sigma is the model's largest), the
        # library from noise; the model sees the ratio of the two.
        top = timesteps[0] == spec["scheduler"]["config"]["num_train_timesteps"] - 1
        start = sigmas[0] if flow else 1.0 if top else sigmas[0] / math.sqrt(1 + sigmas[0] ** 2)
        g = spec["guidance_scale"]
        embedded = f" (guidance embedding: FluxGuidance {g:g} on the conditioning)" if g != 1 else ""
        units = f"t / {spec['scheduler']['config']['num_train_timesteps']}" if flow else "sqrt((1 - abar_t) / abar_t)"
        lines += [f"Load `{lora_file}` with LoraLoaderModelOnly (strength 1.0) on the teacher's checkpoint, and "
                  f"sample with SamplerCustom: cfg 1.0{embedded}, sampler `euler` (on these sigmas its step is the "
                  "student's) "
                  f"and the student's sigmas in ComfyUI's units ({units} at the timesteps above, then 0; core "
                  "ComfyUI has no node that types sigmas in, a custom node that does feeds the `sigmas` input):", "",
                  "    " + ", ".join(f"{s:.8g}" for s in sigmas), "",
                  f"ComfyUI's starting noise is the library's times {start:.4f} (it scales noise to the first "
                  "sigma). Checked: the file's keys against ComfyUI's LoRA key map, rebuilt from its source "
                  "(tests/test_export_formats.py); ComfyUI itself has not been run."]
    return "\n".join(lines) + "\n"
