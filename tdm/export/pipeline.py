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


def inference_spec(run, K: int | None = None) -> dict:
    fam, K = run.family, K or run.cfg.student.steps
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


def k_lora_state_dict(sd: dict[str, torch.Tensor], k_add: torch.Tensor, rank: int,
                      time_embedding: str = "time_embedding") -> dict[str, torch.Tensor]:
    """A unify student's LoRA for one K (§6): its K embedding `k_add` folded into a LoRA bias (peft's
    `lora_bias=True`, which diffusers' loader reads from `lora_B.bias` keys) of the last linear of the time
    embedding at `time_embedding` (the family's `time_embedding_path`), a rank-`rank` module with zero matrices;
    every other module gets a zero bias (the option is per file)."""
    prefix = f"{time_embedding}.linear_2"
    if f"{prefix}.lora_A.weight" in sd:
        raise ValueError(f"lora.targets puts a LoRA on {prefix}, which an any-step export needs for K's embedding; "
                         "leave it out of lora.targets")
    out = dict(sd)
    for k, v in sd.items():
        if k.endswith("lora_B.weight"):
            out[k.replace(".weight", ".bias")] = torch.zeros(v.shape[0])
    k_add = k_add.detach().float().cpu().contiguous()
    out[f"{prefix}.lora_A.weight"] = torch.zeros(rank, k_add.shape[0])  # linear_2 is square (dim -> dim)
    out[f"{prefix}.lora_B.weight"] = torch.zeros(k_add.shape[0], rank)
    out[f"{prefix}.lora_B.bias"] = k_add
    return out


def export_unify(run_dir: str | Path, fmt: str, out: Path) -> Path:
    """A unify student (§6): a stock pipeline cannot pass K, so one export per K, with that K's embedding folded in,
    in `out/K{K}` (each a whole export with its own scheduler); `out/tdm_inference.json` says which serves which K."""
    import diffusers

    if fmt not in ("diffusers", "full"):
        raise ValueError(f"--format {fmt} cannot carry a unify student's step-count embedding (a LoRA bias per K); "
                         "export --format diffusers or full")
    run = load_run(run_dir)
    fam, cfg, net = run.family, run.cfg, run.student.net
    if fmt == "diffusers" and not cfg.lora.enabled:
        fmt = "full"
    out.mkdir(parents=True, exist_ok=True)
    index = {"family": cfg.teacher.family, "pipeline_class": fam.pipeline_class, "format": fmt, "unify": {}}
    lines = [f"# {Path(cfg.teacher.path).resolve().name}: an any-step TDM student (K = {run.Ks})", "",
             "A stock pipeline cannot be told the step count K, so each K has its own export, with K's embedding "
             "folded into the network's time embedding: use the folder of the K you sample with (its README and "
             "`tdm_inference.json` hold its scheduler), or `tdm.load_pipeline(teacher, lora=<this folder>, steps=K)`.",
             "", "| K | folder |", "|---|---|"]
    if fmt == "full" and cfg.lora.enabled:
        net.base.set_adapter("student")
        net.base.fuse_lora(adapter_names=["student"])
        net.base.unload_lora()
    te = net.base.get_submodule(fam.time_embedding_path)
    sd = student_lora_state_dict(net.base, cfg.lora.alpha, cfg.lora.rank) if fmt == "diffusers" else None
    for K in run.Ks:
        spec, folder = inference_spec(run, K), out / f"K{K}"
        folder.mkdir(exist_ok=True)
        k_add = net.k_embed.weight[K].detach()
        if fmt == "full":
            bias = te.linear_2.bias.detach().clone()
            with torch.no_grad():
                te.linear_2.bias.add_(k_add.to(bias))
            pipe = diffusers.DiffusionPipeline.from_pretrained(fam.path, local_files_only=True,
                                                              **{fam.network_folder: net.base})
            setattr(pipe, fam.network_folder, net.base)  # WanPipeline's loader ignores a passed optional transformer
            pipe.scheduler = build_inference_scheduler(spec["scheduler"])
            pipe.save_pretrained(folder)
            with torch.no_grad():
                te.linear_2.bias.copy_(bias)
            spec["lora_scale"], lora_file = None, None
        elif not hasattr(getattr(diffusers, fam.pipeline_class), "save_lora_weights"):
            # PixArt-alpha: peft's adapter folder (as export_run), with lora_bias=True and the time embedding's last
            # linear among its targets; merged into the stock network, K's bias lands in that linear's bias
            from peft import LoraConfig

            k_sd = k_lora_state_dict(sd, k_add, cfg.lora.rank, fam.time_embedding_path)
            targets = sorted({k.rsplit(".lora_", 1)[0] for k in k_sd if k.endswith("lora_A.weight")})
            LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.rank, target_modules=targets,
                       lora_bias=True).save_pretrained(str(folder))
            lora_file = FILES["peft"]
            save_tensors({f"base_model.model.{k}": v for k, v in k_sd.items()}, folder / lora_file,
                         lora_metadata(cfg, spec, "peft"))
        else:
            lora_file, meta = FILES["diffusers"], lora_metadata(cfg, spec, fmt)
            k_sd = k_lora_state_dict(sd, k_add, cfg.lora.rank, fam.time_embedding_path)
            getattr(diffusers, fam.pipeline_class).save_lora_weights(
                folder, **{f"{fam.network_folder}_lora_layers": k_sd},
                weight_name=lora_file, save_function=lambda tensors, path: save_tensors(tensors, path, meta))
        write_json(folder / "tdm_inference.json", spec)
        write_text(folder / "README.md", model_card(type(fam), cfg, spec, fmt, folder, lora_file))
        index["unify"][str(K)] = {"folder": folder.name, "file": f"{folder.name}/{lora_file}" if lora_file else
                                  folder.name, "scheduler": spec["scheduler"], "timesteps": spec["timesteps"],
                                  "guidance_scale": spec["guidance_scale"]}
        lines.append(f"| {K} | `{folder.name}/` |")
    write_json(out / "tdm_inference.json", index)
    write_text(out / "README.md", "\n".join(lines) + "\n")
    return out


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
    if run_config(run_dir).student.unify:
        return export_unify(run_dir, fmt, out)
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


def _has_lora_bias(lora_file: Path) -> bool:
    """An any-step (unify) export: its K embedding rides on `lora_B.bias` keys."""
    from safetensors import safe_open

    with safe_open(str(lora_file), "pt") as f:
        return any(k.endswith("lora_B.bias") for k in f.keys())


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
                  device: str | torch.device = "cpu", dtype: torch.dtype | None = None, fuse: bool = False,
                  steps: int | None = None):
    """A stock diffusers pipeline set up from `tdm_inference.json`; returns `(pipe, call_kwargs)`.

    `lora` is an exported folder or its LoRA file; `inference` defaults to the `tdm_inference.json` beside it.
    Every LoRA module of the file must attach. `fuse`: the LoRA folded into the weights at its scale (no adapter
    arithmetic per call). `steps`: the K of an any-step (unify) export, whose folder holds one export per K.
    Call `pipe(prompt, **call_kwargs)`.
    """
    import diffusers

    index = Path(lora or teacher) / "tdm_inference.json"
    if index.is_file() and "unify" in read_json(index):
        served = read_json(index)["unify"]
        if str(steps) not in served:
            raise ValueError(f"--steps {steps}: this any-step export serves K in {sorted(map(int, served))}; pass one "
                             "(load_pipeline(steps=K))")
        folder = index.parent / served[str(steps)]["folder"]
        return load_pipeline(folder if lora is None else teacher, folder if lora is not None else None, inference,
                             device, dtype, fuse)

    if steps is not None:
        raise ValueError(f"--steps {steps}: this export serves only the K it was trained for (its scheduler in "
                         "tdm_inference.json); leave --steps out")
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
        if fuse and not _has_lora_bias(lora_file):  # peft cannot merge a LoRA bias into bias-free layers
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
