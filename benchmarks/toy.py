"""Exact teacher vs TDM students on the toy mixtures: one table, and JSON in benchmarks/results/.

    python benchmarks/toy.py [--iterations 600] [--preset toy-gmm] [--seeds 0,1,2]

Every row is measured in this run with the same start noise and sample count (4000), against two
yardsticks: the true law (`energy_distance`, `sliced_w1`) and the teacher's own law at its guidance,
drawn by the exact reference sampler (`*_vs_teacher`). The 'true samples' row is a second draw of the
true law (the floor of the distances to it), the 'teacher law' row a second draw of the teacher's law
(the floor of the distances to it). Each student is trained once per seed (`train.seed`); its cells
give the mean over seeds and, in brackets, the lowest and highest seed. Teacher rows do not depend on
the training seed.
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

DEMO_FORWARDS = 11  # the authors' demo iteration (TDM-METHOD §4)


def train_and_eval(preset: str, overrides: list[str], pretrained: Path, work: Path, steps=()) -> dict:
    run = work / "_".join(o.replace("/", "") for o in overrides if o.startswith(("student", "tdm", "train.seed")))
    run.mkdir(parents=True)
    shutil.copy(pretrained, run / "pretrained.safetensors")  # all students start from the same teacher fit
    cfg = resolve(preset, ["train.checkpoint_every=100000"] + overrides)
    t0 = time.perf_counter()
    hist = Trainer(cfg, run).train()
    wall = time.perf_counter() - t0
    m = evaluate(run, steps=steps)
    m["wall_s"], m["iterations"] = wall, cfg.train.iterations
    m["forwards"] = sum(h["forwards"] for h in hist) / len(hist)
    m["forwards_batch_equiv"] = sum(h["forwards_batch_equiv"] for h in hist) / len(hist)
    return m


def _cell(values: list[float | None]) -> str:
    """One value, or the mean over seeds with the lowest and highest in brackets; '-' where undefined (null:
    e.g. the std of modes that no sample reached)."""
    if any(v is None for v in values):
        return "-" if len(values) == 1 else "-" + f" ({sum(v is None for v in values)} of {len(values)} seeds)"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{sum(values) / len(values):.4f} ({min(values):.4f}-{max(values):.4f})"


def render(results: dict) -> str:
    """The markdown table of a results dict (the JSON this script writes)."""
    runs = results["runs"]
    first = runs["TDM K=4"][f"seed={results['seeds'][0]}"]
    keys = ["energy_distance", "energy_distance_vs_teacher", "sliced_w1", "sliced_w1_vs_teacher", "mode_coverage",
            "off_mode", "mode_std_ratio"] + (["class_accuracy"] if "class_accuracy" in first["reference"] else [])
    rows = [("true samples (floor of the distances to the true law)", "-", [first["reference"]], "", "", ""),
            (f"teacher law (floor of the distances to it; exact reference sampler, w = {first['guidance']:g})",
             first["teacher_law"]["nfe"], [first["teacher_law"]], "", "", "")]
    for sampler, entries in first["teacher"].items():
        rows += [(f"teacher {sampler}", e["nfe"], [e], "", "", "") for e in entries.values()]
    for name, by_seed in runs.items():
        ms = list(by_seed.values())
        wall = f"{sum(m['wall_s'] for m in ms) / len(ms):.0f}"
        fwd = f"{sum(m['forwards'] for m in ms) / len(ms):.2f}"
        for key, e in ms[0]["student"].items():
            label = name if len(ms[0]["student"]) == 1 else f"{name} @ {key}"
            rows.append((label, e["nfe"], [m["student"][key] for m in ms], ms[0]["iterations"], wall, fwd))
    head = ["sampler", "NFE", *keys, "iters", "wall s", "fwd/iter"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, nfe, es, iters, wall, fwd in rows:
        cells = [_cell([e[k] for e in es]) for k in keys]
        lines.append("| " + " | ".join([name, str(nfe), *cells, str(iters), wall, fwd]) + " |")
    lines.append("")
    lines.append(f"Students: mean over training seeds {', '.join(map(str, results['seeds']))} (lowest-highest). "
                 f"Forwards per iteration at K=4: {first['forwards']:.2f} network calls "
                 f"({first['forwards_batch_equiv']:.2f} full-batch equivalents) vs the demo's {DEMO_FORWARDS}. "
                 f"Pre-training the MLP teacher fit: {results['pretrain_wall_s']:.0f} s. "
                 f"Samples per row: {first['n_samples']}.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="toy-gmm")
    p.add_argument("--iterations", type=int, default=600)
    p.add_argument("--seeds", default="0,1,2", help="training seeds per student (comma-separated)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--render", metavar="JSON", help="print the table of a results file and exit")
    p.add_argument("overrides", nargs="*", help="config overrides for every run (a quick check: net.pretrain_steps=50)")
    args = p.parse_args()
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return
    torch.set_num_threads(1)  # tiny MLPs: one thread is fastest and makes runs repeatable
    work = Path(tempfile.mkdtemp(prefix="tdm-bench-"))
    it = f"train.iterations={args.iterations}"
    base = ["train.progress=false", *args.overrides]

    # the shared 'pretrained diffusion model' (the only use of data samples)
    t0 = time.perf_counter()
    Trainer(resolve(args.preset, [*base, "train.iterations=0"]), work / "pre")
    pretrained, pre_wall = work / "pre" / "pretrained.safetensors", time.perf_counter() - t0

    runs = {
        "TDM K=4": [*base, it, "student.steps=4"],  # the preset's own settings
        "TDM K=2": [*base, it, "student.steps=2"],
        "TDM K=1": [*base, it, "student.steps=1"],
        "TDM-unify {1,2,4}": [*base, it, "student.unify=[1,2,4]", "student.grid=trailing"],
    }
    default_is = resolve(args.preset).tdm.importance_weight  # the ablation runs the other choice
    other_is = "none" if default_is == "tempered" else "tempered"
    runs[f"TDM K=4, w_IS={other_is}"] = [*base, it, "student.steps=4", f"tdm.importance_weight={other_is}"]
    seeds = [int(v) for v in args.seeds.split(",")]
    results = {"preset": args.preset, "pretrain_wall_s": pre_wall, "seeds": seeds, "runs": {}}
    for name, ov in runs.items():
        steps = None if name == "TDM K=4" else ()
        results["runs"][name] = {}
        for seed in seeds:
            results["runs"][name][f"seed={seed}"] = train_and_eval(
                args.preset, ov + [f"train.seed={seed}"], pretrained, work, steps if seed == seeds[0] else ())
            print(f"done: {name}, seed {seed}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.preset}.json").write_text(json.dumps(results, indent=2))
    table = render(results)
    print(table)
    (out / f"{args.preset}.md").write_text(table + "\n")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
