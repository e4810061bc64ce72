"""digits-sd: the LoRA student against its teacher, the stock pipeline with the exported LoRA, and the
same run with another seed, with gradient checkpointing and in full fine-tuning mode.

    python benchmarks/digits_sd.py [--root DIR] [--variants lora,lora_seed1,lora_seed2,lora_gc,full,...]

Each variant is `tdm distill --preset digits-sd` plus its overrides into ROOT/NAME (a finished run is
reused), at one CPU thread. Prints a markdown table and writes benchmarks/results/digits-sd.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tdm.cli import main as tdm  # first: sets HF_HUB_OFFLINE, nothing is downloaded
from tdm.eval.digits import DigitsSDEvaluator
from tdm.export.pipeline import export_run, load_pipeline
from tdm.families.digits.sd_teacher import to_digit
from tdm.run import load_run

VARIANTS = {
    "lora": [],
    "lora_seed1": ["train.seed=1"],               # seed noise of the LoRA run
    "lora_seed2": ["train.seed=2"],
    "lora_gc": ["train.gradient_checkpointing=true"],
    "full": ["lora.enabled=false", "optim.lr_student=2e-5", "optim.lr_fake=2e-4"],  # the pixel job's full-model lrs
    "full_preset_lr": ["lora.enabled=false"],     # the LoRA run's lrs on the whole network
}
RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ("fd", "accuracy", "precision", "recall")


def run_variant(root: Path, name: str) -> dict:
    run_dir = root / name
    if not (run_dir / "metrics.json").exists():
        assert tdm(["distill", "--preset", "digits-sd", "--output", str(run_dir), *VARIANTS[name],
                    "train.progress=false"]) == 0
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return {"metrics": json.loads((run_dir / "metrics.json").read_text()), "iterations": log[-1]["step"],
            "wall_s": round(log[-1]["wall_s"]), "overrides": VARIANTS[name]}


def stock_pipeline(run_dir: Path, K: int, seed: int = 0) -> dict:
    """Export, then a stock StableDiffusionPipeline with the LoRA and the recorded scheduler on the
    evaluation's prompts (as text) and start noise; its metrics and its distance to the library's images."""
    run = load_run(run_dir)
    fam, n = run.family, run.cfg.train.eval_samples
    judge = DigitsSDEvaluator(fam)
    g = torch.Generator().manual_seed(seed)                      # the draws of `tdm eval`
    x_T = torch.randn(fam.sample_shape(n), generator=g)
    idx = fam.prompts_for(judge.held_out(n), g)
    cond = fam._cond(idx)
    ours = fam.decode(run.sample(K, x_T, cond))
    pipe, kwargs = load_pipeline(fam.path, lora=export_run(run_dir, "diffusers"))
    pipe.set_progress_bar_config(disable=True)
    t0 = time.perf_counter()
    stock = pipe([fam.prompts[i] for i in idx], latents=x_T.clone(), output_type="pt", **kwargs).images
    return {**judge.metrics.evaluate(to_digit(stock * 2 - 1), cond["labels"]), "nfe": K,
            "max_abs_diff_vs_library": (stock - ours).abs().max().item(), "wall_s": round(time.perf_counter() - t0, 1)}


def table(results: dict) -> str:
    first = next(iter(results.values()))["metrics"]
    rows = [("real training digits (floor)", "-", first["reference"], "", "")]
    for sampler, entries in first["teacher"].items():
        rows += [(f"teacher {sampler}, {k.split('=')[1]} steps", e["nfe"], e, "", "") for k, e in entries.items()]
    for name, r in results.items():
        for k, e in r["metrics"]["student"].items():
            trained = "" if e["trained"] else " (trained at 4)"
            K = int(k.split("=")[1])
            rows.append((f"TDM {name}, {K} step{'s' * (K > 1)}{trained}", e["nfe"], e, r["iterations"], r["wall_s"]))
        if "stock" in r:
            rows.append((f"stock pipeline + exported {name} student, 4 steps", 4, r["stock"], "", r["stock"]["wall_s"]))
    lines = ["| sampler | NFE | FD | accuracy | precision | recall | iters | wall s |", "|---" * 8 + "|"]
    for name, nfe, e, iters, wall in rows:
        lines.append(f"| {name} | {nfe} | " + " | ".join(f"{e[c]:.3f}" if c != "fd" else f"{e[c]:.1f}" for c in COLUMNS)
                     + f" | {iters} | {wall} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", default="runs/digits-sd-bench")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(1)  # small networks on a shared 2-core machine: one thread is fastest
    root = Path(args.root)
    results = {}
    for name in args.variants.split(","):
        results[name] = run_variant(root, name)
        if name == "lora":
            results[name]["stock"] = stock_pipeline(root / name, K=4)
    md = table(results)
    print(md)
    if "stock" in results.get("lora", {}):
        print(f"stock pipeline vs library, max |image difference| (fp32, [0, 1] pixels): "
              f"{results['lora']['stock']['max_abs_diff_vs_library']:.2e}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "digits-sd.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "digits-sd.md").write_text(md + "\n")


if __name__ == "__main__":
    main()
