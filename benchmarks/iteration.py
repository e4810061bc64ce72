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
breakdown of the library iteration, the cost of switching LoRA roles (cached vs peft's model-level calls)
and, on CUDA, the peak memory. Prints a table and writes JSON to --out.
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

from tdm.config import resolve  # noqa: E402
from tdm.denoiser import cfg_denoise  # noqa: E402
from tdm.losses import fake_score_loss, generator_loss, importance_weight, min_snr_weight  # noqa: E402
from tdm.samplers import ddim_step  # noqa: E402
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
    role = acc.unwrap_model(t.student_net)

    def forward():
        with acc.autocast(), torch.no_grad():
            m.student(x, tk, cond)

    def forward_backward():
        with acc.autocast():
            x0, _ = m.student(x, tk, cond)
        role.activate()
        x0.float().square().mean().backward()
        t.opt_G.zero_grad(set_to_none=True)

    return forward, forward_backward


class PhaseClock:
    """Wall time per role call and per optimiser update of the library iteration (synchronising each: a separate run)."""

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--network", default="medium", choices=sorted(NETWORKS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--precision", default="no", choices=["no", "bf16"])
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    family, network, resolution = NETWORKS[args.network]
    work = Path(tempfile.mkdtemp(prefix="tdm_iteration_"))
    teacher = write_pipeline(work / "teacher", family, network)
    (work / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    cfg = resolve(family, [f"teacher.path={teacher}", f"data.prompts={work / 'prompts.txt'}",
                           f"teacher.resolution={resolution}", f"train.batch_size={args.batch}",
                           f"train.mixed_precision={args.precision}", "train.progress=false", "train.preview_every=0"])
    t = Trainer(cfg, work / "run")
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
    for r in range(args.repeats):
        for name in (list(jobs) if r % 2 == 0 else list(jobs)[::-1]):
            times[name].append(timed(jobs[name], dev))
    med = {k: statistics.median(v) for k, v in times.items()}
    E = sum(lib_equiv) / len(lib_equiv)
    floor = (E - 2) * med["forward"] + 2 * med["forward+backward"]
    demo_floor = (11 - 2) * med["forward"] + 2 * med["forward+backward"]
    clock = PhaseClock(t)
    for _ in range(2):
        t._step()
    phases = {k: v / 2 for k, v in sorted(clock.s.items())}
    res = {
        "network": args.network, "parameters_M": round(sum(p.numel() for p in t.family.base.parameters()) / 1e6, 2),
        "batch": args.batch, "precision": args.precision, "device": str(dev),
        "host": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "repeats": args.repeats, "seconds": times, "median_s": med,
        "forwards_batch_equiv": E, "floor_s": floor, "demo_floor_s": demo_floor,
        "ratio_to_demo": med["library"] / med["demo"], "above_floor": med["library"] / floor - 1,
        "demo_above_floor": med["demo"] / demo_floor - 1, "phases_s": phases, "switch_ms": switch_costs(t),
        "peak_GiB": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
    }
    print(f"\n{args.network} ({res['parameters_M']}M parameters), batch {args.batch}, {args.precision}, {dev}, "
          f"{res['threads']} threads, median of {args.repeats} interleaved repeats\n")
    print("| iteration | s/iteration | forwards (batch equiv.) | floor s | above floor | vs demo |")
    print("|---|---|---|---|---|---|")
    print(f"| library | {med['library']:.3f} | {E:.2f} | {floor:.3f} | {100 * res['above_floor']:+.1f}% | "
          f"{res['ratio_to_demo']:.3f}x |")
    print(f"| demo order | {med['demo']:.3f} | 11.00 | {demo_floor:.3f} | {100 * res['demo_above_floor']:+.1f}% | 1 |")
    print(f"\nunit costs: forward {med['forward']:.4f} s, forward+backward {med['forward+backward']:.4f} s")
    print("library phases (s per iteration): " + ", ".join(f"{k} {v:.3f}" for k, v in phases.items()))
    print("LoRA role switch (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in res["switch_ms"].items()))
    if res["peak_GiB"] is not None:
        print(f"peak memory {res['peak_GiB']:.2f} GiB")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"iteration-{args.network}-{dev.type}.json"
    (out / name).write_text(json.dumps(res, indent=2))
    print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
