"""DMD2 (no GAN) on a toy teacher: learning rates, update ratios and sampler, against TDM and the teacher's DDIM.

    python benchmarks/dmd2_toy.py [--preset toy-gmm] [--iterations 600] [--pretrained FILE] [--seed S] [--only NAME ...]

Every student starts from the same MLP fit (`--pretrained`, else fitted here) and is measured with the same 4000
start noises (`tdm eval`'s metrics). One CPU thread. Prints one line per run; JSON and a table in --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from tdm.config import resolve
from tdm.eval.evaluate import evaluate
from tdm.trainer import Trainer

KEYS = ("energy_distance", "sliced_w1", "mode_coverage", "off_mode")


def runs(iterations: int) -> dict[str, list[str]]:
    """Name -> overrides. `fwd` runs get the iterations that spend TDM's forwards (8 per iteration at K = 4)."""
    it = f"train.iterations={iterations}"
    lrs = {"lr 1e-4/1e-3": [], "lr 3e-4/3e-3": ["optim.lr_student=3e-4", "optim.lr_fake=3e-3"],
           "lr 3e-5/3e-4": ["optim.lr_student=3e-5", "optim.lr_fake=3e-4"]}
    out = {"TDM K=4": [it]}
    for lr, ov in lrs.items():
        for N in (1, 5):
            out[f"DMD2 N={N}, {lr}"] = [it, "method=dmd2", f"dmd2.fake_updates={N}", *ov]
    out["DMD2 N=5, lr 1e-4/1e-3, TDM's forwards"] = [f"train.iterations={iterations * 8 // 28}", "method=dmd2"]
    for N in (1, 5):
        out[f"DMD2 N={N}, lr 1e-4/1e-3, stochastic"] = [it, "method=dmd2", f"dmd2.fake_updates={N}",
                                                        "student.stochastic=true"]
    return out


def train_and_eval(preset: str, overrides: list[str], pretrained: Path, run: Path, teacher: bool) -> dict:
    run.mkdir(parents=True)
    shutil.copy(pretrained, run / "pretrained.safetensors")  # all students start from the same fit
    cfg = resolve(preset, ["train.progress=false", "train.checkpoint_every=100000"] + overrides)
    t0 = time.perf_counter()
    hist = Trainer(cfg, run).train()
    wall = time.perf_counter() - t0
    m = evaluate(run, steps=(4,) if teacher else ())
    m.update(wall_s=wall, iterations=cfg.train.iterations, forwards=sum(h["forwards"] for h in hist) / len(hist))
    return m


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="toy-gmm")
    p.add_argument("--iterations", type=int, default=600)
    p.add_argument("--pretrained", type=Path, help="a pretrained.safetensors of this preset (else fitted here)")
    p.add_argument("--only", nargs="*", help="run names to run (default: all)")
    p.add_argument("--seed", type=int, default=0, help="train.seed of the distillation runs (the fit is shared)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="tdm-dmd2-"))
    pretrained = args.pretrained
    if pretrained is None:
        Trainer(resolve(args.preset, ["train.progress=false", "train.iterations=0"]), work / "pre").release()
        pretrained = work / "pre" / "pretrained.safetensors"
    todo = {k: v for k, v in runs(args.iterations).items() if not args.only or k in args.only}
    results, first = {}, True
    for i, (name, ov) in enumerate(todo.items()):
        m = train_and_eval(args.preset, [*ov, f"train.seed={args.seed}"], pretrained, work / f"run{i}", teacher=first)
        if first:
            ddim = m["teacher"]["ddim"]["steps=4"]
            results[f"teacher ddim 4 steps (NFE {ddim['nfe']})"] = ddim
            results["true samples (floor)"] = m["reference"]
            first = False
        (e,) = m["student"].values()
        results[name] = {**e, "iterations": m["iterations"], "wall_s": round(m["wall_s"], 1),
                         "forwards": m["forwards"], "overrides": ov}
        shown = {k: e[k] for k in KEYS + ("class_accuracy",) if k in e}
        print(name, shown, f"{m['wall_s']:.0f} s, {m['forwards']:.2f} fwd/it", flush=True)
    keys = KEYS + (("class_accuracy",) if "class_accuracy" in results["true samples (floor)"] else ())
    lines = ["| run | " + " | ".join(keys) + " | iters | wall s | fwd/iter |", "|" + "---|" * (len(keys) + 4)]
    for name, e in results.items():
        extra = [str(e.get("iterations", "")), str(e.get("wall_s", "")), f"{e['forwards']:.2f}" if "forwards" in e
                 else ""]
        lines.append(f"| {name} | " + " | ".join(f"{e[k]:.4f}" for k in keys) + " | " + " | ".join(extra) + " |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = f"dmd2-{args.preset}-seed{args.seed}" + ("-" + "-".join(str(i) for i, k in enumerate(runs(0)) if k in todo)
                                   if args.only else "")
    (args.out / f"{tag}.json").write_text(json.dumps(results, indent=2))
    (args.out / f"{tag}.md").write_text(table + "\n")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
