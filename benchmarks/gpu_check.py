"""The prepared GPU check: what CPU tests cannot show, in one run of under 8 minutes on one H100/H200.

    bash benchmarks/gpu_check.sh          # on a GPU machine; writes docs/gpu.md and benchmarks/results/gpu_check.json
    bash benchmarks/gpu_check.sh --dry    # anywhere: the parts that need no GPU, report to a temporary folder (CI)

1. Every family at tiny size (tests/tiny_pipelines.py) in bf16: 2 LoRA iterations with a preview, export, a
   stock pipeline in bf16 with the exported LoRA against the library's own sampler on the same noise.
2. Real-size networks with random weights (benchmarks/networks.py): PixArt-XL-2 at 512 px, batch 8, with and
   without gradient checkpointing; the SDXL UNet at 1024 px, batch 2. Each: s/iteration against the
   demo-order iteration and the floor (benchmarks/iteration.py), host-device syncs per iteration, and the
   measured peak memory against `tdm distill --dry-run`'s estimate.
3. Full fine-tuning under FSDP (accelerate, one process) against the same run without it, and
   `train.compile=true` against eager: equal losses.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]

from iteration import estimate_GiB, measure, table  # noqa: E402
from networks import NETWORKS, write_pipeline  # noqa: E402

from tdm.config import PRESETS, resolve  # noqa: E402
from tdm.core.samplers import sample_student  # noqa: E402
from tdm.export.pipeline import export_run, load_pipeline  # noqa: E402
from tdm.run import load_run  # noqa: E402
from tdm.trainer import Trainer  # noqa: E402

PROMPTS = ["a photo of a cat sitting on a red chair", "An astronaut riding a horse on the moon, 4k",
           "a red cube on a table"]
TINY = {  # family: (preset, extra overrides, stock pipeline call arguments beyond prompt embeddings)
    "sd15": ("sd15", [], {}),
    "sdxl": ("sdxl", [], {}),
    "pixart": ("pixart-512", [], {"use_resolution_binning": False, "height": 64, "width": 64}),
    "sd3": ("sd3", [], {}),
    "cogvideox": ("cogvideox-2b", ["teacher.frames=9"], {"num_frames": 9, "height": 64, "width": 64}),
    "flux": ("flux-dev", [], {"height": 64, "width": 64}),
    "wan": ("wan-1.3b", ["teacher.frames=9", "teacher.width=64"], {"num_frames": 9, "height": 64, "width": 64}),
}
BUILDERS = {"flux": "make_flux"}  # tiny teachers outside tiny_pipelines.FAMILIES
BF16_TOLERANCE = 0.05  # relative L2 difference of two bf16 computations of the same 4-step sampler
BIG = [  # (network, batch, extra overrides)
    ("pixart-xl", 8, ()),
    ("pixart-xl", 8, ("train.gradient_checkpointing=true",)),
    ("sdxl", 2, ()),
]


def versions() -> dict:
    from importlib.metadata import version

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    out.update({p: version(p) for p in ("diffusers", "peft", "accelerate", "transformers")})
    return out


def _pipe_inputs(cond: dict, dtype: torch.dtype) -> dict:
    """The family's cached conditions as pipeline arguments, in the pipeline's dtype (pipelines take their
    latents' dtype from the prompt embeddings)."""
    names = {"prompt_embeds": "prompt_embeds", "pooled": "pooled_prompt_embeds",
             "prompt_attention_mask": "prompt_attention_mask"}
    return {names[k]: v.to(dtype) if v.is_floating_point() else v for k, v in cond.items() if k in names}


def tiny_family(family: str, work: Path, device: torch.device) -> dict:
    """bf16 end to end on a tiny teacher: train, preview, export, and the stock pipeline against the library."""
    import tiny_pipelines

    preset, extra, call = TINY[family]
    build = getattr(tiny_pipelines, BUILDERS[family]) if family in BUILDERS else tiny_pipelines.FAMILIES[family][0]
    teacher = build(work / "teacher")
    (work / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    args = [f"teacher.path={teacher}", f"data.prompts={work / 'prompts.txt'}", "teacher.resolution=64",
            "train.batch_size=2", "lora.rank=4", "lora.alpha=8", "train.iterations=2", "train.preview_every=2",
            "train.progress=false", "optim.lr_student=1e-2", *extra]
    t0 = time.perf_counter()
    trainer = Trainer(resolve(preset, args), work / "run")
    hist = trainer.train()
    assert trainer.cfg.train.mixed_precision == "bf16"
    out = export_run(work / "run", "diffusers")
    run = load_run(work / "run", device, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(run.family.sample_shape(2), generator=g).to(device)
    cond, _ = run.family.sample_cond(2, g)
    x_ours = sample_student(run.student, x_T, run.grid(4), cond).float()
    pipe, kwargs = load_pipeline(teacher, lora=out, device=device, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    res = pipe(**_pipe_inputs(cond, torch.bfloat16), latents=x_T.clone().to(torch.bfloat16), output_type="latent",
               **{"num_inference_steps": 4, **call, **kwargs})  # Wan's kwargs name the steps themselves
    x_pipe = (res.frames if family in ("cogvideox", "wan") else res.images).float()
    rel = ((x_pipe - x_ours).norm() / x_ours.norm()).item()
    return {"family": family, "losses_finite": all(torch.isfinite(torch.tensor([m["loss_student"], m["loss_fake"]]))
                                                     .all().item() for m in hist),
            "preview": (work / "run" / "previews" / "step_0000002.png").exists(), "export_vs_library_rel": rel,
            "ok": rel < BF16_TOLERANCE, "seconds": time.perf_counter() - t0}


def big_network(name: str, batch: int, extra: tuple, work: Path, dry: bool) -> dict:
    preset, config, resolution = NETWORKS[name]
    overrides = [f"teacher.resolution={resolution}", f"train.batch_size={batch}", "train.mixed_precision=bf16",
                 "train.preview_every=0", *extra]
    folder = work / name
    if dry:  # configs and tokenizers only: what the estimate reads
        write_pipeline(folder / "teacher", PRESETS[preset]["teacher"]["family"], config, weights=False)
        (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
        cfg = resolve(preset, [f"teacher.path={folder / 'teacher'}", f"data.prompts={folder / 'prompts.txt'}",
                               *overrides])
        return {"network": name, "batch": batch, "extra": list(extra), "estimate_GiB": estimate_GiB(cfg)}
    return measure(name, batch, repeats=3, precision="bf16", extra=extra, work=folder)


def _distill(run: Path, args: list[str], env: dict, launcher: list[str]) -> list[dict]:
    cmd = [sys.executable, *launcher, "-m", "tdm.cli", "distill", "--output", str(run), "--no-eval", *args]
    done = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=300, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def fsdp_and_compile(work: Path, started: float, budget_s: float = 330) -> dict:
    """Full mode under FSDP (one process) and train.compile=true, each against the plain run: losses per step.
    Compilation takes minutes: it is skipped if the check has already run `budget_s` seconds."""
    import tiny_pipelines

    teacher = tiny_pipelines.make_sd15(work / "teacher")
    (work / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    base = ["--preset", "sd15", "--teacher", str(teacher), "--prompts", str(work / "prompts.txt"),
            "train.progress=false", "teacher.resolution=64", "train.batch_size=2", "train.iterations=3",
            "train.log_every=1", "train.preview_every=0", "optim.lr_student=1e-3"]
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node", "1"]
    out = {}
    full = base + ["lora.enabled=false"]
    plain = _distill(work / "full", full, {}, torchrun)
    t0 = time.perf_counter()
    try:
        fsdp = _distill(work / "fsdp", full, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, torchrun)
        ckpt = sorted((work / "fsdp" / "checkpoints").glob("step_*"))[-1]
        out["fsdp"] = {"loss_student": [m["loss_student"] for m in fsdp],
                       "plain_loss_student": [m["loss_student"] for m in plain],
                       "sharded_checkpoint": any("fsdp" in p.name for p in ckpt.iterdir()),
                       "seconds": time.perf_counter() - t0}
    except Exception as err:  # recorded, not fatal: the report says what failed
        out["fsdp"] = {"error": str(err)[-1500:]}
    if time.perf_counter() - started > budget_s:
        out["compile"] = {"skipped": f"over the {budget_s:.0f} s budget before compiling"}
        return out
    eager = _distill(work / "eager", base, {}, [])
    t0 = time.perf_counter()
    try:
        compiled = _distill(work / "compiled", base + ["train.compile=true"], {}, [])
        out["compile"] = {"loss_student": [m["loss_student"] for m in compiled],
                          "eager_loss_student": [m["loss_student"] for m in eager],
                          "seconds": time.perf_counter() - t0}
    except Exception as err:
        out["compile"] = {"error": str(err)[-1500:]}
    return out


def report(res: dict, dry: bool) -> str:
    v = res["versions"]
    lines = ["# GPU check", "",
             f"`bash benchmarks/gpu_check.sh` on {v['device']} ({res['date']}): torch {v['torch']} (CUDA {v['cuda']}), "
             f"diffusers {v['diffusers']}, peft {v['peft']}, accelerate {v['accelerate']}, transformers "
             f"{v['transformers']}; {res['seconds']:.0f} s in all." + (" DRY RUN: no GPU was used." if dry else ""),
             "", "## Every family in bf16 (tiny teachers)", "",
             "2 LoRA iterations with a preview, export, then the stock pipeline in bf16 with the LoRA against the "
             f"library's sampler on the same noise (relative L2 difference, tolerance {BF16_TOLERANCE}).", "",
             "| family | losses finite | preview | export vs library | ok | s |", "|---|---|---|---|---|---|"]
    for f in res["families"]:
        if "error" in f:
            lines.append(f"| {f['family']} | error: {f['error'].splitlines()[-1][:150]} | | | no | |")
        else:
            lines.append(f"| {f['family']} | {f['losses_finite']} | {f['preview']} | {f['export_vs_library_rel']:.2e} "
                         f"| {'yes' if f['ok'] else 'NO'} | {f['seconds']:.0f} |")
    lines += ["", "## Real-size networks (random weights), bf16, LoRA, CFG", ""]
    measured = [b for b in res["big"] if "median_s" in b]
    if measured:
        lines += [table(measured), "", "| network | batch | switches | syncs/iteration | peak GiB | dry-run GiB | "
                  "error |", "|---|---|---|---|---|---|---|"]
        for b in measured:
            err = b["estimate_GiB"] / b["peak_GiB"] - 1
            lines.append(f"| {b['network']} | {b['batch']} | {' '.join(b['extra']) or '-'} | "
                         f"{b['syncs_per_iteration']} | {b['peak_GiB']:.2f} | {b['estimate_GiB']:.2f} | "
                         f"{100 * err:+.0f}% |")
    for b in res["big"]:
        if "error" in b:
            lines.append(f"\n{b['network']} batch {b['batch']} {b['extra']}: error: {b['error'][-500:]}")
        elif "median_s" not in b:
            lines.append(f"- {b['network']}, batch {b['batch']} {' '.join(b['extra'])}: dry-run estimate "
                         f"{b['estimate_GiB']:.2f} GiB (not measured: dry run)")
    if "fsdp" in res:
        lines += ["", "## FSDP (full mode, one process) and torch.compile (tiny SD1.5)", "",
                  "```", json.dumps({k: res[k] for k in ("fsdp", "compile")}, indent=1), "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry", action="store_true", help="the parts that need no GPU; report to a temporary folder")
    p.add_argument("--out", help="report folder (default: docs/ and benchmarks/results/; with --dry a temp folder)")
    p.add_argument("--families", default=",".join(TINY), help="tiny families to check (default: all)")
    args = p.parse_args()
    families = args.families.split(",")
    if not set(families) <= set(TINY):
        p.error(f"--families: choose from {','.join(TINY)}")
    dry = args.dry
    if not dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --dry for the parts that need none", file=sys.stderr)
        return 2
    device = torch.device("cpu" if dry else "cuda")
    work = Path(tempfile.mkdtemp(prefix="tdm_gpu_check_"))
    t0 = time.perf_counter()
    res = {"versions": versions(), "date": time.strftime("%Y-%m-%d"), "families": [], "big": []}
    for family in families:
        try:
            res["families"].append(tiny_family(family, work / family, device))
        except Exception:
            res["families"].append({"family": family, "error": traceback.format_exc()})
        print(res["families"][-1], flush=True)
    for name, batch, extra in BIG:
        try:
            res["big"].append(big_network(name, batch, extra, work, dry))
        except Exception:
            res["big"].append({"network": name, "batch": batch, "extra": list(extra), "error": traceback.format_exc()})
        print({k: v for k, v in res["big"][-1].items() if k not in ("config", "seconds")}, flush=True)
    if not dry:
        res.update(fsdp_and_compile(work / "fsdp", t0))
    res["seconds"] = time.perf_counter() - t0
    docs, results = (Path(args.out),) * 2 if args.out else ((work,) * 2 if dry else (ROOT / "docs",
                                                                                     ROOT / "benchmarks" / "results"))
    docs.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    (docs / "gpu.md").write_text(report(res, dry))
    (results / "gpu_check.json").write_text(json.dumps(res, indent=1, default=str))
    print(f"wrote {docs / 'gpu.md'} and {results / 'gpu_check.json'}")
    failed = [f["family"] for f in res["families"] if not f.get("ok")] + [b["network"] for b in res["big"]
                                                                          if "error" in b]
    if failed:
        print(f"gpu_check: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
