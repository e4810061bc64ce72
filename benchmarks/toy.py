"""Exact teacher vs TDM students on the toy mixtures: one table, and JSON in benchmarks/results/.

    python benchmarks/toy.py [--iterations 600] [--preset toy-gmm]

Every row is measured in this run with the same start noise and sample count (4000); the
'true samples' row is a second draw from the true law, the floor of each distance.
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
from tdm.evaluate import evaluate
from tdm.trainer import Trainer

DEMO_FORWARDS = 11  # the authors' demo iteration (TDM-METHOD §4)


def train_and_eval(preset: str, overrides: list[str], pretrained: Path, work: Path, steps=()) -> dict:
    run = work / "_".join(o.replace("/", "") for o in overrides) if overrides else work / "default"
    run.mkdir(parents=True)
    shutil.copy(pretrained, run / "pretrained.safetensors")  # all students start from the same teacher fit
    cfg = resolve(preset, ["train.progress=false", "train.checkpoint_every=100000"] + overrides)
    t0 = time.perf_counter()
    hist = Trainer(cfg, run).train()
    wall = time.perf_counter() - t0
    m = evaluate(run, steps=steps)
    m["wall_s"], m["iterations"] = wall, cfg.train.iterations
    m["forwards"] = sum(h["forwards"] for h in hist) / len(hist)
    m["forwards_batch_equiv"] = sum(h["forwards_batch_equiv"] for h in hist) / len(hist)
    return m


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="toy-gmm")
    p.add_argument("--iterations", type=int, default=600)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    torch.set_num_threads(1)  # tiny MLPs: one thread is fastest and makes runs repeatable
    work = Path(tempfile.mkdtemp(prefix="tdm-bench-"))
    it = f"train.iterations={args.iterations}"

    # the shared 'pretrained diffusion model' (the only use of data samples)
    t0 = time.perf_counter()
    Trainer(resolve(args.preset, ["train.progress=false", "train.iterations=0"]), work / "pre")
    pretrained, pre_wall = work / "pre" / "pretrained.safetensors", time.perf_counter() - t0

    runs = {
        "TDM K=4": [it, "student.steps=4"],  # the preset's own settings
        "TDM K=2": [it, "student.steps=2"],
        "TDM K=1": [it, "student.steps=1"],
        "TDM-unify {1,2,4}": [it, "student.unify=[1,2,4]", "student.grid=trailing"],
    }
    default_is = resolve(args.preset).tdm.importance_weight  # the ablation runs the other choice
    other_is = "none" if default_is == "tempered" else "tempered"
    runs[f"TDM K=4, w_IS={other_is}"] = [it, "student.steps=4", f"tdm.importance_weight={other_is}"]
    results = {"preset": args.preset, "pretrain_wall_s": pre_wall, "runs": {}}
    rows = []
    for name, ov in runs.items():
        steps = None if name == "TDM K=4" else ()
        m = train_and_eval(args.preset, ov, pretrained, work, steps)
        results["runs"][name] = m
        if name == "TDM K=4":
            rows.append(("true samples (floor)", "-", m["reference"], "", "", ""))
            for sampler, entries in m["teacher"].items():
                rows += [(f"teacher {sampler}", e["nfe"], e, "", "", "") for e in entries.values()]
        for key, e in m["student"].items():
            label = name if len(m["student"]) == 1 else f"{name} @ {key}"
            rows.append((label, e["nfe"], e, m["iterations"], f"{m['wall_s']:.0f}", f"{m['forwards']:.2f}"))
        print(f"done: {name}", flush=True)

    keys = ["energy_distance", "sliced_w1", "mode_coverage", "off_mode"] + (
        ["class_accuracy"] if "class_accuracy" in results["runs"]["TDM K=4"]["reference"] else [])
    head = ["sampler", "NFE", *keys, "iters", "wall s", "fwd/iter"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, nfe, e, iters, wall, fwd in rows:
        lines.append("| " + " | ".join([name, str(nfe), *(f"{e[k]:.4f}" for k in keys), str(iters), wall, fwd]) + " |")
    k4 = results["runs"]["TDM K=4"]
    lines.append("")
    lines.append(f"Forwards per iteration at K=4: {k4['forwards']:.2f} network calls "
                 f"({k4['forwards_batch_equiv']:.2f} full-batch equivalents) vs the demo's {DEMO_FORWARDS}. "
                 f"Pre-training the MLP teacher fit: {pre_wall:.0f} s. Samples per row: {k4['n_samples']}.")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.preset}.json").write_text(json.dumps(results, indent=2))
    (out / f"{args.preset}.md").write_text(table + "\n")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
