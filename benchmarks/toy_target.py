"""What it takes for TDM's 4-step student to reach the toy-gmm quality target: at most 1.5x the energy distance of
the teacher's honest many-step reference (a second draw of the exact reference sampler, compare.py's `teacher_law`).

    python benchmarks/toy_target.py [--seeds 3] [--points 4] [--only "NAME;..."]

Each row is TDM at K=4 on `toy-gmm` with the preset's settings plus the row's overrides (longer training, the demo's
cosine schedule with warm-up, EMA, learning rates), 3 training seeds from one shared teacher fit, measured along the
run like compare.py's curves. Prints a table (mean ± std over seeds, and the best point of the mean curve) and
writes benchmarks/results/toy-target.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from tdm.config import resolve

sys.path.insert(0, str(Path(__file__).parent))
from compare import teacher_rows, toy_fit, train_curve  # noqa: E402

PRESET, METRIC = "toy-gmm", "energy_distance"
ROWS = {
    "preset (600 iterations)": [],
    "2000 iterations": ["train.iterations=2000"],
    "2000 iterations, cosine, warm-up 100": ["train.iterations=2000", "optim.decay=cosine", "optim.warmup=100"],
    "2000 iterations, EMA 0.99": ["train.iterations=2000", "optim.ema=0.99"],
    "600 iterations, lr x3": ["optim.lr_student=3e-4", "optim.lr_fake=3e-3"],
    "600 iterations, cosine, warm-up 30": ["optim.decay=cosine", "optim.warmup=30"],
    "2000 iterations, lr x3, cosine, warm-up 100, EMA 0.99": [
        "train.iterations=2000", "optim.lr_student=3e-4", "optim.lr_fake=3e-3", "optim.decay=cosine",
        "optim.warmup=100", "optim.ema=0.99"],
}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--points", type=int, default=4, help="measurements along each run")
    p.add_argument("--only", default="", help="row names separated by ; (default: all); added to the JSON's rows")
    p.add_argument("--out", default="benchmarks/results/toy-target.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # tiny MLPs: one thread is fastest and makes runs repeatable
    rows = {k: v for k, v in ROWS.items() if not args.only or k in args.only.split(";")}
    work = Path(tempfile.mkdtemp(prefix="tdm-target-"))
    out_path = Path(args.out)
    try:
        pretrained = toy_fit(PRESET, work)
        ref = teacher_rows(PRESET, [], work, pretrained, (50,))
        floor = ref["teacher_law"][METRIC]
        kept = json.loads(out_path.read_text())["rows"] if args.only and out_path.exists() else {}  # --only: add rows
        out = {"preset": PRESET, "metric": METRIC, "teacher_law": floor, "target": 1.5 * floor,
               "teacher_ddim_50": ref["teacher"]["ddim"]["steps=50"][METRIC], "rows": kept}
        for name, ov in rows.items():
            seeds = []
            for seed in range(args.seeds):
                its = resolve(PRESET, ov).train.iterations
                r = train_curve(PRESET, ["student.steps=4", *ov, f"train.seed={seed}"], work, pretrained, its,
                                args.points, METRIC)
                seeds.append(r["curve"])
                print(f"{name} seed {seed}: {[round(c['K=4'], 5) for c in r['curve']]}", flush=True)
            final = [c[-1]["K=4"] for c in seeds]
            mean_curve = [statistics.fmean(c[i]["K=4"] for c in seeds) for i in range(len(seeds[0]))]
            out["rows"][name] = {"overrides": ov, "final": final, "mean": statistics.fmean(final),
                                 "std": statistics.stdev(final) if len(final) > 1 else 0.0,
                                 "curve_iterations": [c["iteration"] for c in seeds[0]], "mean_curve": mean_curve,
                                 "wall_s": statistics.fmean(c[-1]["wall_s"] for c in seeds), "seeds": seeds}
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(out, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(out))
    return out


def table(out: dict) -> str:
    lines = [f"toy-gmm, TDM K=4, energy distance (mean ± std over seeds); target {out['target']:.4g} = 1.5 x the "
             f"teacher's law {out['teacher_law']:.4g}; teacher DDIM 50 steps {out['teacher_ddim_50']:.4g}", "",
             "| row | final | x target | best point of the mean curve | train wall s |", "|---|---|---|---|---|"]
    for name, r in out["rows"].items():
        best = min(zip(r["mean_curve"], r["curve_iterations"]))
        lines.append(f"| {name} | {r['mean']:.4g} ± {r['std']:.2g} | {r['mean'] / out['target']:.2f} | "
                     f"{best[0]:.4g} at {best[1]} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
