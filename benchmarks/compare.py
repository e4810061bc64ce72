"""Every distillation method through the same trainer, teacher, student network and budget: tables, curves, JSON.

    python benchmarks/compare.py                      # toy-gmm, toy-gmm-cond (3 seeds) and digits (1 seed)
    python benchmarks/compare.py --quick              # CI: toy-gmm, 1 seed, K=4, a small budget; each method improves
    python benchmarks/compare.py --teachers digits --seeds 1 --methods tdm,dmd2

For each teacher, method, step count K and seed a run trains in segments; after each segment its student is
measured on the same noise and conditions (the learning curve, by iteration and by measured training wall time).
The teacher's own samplers at 4-50 NFE are the reference rows; the paper's ablations are rows of the TDM method.
Writes benchmarks/results/compare-<teacher>.{json,md} and docs/compare_<teacher>.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from tdm.config import resolve
from tdm.eval.evaluate import evaluate
from tdm.methods.base import method_names
from tdm.trainer import Trainer

# The quality number of each teacher (lower is better). The guided toy is measured against its guided teacher's own
# law (what a student of that teacher can reach), not the unguided true law; both are in the JSON.
METRIC = {"toy-gmm": "energy_distance", "toy-gmm-cond": "energy_distance_vs_teacher", "digits": "fd"}
# Each method's own settings (the preset's learning rates serve every method: at 1e-4 / 1e-3 they were within seed
# noise of the best of each baseline's sweep on toy-gmm, README "Methods"): consistency samples the LCM way; DMD2
# updates its fake score once per student update (its paper's 5 cost 3.5x the forwards for no consistent gain in
# that sweep, so 1 is DMD2's best use of a budget here).
METHOD_OVERRIDES: dict[str, list[str]] = {"consistency": ["student.stochastic=true"], "dmd2": ["dmd2.fake_updates=1"]}
# The paper's ablations (Tables 5-7) as TDM rows at K=4, each against the preset's own setting.
ABLATIONS = {
    "no importance weight": ["tdm.importance_weight=none"],
    "tempered importance weight": ["tdm.importance_weight=tempered"],
    "clean matching (Table 7)": ["tdm.matching=clean"],
    "shared interval": ["tdm.interval=shared"],
    "Huber of the paper": ["tdm.generator_loss=huber_paper"],
    "unify {1,2,4}": ["student.unify=[1,2,4]", "student.grid=trailing"],
}


def _segments(iterations: int, points: int) -> list[int]:
    return sorted({round(iterations * i / points) for i in range(points + 1)})


def train_curve(preset: str, overrides: list[str], work: Path, pretrained: Path | None, iterations: int,
                points: int, metric: str) -> dict:
    """Train in segments, measuring the student after each; wall time counts training only."""
    name = f"run{len(list(work.iterdir()))}"
    base = ["train.progress=false", "train.checkpoint_every=1000000", *overrides]
    curve, wall = [], 0.0
    for it in _segments(iterations, points):
        run = work / (name if it else f"{name}_start")  # the start (no checkpoint) in a folder of its own
        if not run.exists():
            run.mkdir()
            if pretrained is not None:  # every student starts from the same teacher fit
                shutil.copy(pretrained, run / "pretrained.safetensors")
        cfg = resolve(preset, base + [f"train.iterations={it}"])
        t0 = time.perf_counter()
        hist = Trainer(cfg, run).train()
        wall += time.perf_counter() - t0
        m = evaluate(run, steps=())
        K = cfg.student.unify or [cfg.student.steps]
        point = {"iteration": it, "wall_s": round(wall, 3),
                 **{key: e[metric] for key, e in m["student"].items() if e["nfe"] in K}}
        if hist:
            point["forwards"] = sum(h["forwards"] for h in hist) / len(hist)
        curve.append(point)
        if not it:
            shutil.rmtree(run)
    shutil.rmtree(run)
    return {"curve": curve, "final": m["student"], "reference": m["reference"]}


def toy_fit(preset: str, work: Path, common: list[str] = ()) -> Path | None:
    """A toy teacher's MLP fit (every student's start), made once for every run of a comparison; None elsewhere."""
    if resolve(preset).teacher.family != "toy":
        return None
    Trainer(resolve(preset, ["train.progress=false", "train.iterations=0", *common]), work / "pre").release()
    return work / "pre" / "pretrained.safetensors"


def teacher_rows(preset: str, common: list[str], work: Path, pretrained: Path | None, steps: tuple[int, ...]) -> dict:
    """The teacher's samplers on the same noise as every student (and the floor: a second draw of the data)."""
    run = work / "teacher"
    run.mkdir()
    if pretrained is not None:
        shutil.copy(pretrained, run / "pretrained.safetensors")
    Trainer(resolve(preset, ["train.progress=false", "train.iterations=0", *common]), run).train()
    m = evaluate(run, steps=steps)
    shutil.rmtree(run)
    return {k: m[k] for k in ("teacher", "reference", "teacher_law") if k in m}


def iteration_costs(preset: str, jobs: dict[str, list[str]], work: Path, pretrained: Path | None,
                    rounds: int = 5, iterations: int = 10) -> dict[str, float]:
    """Seconds per training iteration of each job, measured interleaved in one process (round-robin, `rounds` times
    `iterations` each; the median round): a load that varies over time weighs on every job alike. The equal-wall-time
    table uses these, not the wall times of runs made minutes apart."""
    trainers = {}
    for label, ov in jobs.items():
        run = work / f"cost{len(trainers)}"
        run.mkdir()
        if pretrained is not None:
            shutil.copy(pretrained, run / "pretrained.safetensors")
        trainers[label] = Trainer(resolve(preset, ["train.progress=false", *ov]), run)
    times = {label: [] for label in jobs}
    for r in range(rounds + 1):  # the first round warms up
        for label, trainer in trainers.items():
            t0 = time.perf_counter()
            for _ in range(iterations):
                trainer._step()
            if r:
                times[label].append((time.perf_counter() - t0) / iterations)
    for trainer in trainers.values():
        trainer.release()
    return {label: statistics.median(t) for label, t in times.items()}


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def _at(curve: list[dict], x_key: str, x: float, key: str) -> float:
    """The curve's value at `x` (linear between its points; its ends beyond them)."""
    pts = [(p[x_key], p[key]) for p in curve]
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1]


def _first_reaching(curve: list[dict], key: str, target: float) -> float | None:
    """The first iteration at which the curve is at or below `target` (linear between points), or None."""
    for a, b in zip(curve, curve[1:]):
        if b[key] <= target:
            if a[key] <= target:
                return a["iteration"]
            return a["iteration"] + (b["iteration"] - a["iteration"]) * (a[key] - target) / (a[key] - b[key])
    return curve[0]["iteration"] if curve[0][key] <= target else None


def _mean_curve(curves: list[list[dict]], key: str) -> list[dict]:
    return [{"iteration": pts[0]["iteration"], "wall_s": statistics.fmean(p["wall_s"] for p in pts),
             key: statistics.fmean(p[key] for p in pts)} for pts in zip(*curves)]


def compare(preset: str, methods: list[str], Ks: list[int], seeds: list[int], iterations: int, points: int,
            ablations: bool, teacher_steps: tuple[int, ...], work: Path, common: list[str] = (),
            own_iterations: dict[str, int] | None = None, save=None, costs: bool = False) -> dict:
    """`common`: overrides of every run (the quick mode's short fit and small evaluation); `own_iterations`: a
    method's budget where it is not `iterations` (the quick mode only: equal budgets otherwise); `save(out)` is
    called after every job (a long comparison stopped midway keeps what it measured); `costs`: measure each
    method's seconds per iteration interleaved (`iteration_costs`) for the equal-wall-time table."""
    metric = METRIC[preset]
    pretrained = toy_fit(preset, work, common)
    out = {"preset": preset, "metric": metric, "iterations": iterations, "seeds": seeds,
           **teacher_rows(preset, common, work, pretrained, teacher_steps), "runs": {}}
    jobs = [(f"{m} K={K}", [*common, f"method={m}", f"student.steps={K}", *METHOD_OVERRIDES.get(m, [])])
            for m in methods for K in Ks]
    if ablations:
        jobs += [(f"tdm K=4, {name}", [*common, "student.steps=4", *ov]) for name, ov in ABLATIONS.items()]
    for label, ov in jobs:
        runs = []
        for seed in seeds:
            its = (own_iterations or {}).get(label.split()[0], iterations)
            runs.append(train_curve(preset, [*ov, f"train.seed={seed}"], work, pretrained, its, points, metric))
            print(f"{preset}: {label} seed {seed}: {metric} {runs[-1]['curve'][0]} -> {runs[-1]['curve'][-1]}",
                  flush=True)
        keys = [k for k in runs[0]["curve"][-1] if k.startswith("K=")]
        out["runs"][label] = {"overrides": ov, "seeds": runs,
                              "final": {k: _stats([r["curve"][-1][k] for r in runs]) for k in keys},
                              "start": {k: _stats([r["curve"][0][k] for r in runs]) for k in keys},
                              "wall_s": _stats([r["curve"][-1]["wall_s"] for r in runs])}
        if save is not None:
            save(out)
    if costs:
        k4 = {f"{m} K=4" for m in methods}
        out["iteration_s"] = iteration_costs(preset, {label: ov for label, ov in jobs if label in k4}, work, pretrained)
        if save is not None:
            save(out)
    return out


def _g(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def _pm(s: dict) -> str:
    return f"{s['mean']:.4g} ± {s['std']:.2g}" if len(s["values"]) > 1 else f"{s['mean']:.4g}"


def report(res: dict, methods: list[str]) -> str:
    """The tables of one teacher: equal iterations, equal wall time, iterations to the same quality, ablations."""
    metric, runs = res["metric"], res["runs"]
    n = len(res["seeds"])
    lines = [f"### {res['preset']}: {metric} (lower is better), {res['iterations']} iterations, "
             f"{n} seed{'s' * (n > 1)} (mean ± std)", "",
             f"| sampler | NFE | {metric} at start | {metric} | iterations | train wall s |",
             "|---|---|---|---|---|---|",
             f"| data (second draw) | - | - | {_g(res['reference'].get(metric))} | - | - |"]
    if "teacher_law" in res:
        lines.append(f"| teacher's own law (second draw of the exact reference sampler) | "
                     f"{res['teacher_law']['nfe']} | - | {_g(res['teacher_law'].get(metric))} | - | - |")
    for sampler, entries in res["teacher"].items():
        for e in entries.values():
            lines.append(f"| teacher {sampler} | {e['nfe']} | - | {e[metric]:.4g} | - | - |")
    for label, r in runs.items():
        for key, s in r["final"].items():
            lines.append(f"| {label} @ {key} | {key[2:]} | {_pm(r['start'][key])} | {_pm(s)} | "
                         f"{r['seeds'][0]['curve'][-1]['iteration']} | {r['wall_s']['mean']:.0f} |")
    k4 = {m: runs.get(f"{m} K=4") for m in methods if f"{m} K=4" in runs}
    if "tdm" in k4 and len(k4) > 1:
        curves = {m: _mean_curve([s["curve"] for s in r["seeds"]], "K=4") for m, r in k4.items()}
        cost = res.get("iteration_s", {})
        if all(f"{m} K=4" in cost for m in curves):  # wall time as iterations x the interleaved cost per iteration
            for m, c in curves.items():
                for p in c:
                    p["wall_s"] = p["iteration"] * cost[f"{m} K=4"]
            how = ("seconds per iteration measured interleaved in one process: " +
                   ", ".join(f"{m} {1e3 * cost[f'{m} K=4']:.0f} ms" for m in curves))
        else:
            how = "the runs' own wall times, measured at different times under different loads"
        budget = min(c[-1]["wall_s"] for c in curves.values())
        lines += ["", f"At K=4, equal training wall time ({budget:.0f} s, the fastest method's full run; {how}) and "
                      "iterations to the same quality (mean curves over seeds):", "",
                  f"| method | {metric} at {budget:.0f} s | final {metric} | TDM iterations to reach it | ratio |",
                  "|---|---|---|---|---|"]
        for m, c in curves.items():
            final = c[-1]["K=4"]
            reach = _first_reaching(curves["tdm"], "K=4", final)
            ratio = "-" if m == "tdm" else ("not reached" if reach is None else "TDM's start is as good" if reach == 0
                                            else f"{c[-1]['iteration'] / reach:.1f}x fewer")
            lines.append(f"| {m} | {_at(c, 'wall_s', budget, 'K=4'):.4g} | {final:.4g} | "
                         f"{'-' if reach is None else f'{reach:.0f}'} | {ratio} |")
    return "\n".join(lines)


def figure(res: dict, path: Path) -> None:
    """Learning curves at K=4: each method's mean over seeds, the band its min and max, teacher DDIM lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = res["metric"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, r in res["runs"].items():
        if not label.endswith("K=4") or "," in label:
            continue
        its = [p["iteration"] for p in r["seeds"][0]["curve"]]
        vals = torch.tensor([[p["K=4"] for p in s["curve"]] for s in r["seeds"]])
        ax.plot(its, vals.mean(0), label=label)
        ax.fill_between(its, vals.min(0).values, vals.max(0).values, alpha=0.2)
    for e in res["teacher"].get("ddim", {}).values():
        ax.axhline(e[metric], ls=":", lw=0.8, color="grey")
        ax.annotate(f"teacher DDIM {e['nfe']} NFE", (0, e[metric]), fontsize=7, color="grey", va="bottom")
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel(metric)
    ax.set_title(f"{res['preset']}: students at K=4")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_costs(path: Path, work: Path) -> dict:
    """`--costs-of JSON`: a finished comparison's K=4 methods timed interleaved; its JSON and table rewritten."""
    res = json.loads(path.read_text())
    preset = res["preset"]
    jobs = {label: r["overrides"] for label, r in res["runs"].items() if label.endswith(" K=4") and "," not in label}
    res["iteration_s"] = iteration_costs(preset, jobs, work, toy_fit(preset, work))
    path.write_text(json.dumps(res, indent=2) + "\n")
    table = report(res, [label.split()[0] for label in jobs])
    path.with_suffix(".md").write_text(table + "\n")
    print(table)
    return res


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teachers", default="toy-gmm,toy-gmm-cond,digits")
    p.add_argument("--methods", default=",".join(method_names()))
    p.add_argument("--steps", default="1,2,4", help="student step counts K")
    p.add_argument("--seeds", type=int, default=3, help="seeds on the toys (digits: 1)")
    p.add_argument("--points", type=int, default=6, help="measurements along each run (its learning curve)")
    p.add_argument("--no-ablations", action="store_true")
    p.add_argument("--quick", action="store_true",
                   help="CI: toy-gmm, 1 seed, K=4, 80 iterations (consistency 600), a short fit")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--figures", default="docs")
    p.add_argument("--tag", default="", help="suffix of the output names (several processes, one teacher)")
    p.add_argument("--only-ablations", action="store_true", help="the TDM ablation rows alone")
    p.add_argument("--costs-of", metavar="JSON", help="measure the seconds per iteration of a finished comparison's "
                   "K=4 methods interleaved, add them to its JSON and rewrite its table, then exit")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # tiny networks: one thread is fastest and makes runs repeatable
    methods = args.methods.split(",")
    results = {}
    work = Path(tempfile.mkdtemp(prefix="tdm-compare-"))
    try:
        if args.costs_of:
            return add_costs(Path(args.costs_of), work)
        for preset in args.teachers.split(",") if not args.quick else ["toy-gmm"]:
            toy = resolve(preset).teacher.family == "toy"
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            name = f"compare-{preset}{'-quick' * args.quick}{args.tag and '-' + args.tag}"

            def save(res: dict) -> None:
                (out / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")

            if args.quick:
                # consistency first gets worse (its targets are its own inconsistent predictions), then better
                res = compare(preset, methods, [4], [0], 80, 2, False, (4,), work,
                              ["net.pretrain_steps=400", "train.eval_samples=1000"], {"consistency": 600})
            else:
                res = compare(preset, [] if args.only_ablations else methods, [int(k) for k in args.steps.split(",")],
                              list(range(args.seeds if toy else 1)), resolve(preset).train.iterations, args.points,
                              toy and not args.no_ablations, (4, 8, 16, 25, 50), work, save=save,
                              costs=not args.only_ablations)
            results[preset] = res
            table = report(res, methods)
            print(table, flush=True)
            save(res)
            (out / f"{name}.md").write_text(table + "\n")
            if not args.quick and not args.only_ablations:
                figure(res, Path(args.figures) / f"compare_{preset}{args.tag and '_' + args.tag}.png")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
