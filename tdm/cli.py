"""Command line: `tdm distill | sample | eval | presets`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")        # never reach for a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _distill(args) -> int:
    import yaml

    from .config import PRESETS, dump, resolve

    extra = [f"teacher.path={args.teacher}"] * bool(args.teacher) + [
        f"data.prompts={args.prompts}"] * bool(args.prompts)
    cfg = resolve(args.preset, extra + args.overrides)
    run_dir = Path(args.output or Path("runs") / args.preset)
    if args.dry_run:
        from .estimate import parse_size

        gpu = parse_size(args.gpu_memory) if args.gpu_memory else None
        print(dump(cfg), end="")
        _print_estimate(cfg, gpu)
        return 0
    if args.gpu_memory:
        raise ValueError("--gpu-memory goes with --dry-run")
    old = run_dir / "config.yaml"
    if old.exists():
        prev, now = yaml.safe_load(old.read_text()), cfg.to_dict()
        for d in (prev, now):  # these may change between a run and its resumption
            d["train"].pop("iterations"), d["train"].pop("progress")
        if prev != now:
            raise SystemExit(f"{run_dir} holds a run with a different config; pass another --output "
                             f"(or delete it) to start afresh. Presets: {', '.join(PRESETS)}")
    from .evaluate import evaluate
    from .trainer import Trainer

    trainer = Trainer(cfg, run_dir)
    trainer.train()
    if trainer.accelerator.is_main_process and not args.no_eval and cfg.train.eval_samples > 0:
        _print_metrics(evaluate(run_dir))
    from .families import _DIFFUSERS

    if cfg.teacher.family in _DIFFUSERS:
        print(f"next: tdm export {run_dir} --format diffusers")
    print(f"run directory: {run_dir}")
    return 0


def _print_estimate(cfg, gpu: int | None = None) -> None:
    """Forwards per iteration and, for diffusers teachers, memory by phase (configs only) and, given the
    GPU's size, whether it fits and which switches would make it fit."""
    from .estimate import USABLE, GiB, advise, forwards_per_iteration, memory_estimate
    from .families import _DIFFUSERS, family_class

    K = max(cfg.student.unify or [cfg.student.steps])
    f = forwards_per_iteration(K, cfg.teacher.guidance, cfg.tdm.fake_anchor > 0)
    print(f"# forwards per iteration: at most {f['network_calls']} network calls "
          f"({f['batch_equivalents']} batch equivalents with CFG) vs the demo's {f['demo']}")
    if cfg.teacher.family not in _DIFFUSERS:
        return
    if not cfg.teacher.path:
        print("# memory: give --teacher PATH for an estimate")
        return
    if cfg.teacher.family == "digits-sd":  # a named, committed teacher folder
        from .families.digits_sd import teacher_dir

        cfg.teacher.path = str(teacher_dir(cfg.teacher.path))
    family = family_class(cfg.teacher.family)
    m = memory_estimate(cfg, family)
    print("# memory: " + ", ".join(f"{k}={m[k]}" for k in ("network", "base_params_M", "copies_of_base", "lora_params")
                                   if k in m))
    unit, div = ("GiB", GiB) if max(m["peak"].values()) >= GiB else ("MiB", 1024**2)
    gc = m["gradient_checkpointing"]
    rows = [("prompt caching: text encoders", m["prompt caching"], m["prompt caching"])]
    rows += [(k, v, v) for k, v in m["static"].items()]
    rows += [(f"+ {k}", m["phases"][False][k], m["phases"][True][k]) for k in m["phases"][False]]
    rows += [("peak", m["peak"][False], m["peak"][True])]
    print(f"# memory ({unit}), batch {m['batch_size']}, {cfg.teacher.resolution} px; "
          f"gradient checkpointing:{'off':>10}{'on':>8}")
    for name, off, on in rows:
        mark = f"  <- train.gradient_checkpointing={str(gc).lower()}" if name == "peak" else ""
        print(f"#   {name:56}{off / div:>10.2f}{on / div:>8.2f}{mark}")
    print("#   (+: activations, the updated role's grads and the bf16 casts of its weights at each phase's peak)")
    if gpu is None:
        return
    peak, usable = m["peak"][gc], USABLE * gpu
    size = f"{gpu / div:g} {unit} GPU: peak {peak / div:.2f} {unit} {'<=' if peak <= usable else '>'} " \
           f"{usable / div:.2f} {unit} ({USABLE:.0%}; the CUDA context and fragmentation take the rest)"
    if peak <= usable:
        print(f"# fits a {size}")
        return
    print(f"# does not fit a {size}; turn on, in this order:")
    steps = advise(cfg, family, gpu)
    for switch, p in steps:
        print(f"#   {switch:56}-> {p / div:.2f} {unit}{'  fits' if p <= usable else ''}")
    if not steps or steps[-1][1] > usable:
        print("# even so it does not fit: a smaller resolution, or several GPUs (model sharding)")


def _print_metrics(m: dict) -> None:
    keys = [k for k in m["reference"]]
    print(f"{'':24}{'NFE':>5}" + "".join(f"{k:>18}" for k in keys))
    rows = [("true samples (floor)", "-", m["reference"])]
    rows += [(f"student {k}", v["nfe"], v) for k, v in m["student"].items()]
    rows += [(f"teacher {s} {k}", v["nfe"], v) for s, d in m["teacher"].items() for k, v in d.items()]
    for name, nfe, v in rows:
        print(f"{name:24}{nfe!s:>5}" + "".join(f"{v.get(k, float('nan')):>18.4f}" for k in keys))


def _sample(args) -> int:
    if args.teacher:
        return _sample_pipeline(args)
    if not args.run_dir:
        raise ValueError("give a RUN_DIR, or --teacher PATH [--lora FILE] --prompt TEXT")
    import numpy as np
    import torch

    from .evaluate import draw, load_run, student_sample, teacher_sample

    run = load_run(args.run_dir)
    g = torch.Generator().manual_seed(args.seed)
    labels = torch.tensor([int(v) for v in args.labels.split(",")]).repeat_interleave(args.n) if args.labels else None
    n = len(labels) if labels is not None else args.n
    x_T, cond, uncond = draw(run, n, g, labels)
    if args.sampler:
        x, name = teacher_sample(run, args.sampler, args.nfe, x_T, cond, uncond), f"teacher_{args.sampler}_{args.nfe}"
    else:
        K = args.steps or max(run.Ks)
        x, name = student_sample(run, K, x_T, cond), f"student_K{K}"
    out = Path(args.out or Path(args.run_dir) / f"samples_{name}.npy")
    np.save(out, x.float().numpy())
    run.family.save_samples(x, cond, out.with_suffix(".png"))
    print(f"wrote {n} samples to {out} and {out.with_suffix('.png')}")
    return 0


def _export(args) -> int:
    from .export import export_run

    out = export_run(args.run_dir, args.format, args.output)
    print(f"exported ({args.format}) to {out}; settings in {out / 'tdm_inference.json'}")
    return 0


def _sample_pipeline(args) -> int:
    """`tdm sample --teacher PATH --lora FILE --prompt ...`: the stock diffusers pipeline, set up by tdm."""
    import torch

    from .export import load_pipeline

    pipe, kwargs = load_pipeline(args.teacher, lora=args.lora, inference=args.inference)
    out = Path(args.out or "tdm_sample.png")
    image = pipe(args.prompt, generator=torch.Generator().manual_seed(args.seed), **kwargs).images[0]
    image.save(out)
    print(f"wrote {out}")
    return 0


def _eval(args) -> int:
    from .evaluate import evaluate

    _print_metrics(evaluate(args.run_dir, n=args.n, seed=args.seed))
    print(f"wrote {Path(args.run_dir) / 'metrics.json'}")
    return 0


def _teacher_train(args) -> int:
    import torch

    if args.preset == "digits-sd":
        return _teacher_train_sd(args)
    from .families.digits import teacher_check, teacher_dir
    from .images.digits import load_digits_split
    from .images.teacher import RECIPE, train_teacher

    if args.preset != "digits":
        raise ValueError(f"`tdm teacher train` knows the presets 'digits' and 'digits-sd' only, got {args.preset!r}")
    torch.set_num_threads(1)  # a 1M-parameter UNet on 8x8 images: one thread is fastest and repeatable
    out = Path(args.output) if args.output else teacher_dir("digits")
    log = train_teacher(load_digits_split(), out, steps=args.steps or RECIPE["steps"])
    log["check"] = teacher_check(out)
    (out / "teacher.json").write_text(json.dumps(log, indent=2))
    print(f"denoising loss {log['loss_first']:.4f} -> {log['loss_last']:.4f}; DDIM 25 steps, CFG 2: "
          f"FD {log['check']['fd']:.2f}, accuracy {log['check']['accuracy']:.3f}; teacher written to {out}")
    return 0


def _teacher_train_sd(args) -> int:
    """The digits-sd pipeline: VAE, frozen random text encoder, UNet on the latents, then a DDIM check."""
    import torch

    from .families.digits_sd import teacher_check, teacher_dir
    from .images.digits import load_digits_split
    from .images.sd_teacher import train_sd_teacher

    torch.set_num_threads(1)  # small models: on a shared 2-core machine one thread is fastest and repeatable
    out = Path(args.output) if args.output else teacher_dir("digits-sd")
    steps = {"vae_steps": args.steps, "steps": args.steps} if args.steps else {}
    log = train_sd_teacher(load_digits_split(), out, **steps)
    log["check"] = check = teacher_check(out)
    (out / "teacher.json").write_text(json.dumps(log, indent=2))
    print(f"VAE L1 {log['vae']['recon_l1']:.4f}; UNet loss {log['unet']['loss_first']:.4f} -> "
          f"{log['unet']['loss_last']:.4f}; DDIM {check['steps']} steps, CFG {check['guidance']:g}: "
          f"FD {check['fd']:.2f}, accuracy {check['accuracy']:.3f}; pipeline written to {out}")
    return 0


def _presets(args) -> int:
    from .config import PRESETS, dump, resolve

    if args.show:
        print(dump(resolve(args.show)), end="")
        return 0
    for name, overrides in PRESETS.items():
        print(f"{name:16} {overrides}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tdm", description="Trajectory Distribution Matching distillation")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("distill", help="distil a teacher into a few-step student")
    d.add_argument("--preset", required=True, help="named preset (see `tdm presets`)")
    d.add_argument("--teacher", help="local diffusers folder of the teacher (sets teacher.path)")
    d.add_argument("--prompts", help="prompt file: text, JSONL or a datasets folder (sets data.prompts)")
    d.add_argument("--output", help="run directory (default runs/PRESET); an existing run resumes")
    d.add_argument("--dry-run", action="store_true", help="print the resolved config, forwards and memory, and stop")
    d.add_argument("--gpu-memory", metavar="SIZE", help="with --dry-run: does it fit a GPU of SIZE (24GB, 80GiB)? "
                   "if not, which switches to turn on")
    d.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    d.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. student.steps=2")
    d.set_defaults(fn=_distill)

    s = sub.add_parser("sample", help="sample a trained student (or its teacher)")
    s.add_argument("run_dir", nargs="?", help="a run directory (toy and digits runs)")
    s.add_argument("--teacher", help="diffusers teacher folder: sample with the stock pipeline")
    s.add_argument("--lora", help="exported LoRA folder or pytorch_lora_weights.safetensors")
    s.add_argument("--inference", help="tdm_inference.json (default: beside --lora)")
    s.add_argument("--prompt", default="", help="prompt for --teacher sampling")
    s.add_argument("--steps", type=int, help="student steps K (default: the trained K)")
    s.add_argument("--n", type=int, default=1000, help="samples (per label with --labels)")
    s.add_argument("--labels", help="comma-separated class labels, e.g. 0,1,2")
    s.add_argument("--sampler", choices=["ddim", "dpmpp_2m"], help="sample the teacher with this sampler")
    s.add_argument("--nfe", type=int, default=50, help="teacher sampler steps")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", help="output .npy path (a PNG is written beside it)")
    s.set_defaults(fn=_sample)

    x = sub.add_parser("export", help="export a diffusers-teacher run for stock pipelines")
    x.add_argument("run_dir")
    x.add_argument("--format", choices=["diffusers", "kohya", "full"], default="diffusers")
    x.add_argument("--output", help="output folder (default RUN_DIR/export_FORMAT)")
    x.set_defaults(fn=_export)

    e = sub.add_parser("eval", help="metrics of a run's student and its teacher")
    e.add_argument("run_dir")
    e.add_argument("--n", type=int, help="samples per entry (default train.eval_samples)")
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(fn=_eval)

    t = sub.add_parser("teacher", help="train a teacher from data (the digits backend)")
    tt = t.add_subparsers(dest="teacher_command", required=True).add_parser("train", help="train a teacher")
    tt.add_argument("--preset", required=True, help="'digits': the class-conditional UNet on 8x8 digits; "
                    "'digits-sd': the text-to-image Stable Diffusion pipeline on 16x16 digits")
    tt.add_argument("--output", help="teacher folder (default: the committed one under tdm/assets/)")
    tt.add_argument("--steps", type=int, help="training steps of each network (default: the committed recipe)")
    tt.set_defaults(fn=_teacher_train)

    pr = sub.add_parser("presets", help="list presets")
    pr.add_argument("--show", metavar="NAME", help="print a preset's resolved config")
    pr.set_defaults(fn=_presets)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "distill":  # key=value overrides may also follow options: `--dry-run lora.rank=8`
        args.overrides += [r for r in rest if "=" in r and not r.startswith("-")]
        rest = [r for r in rest if r not in args.overrides]
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.fn(args)
    except (KeyError, ValueError, FileNotFoundError) as err:
        print(f"tdm {args.command}: error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
