"""The library's TDM iteration against a demo-order reference on the same network, timed interleaved.

    python benchmarks/iteration.py [--network medium] [--batch 4] [--repeats 6] [--out benchmarks/results]

The network (benchmarks/networks.py; "medium": SD1.5's UNet architecture at 37.5M parameters, 32x32 latents)
has random weights in a local pipeline folder, run by the real `Trainer` in LoRA mode with CFG. Both
iterations use the trainer's networks, draws and optimiser steps; they differ only in order and cost:

- library: `Trainer._step` (TDM-METHOD §4 as tdm/methods/tdm.py runs it: a rollout only as deep as the drawn
  steps need, the fake update on the rollout's own prediction, the teacher's CFG passes in one call);
- demo: the authors' public order, written below: the full K-step rollout, the fake update recomputing the
  student step and calling the teacher once for nothing, the teacher's two CFG passes apart: 11 forwards
  and 2 backwards at K = 4.

Each repeat times one of each, in alternating order, so the shared machine's noise falls on both. The
floor is what the library's counted work costs at the measured unit prices: (E - 2) no-grad forwards and 2
forward+backward pairs at the batch, E its mean full-batch forward equivalents. Also printed: a phase
breakdown of the library iteration, the cost of switching LoRA roles (cached vs peft's model-level calls),
`tdm distill --dry-run`'s memory estimate and, on CUDA, the measured peak and host-device synchronisations
(on the CPU, benchmarks/memory.py measures the peak). Prints a table and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from networks import NETWORKS, write_pipeline  # noqa: E402

from tdm.config import PRESETS, resolve  # noqa: E402
from tdm.core.samplers import ddim_step  # noqa: E402
from tdm.methods.losses import fake_score_loss, generator_loss, importance_weight, min_snr_weight  # noqa: E402
from tdm.trainer import Trainer  # noqa: E402

PROMPTS = ["a photo of a cat sitting on a red chair", "An astronaut riding a horse on the moon, 4k",
           "a red cube on a table", "a watercolor painting of a lighthouse at dusk"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def demo_iteration(t: Trainer) -> None:
    """The public demo's order of the same mathematics (TDM-METHOD §4): 11 forwards and 2 backwards at K = 4."""
    acc, m, rng, tr = t.accelerator, t.method, t.state.rng, t.cfg.train
    B = tr.batch_size // acc.num_processes
    cond, uncond = (rng.local(c) for c in t.family.sample_cond(tr.batch_size, rng.host))
    x = rng.randn(t.family.sample_shape(B))
    K = m.Ks[0]
    grid = m.grids[K]
    k_F, k_G = rng.randint(1, K + 1, B), rng.randint(1, K + 1, B)
    at = lambda xs, k: torch.stack([xs[K - int(ki)][i] for i, ki in enumerate(k)])  # noqa: E731
    with acc.autocast():
        xs = [x]
        with torch.no_grad():                                       # rollout: K forwards of the whole batch
            for k in range(K, 1, -1):
                x0_hat, eps_hat = m.student(xs[-1], grid[K - k], cond)
                xs.append(ddim_step(m.schedule, x0_hat, eps_hat, grid[K - k + 1]))
            m.student(xs[-1], grid[K - 1], cond)
            x_k, t_k = at(xs, k_F), grid[K - k_F]                   # fake update: the student step again,
            x0_tgt, eps_tgt = m.student(x_k, t_k, cond)
            m.teacher(x_k, t_k, cond)                               # and a teacher call the loss never uses
        t_m, tau = m.sample_t_m_tau(t_k, grid[K - k_F + 1], rng)
        x_tau, xi = m.diffuse(x0_tgt, eps_tgt, t_m, tau, rng)
        x0_F, _ = m.fake(x_tau, tau, cond)
        w_IS = importance_weight(x_tau, x0_tgt, xi, m.schedule.alpha(tau), m.schedule.sigma(tau),
                                 m.cfg.importance_weight)
        weight = min_snr_weight(m.schedule.snr(tau), m.cfg.min_snr_gamma).to(w_IS) * w_IS
        t._update("fake", fake_score_loss(x0_F, x0_tgt, weight))
        x_k, t_k = at(xs, k_G), grid[K - k_G]                       # generator update
        x0_hat, eps_hat = m.student(x_k, t_k, cond)
        t_m, tau = m.sample_t_m_tau(t_k, grid[K - k_G + 1], rng)
        x_tau, _ = m.diffuse(x0_hat.detach(), eps_hat.detach(), t_m, tau, rng)
        with torch.no_grad():                                       # CFG as two separate teacher passes
            x0_c, _ = m.teacher(x_tau, tau, cond)
            x0_u, _ = m.teacher(x_tau, tau, uncond)
            x0_F, _ = m.fake(x_tau, tau, cond)
        L_G, _ = generator_loss(x0_hat, x0_u + m.guidance * (x0_c - x0_u), x0_F, m.cfg.generator_loss,
                                m.cfg.huber_c)
        t._update("student", L_G)


def unit_costs(t: Trainer) -> tuple:
    """One no-grad forward, and one forward with grad plus its backward, of the student at the batch."""
    acc, m, rng, tr = t.accelerator, t.method, t.state.rng, t.cfg.train
    B = tr.batch_size // acc.num_processes
    cond, _ = (rng.local(c) for c in t.family.sample_cond(tr.batch_size, rng.host))
    x, tk = rng.randn(t.family.sample_shape(B)), m.grids[m.Ks[0]][0]
    role = acc.unwrap_model(t.nets["student"])

    def forward():
        with acc.autocast(), torch.no_grad():
            m.student(x, tk, cond)

    def forward_backward():
        with acc.autocast():
            x0, _ = m.student(x, tk, cond)
        role.activate()
        x0.float().square().mean().backward()
        t.opts["student"].zero_grad(set_to_none=True)

    return forward, forward_backward


class PhaseClock:
    """Wall time per role call and per optimiser update of the library iteration (each synchronised: a separate
    run from the timed one)."""

    def __init__(self, t: Trainer):
        self.t, self.s = t, {}
        dev = t.accelerator.device
        for name, d in (("student", t.method.student), ("fake", t.method.fake), ("teacher", t.method.teacher)):
            d.forward = self._wrap(d.forward, name, dev, grad_aware=True)
        t._update = self._wrap(t._update, "update", dev)

    def _wrap(self, fn, name, dev, grad_aware=False):
        def call(*args, **kwargs):
            sync(dev)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(dev)
            key = f"{name} {'grad' if torch.is_grad_enabled() else 'no-grad'}" if grad_aware else f"{name} {args[0]}"
            self.s[key] = self.s.get(key, 0.0) + time.perf_counter() - t0
            return out
        return call


def switch_costs(t: Trainer, n: int = 20) -> dict:
    """ms per role switch: the cached `LoRARoles.select` against peft's model-level calls (walk every module)."""
    base, roles = t.family.base, t.family.roles
    order = ["student", "fake", None] * n

    def cached():
        for r in order:
            roles.select(r)

    def model_level():
        for r in order:
            if r is None:
                base.disable_adapters()
            else:
                base.enable_adapters()
                base.set_adapter(r)
            for name, p in base.named_parameters():
                if "lora_" in name:
                    p.requires_grad_(True)

    out = {k: 1e3 * timed(f, torch.device("cpu")) / len(order) for k, f in (("cached", cached),
                                                                             ("peft_model_level", model_level))}
    roles.current = False  # the model-level calls moved the base: re-select on next use
    return out


def syncs_per_iteration(t: Trainer, n: int = 2) -> float | None:
    """CUDA only: host-device synchronisations per iteration, counted by torch's sync debug mode (no log step)."""
    if t.accelerator.device.type != "cuda":
        return None
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(n):
                t._step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) / n


def estimate_GiB(cfg) -> float:
    """`tdm distill --dry-run`'s peak for this configuration (configs only, nothing loaded)."""
    from tdm.estimate import memory_estimate
    from tdm.families import family_class

    return memory_estimate(cfg, family_class(cfg.teacher.family))["peak_GiB"]


def measure(network: str, batch: int = 4, repeats: int = 6, precision: str = "no", extra: tuple[str, ...] = (),
            work: Path | None = None) -> dict:
    """Write the network's pipeline folder, build the trainer, time the iterations; returns the results."""
    preset, config, resolution = NETWORKS[network]
    work = Path(work or tempfile.mkdtemp(prefix="tdm_iteration_"))
    teacher = work / "teacher"
    if not (teacher / "model_index.json").exists():
        write_pipeline(teacher, PRESETS[preset]["teacher"]["family"], config,
                       dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    (work / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    cfg = resolve(preset, [f"teacher.path={teacher}", f"data.prompts={work / 'prompts.txt'}",
                           f"teacher.resolution={resolution}", f"train.batch_size={batch}",
                           f"train.mixed_precision={precision}", "train.progress=false", "train.preview_every=0",
                           "train.log_every=1000000", "train.checkpoint_every=1000000", *extra])
    run = work / f"run_{len(list(work.glob('run_*')))}"
    t = Trainer(cfg, run)
    dev = t.accelerator.device
    forward, forward_backward = unit_costs(t)
    lib_equiv = []

    def library():
        lib_equiv.append(t._step()["forwards_batch_equiv"])

    jobs = {"library": library, "demo": lambda: demo_iteration(t), "forward": forward,
            "forward+backward": forward_backward}
    for fn in jobs.values():  # warm-up: allocator, kernels, AdamW state
        timed(fn, dev)
    lib_equiv.clear()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = {k: [] for k in jobs}
    for r in range(repeats):
        for name in (list(jobs) if r % 2 == 0 else list(jobs)[::-1]):
            times[name].append(timed(jobs[name], dev))
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    med = {k: statistics.median(v) for k, v in times.items()}
    E = sum(lib_equiv) / len(lib_equiv)
    floor = (E - 2) * med["forward"] + 2 * med["forward+backward"]
    demo_floor = (11 - 2) * med["forward"] + 2 * med["forward+backward"]
    syncs = syncs_per_iteration(t)
    clock = PhaseClock(t)
    for _ in range(2):
        t._step()
    return {
        "network": network, "parameters_M": round(sum(p.numel() for p in t.family.base.parameters()) / 1e6, 2),
        "batch": batch, "precision": precision, "extra": list(extra), "device": str(dev),
        "host": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "repeats": repeats, "seconds": times, "median_s": med,
        "forwards_batch_equiv": E, "floor_s": floor, "demo_floor_s": demo_floor,
        "ratio_to_demo": med["library"] / med["demo"], "above_floor": med["library"] / floor - 1,
        "demo_above_floor": med["demo"] / demo_floor - 1, "phases_s": {k: v / 2 for k, v in sorted(clock.s.items())},
        "switch_ms": switch_costs(t) if t.family.roles is not None else None, "syncs_per_iteration": syncs,
        "peak_GiB": peak, "estimate_GiB": estimate_GiB(cfg), "teacher": str(teacher), "config": cfg.to_dict(),
    }


def table(results: list[dict]) -> str:
    """Markdown rows: one per measured setting, the library against the demo order on the same network."""
    lines = ["| network | batch | precision | switches | library s/it | demo s/it | vs demo | floor s | above floor "
             "| fwd equiv. | peak GiB | dry-run GiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        med, peak = r["median_s"], r["peak_GiB"]
        lines.append(f"| {r['network']} ({r['parameters_M']}M) | {r['batch']} | {r['precision']} | "
                     f"{' '.join(r['extra']) or '-'} | {med['library']:.3f} | {med['demo']:.3f} | "
                     f"{r['ratio_to_demo']:.3f}x | {r['floor_s']:.3f} | {100 * r['above_floor']:+.1f}% | "
                     f"{r['forwards_batch_equiv']:.2f} | {'-' if peak is None else f'{peak:.2f}'} | "
                     f"{r['estimate_GiB']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--network", default="medium", choices=sorted(NETWORKS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--precision", default="no", choices=["no", "bf16"])
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. lora.enabled=false")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    res = measure(args.network, args.batch, args.repeats, args.precision, tuple(args.overrides))
    med = res["median_s"]
    print(f"\n{args.network} ({res['parameters_M']}M parameters), batch {args.batch}, {args.precision}, "
          f"{res['device']}, {res['threads']} threads, median of {args.repeats} interleaved repeats\n")
    print(table([res]))
    print(f"\ndemo order above its own floor: {100 * res['demo_above_floor']:+.1f}%; unit costs: forward "
          f"{med['forward']:.4f} s, forward+backward {med['forward+backward']:.4f} s")
    print("library phases (s per iteration): " + ", ".join(f"{k} {v:.3f}" for k, v in res["phases_s"].items()))
    if res["switch_ms"]:
        print("LoRA role switch (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in res["switch_ms"].items()))
    if res["syncs_per_iteration"] is not None:
        print(f"host-device synchronisations per iteration: {res['syncs_per_iteration']:.1f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"iteration-{args.network}-{res['device'].split(':')[0]}.json"
    (out / name).write_text(json.dumps(res, indent=2))
    print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
