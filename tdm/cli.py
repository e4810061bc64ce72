"""Command line: `tdm distill | sample | eval | export | presets | teacher train`, and its one-line errors."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading
import traceback
import warnings
from pathlib import Path

from . import run
from .errors import Interrupted, RunError
from .files import atomic_write, write_json

os.environ.setdefault("HF_HUB_OFFLINE", "1")        # never reach for a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _distill(args) -> int:
    from .config import dump, resolve
    from .families import DIFFUSERS, check_inputs

    for flag, key in (("teacher", "teacher.path"), ("prompts", "data.prompts")):
        if getattr(args, flag) is not None and any(o.split("=", 1)[0].strip() == key for o in args.overrides):
            raise ValueError(f"--{flag} and {key}= both set {key}; keep one")
    extra = [f"teacher.path={args.teacher}"] * (args.teacher is not None) + [
        f"data.prompts={args.prompts}"] * (args.prompts is not None)
    cfg = resolve(args.preset, extra + args.overrides, config_file=args.config)
    check_inputs(cfg, dry=args.dry_run)
    run_dir = Path(args.output or Path("runs") / cfg.preset)
    if args.dry_run:
        from .estimate import parse_size

        gpu = parse_size(args.gpu_memory) if args.gpu_memory else None
        print(dump(cfg), end="")
        _print_estimate(cfg, gpu)
        return 0
    if args.gpu_memory:
        raise ValueError("--gpu-memory goes with --dry-run")
    evaluate_after = not args.no_eval and cfg.train.eval_samples > 0
    if _finished(cfg, run_dir, evaluate_after):
        return 0
    from .trainer import Trainer

    trainer = Trainer(cfg, run_dir)
    main = trainer.accelerator.is_main_process
    if main:
        run.acquire(run_dir)  # held through the evaluation too (re-entrant: the trainer holds it already)
    try:
        trainer.train()
        if main and evaluate_after:
            from .eval.evaluate import evaluate

            _print_metrics(evaluate(run_dir))
    finally:
        if main:
            run.release(run_dir)
    if cfg.teacher.family in DIFFUSERS:
        print(f"next: tdm export {run_dir} --format diffusers")
    print(f"run directory: {run_dir}")
    return 0


def _finished(cfg, run_dir: Path, evaluate_after: bool) -> bool:
    """A run already trained to `train.iterations` says so instead of training again; it is evaluated only if its
    evaluation never completed (metrics.json missing). Another config is refused as the trainer would refuse it."""
    done = run.student_step(run_dir) if run_dir.is_dir() else None
    if done is None or done != cfg.train.iterations:
        return False
    changes = run.config_changes(run_dir, cfg.to_dict())
    if changes:
        return False  # the trainer names the differences and refuses
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return True
    if evaluate_after and not (run_dir / "metrics.json").exists():
        from .eval.evaluate import evaluate

        print(f"{run_dir} is trained ({done} iterations); evaluating it (metrics.json is missing)")
        with run.lock(run_dir):
            _print_metrics(evaluate(run_dir))
        return True
    print(f"{run_dir} is a finished run ({done} iterations): nothing to do. `tdm eval {run_dir}` evaluates it again; "
          "a larger train.iterations trains it further")
    return True


def _print_estimate(cfg, gpu: int | None = None) -> None:
    """Forwards per iteration and, for diffusers teachers, memory by phase (configs only) and, given the
    GPU's size, whether it fits and which switches would make it fit."""
    from .estimate import USABLE, GiB, advise, memory_estimate
    from .families import DIFFUSERS, family_class
    from .methods.base import method_class

    f = method_class(cfg.method).forwards(cfg)
    print(f"# forwards per iteration ({cfg.method}): at most {f['network_calls']} network calls "
          f"({f['batch_equivalents']} batch equivalents with CFG)" + (f" vs the demo's {f['demo']}" if "demo" in f
                                                                       else ""))
    if cfg.teacher.family not in DIFFUSERS:
        return
    if not cfg.teacher.path:
        print("# memory: give --teacher PATH for an estimate")
        return
    if cfg.teacher.family == "digits-sd":  # a named, committed teacher folder
        from .families.digits.sd import teacher_dir

        cfg.teacher.path = str(teacher_dir(cfg.teacher.path))
    family = family_class(cfg.teacher.family)
    m = memory_estimate(cfg, family)
    model = "" if cfg.method == "tdm" else " (modelled on the TDM iteration's phases)"
    shown = ("network", "base_params_M", "copies_of_base", "lora_params")
    print(f"# memory{model}: " + ", ".join(f"{k}={m[k]}" for k in shown if k in m))
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
    keys = [k for k in m.get("reference") or m["teacher_law"] if k != "nfe"]  # diffusers runs: no true samples
    width = {k: max(18, len(k) + 2) for k in keys}
    print(f"{'':24}{'NFE':>5}" + "".join(f"{k:>{width[k]}}" for k in keys))
    rows = [("true samples (floor)", "-", m["reference"])] if "reference" in m else []
    if "teacher_law" in m:  # the teacher's own law (exact reference sampler), a second draw: the *_vs_teacher floor
        rows.append(("teacher law (reference)", m["teacher_law"]["nfe"], m["teacher_law"]))
    rows += [(f"student {k}", v["nfe"], v) for k, v in m["student"].items()]
    rows += [(f"teacher {s} {k}", v["nfe"], v) for s, d in m["teacher"].items() for k, v in d.items()]
    for name, nfe, v in rows:
        print(f"{name:24}{nfe!s:>5}" + "".join(f"{_cell(v.get(k)):>{width[k]}}" for k in keys))


def _cell(v) -> str:
    """A metric for the table: 4 decimals; '-' where it is undefined on these samples (null in metrics.json)."""
    return "-" if v is None else f"{v:.4f}"


def _sample(args) -> int:
    if args.teacher:
        wrong = [f"--{k}" for k in ("labels", "sampler", "nfe") if getattr(args, k) is not None]
        if args.run_dir or wrong:
            raise ValueError(f"{', '.join(wrong + ['RUN_DIR'] * bool(args.run_dir))}: these sample a run; --teacher "
                             "samples with a stock pipeline (--lora, --inference, --prompt, --prompt-file)")
        return _sample_pipeline(args)
    if not args.run_dir:
        raise ValueError("give a RUN_DIR, or --teacher PATH [--lora FOLDER] --prompt TEXT")
    wrong = [f"--{k.replace('_', '-')}" for k in ("lora", "inference", "prompt", "prompt_file", "height", "width")
             if getattr(args, k) is not None] + ["--batch"] * (args.batch != 4)
    if wrong:
        raise ValueError(f"{', '.join(wrong)}: only for --teacher PATH (a stock pipeline); a run samples its own "
                         "conditions at its own size")
    if args.nfe is not None and not args.sampler:
        raise ValueError("--nfe is the teacher's step count: it goes with --sampler ddim|dpmpp_2m")
    if args.steps is not None and args.sampler:
        raise ValueError("--steps is the student's step count; the teacher's (--sampler) is --nfe")
    if args.out and Path(args.out).suffix != ".npy":
        raise ValueError(f"--out {args.out}: give a .npy path (the picture is written beside it as .png)")
    import torch

    from .eval.evaluate import teacher_sample

    labels = _labels(args.labels)
    device, dtype = _device_dtype(args)
    r = run.load_run(args.run_dir, device, dtype)
    n = 1000 if args.n is None else args.n
    g = torch.Generator().manual_seed(args.seed)  # the same start noise and conditions on any device
    labels = labels.repeat_interleave(n) if labels is not None else None
    n = len(labels) if labels is not None else n
    x_T, cond, uncond = r.draw(n, g, labels)
    x_T = x_T.to(device)
    if args.sampler:
        nfe = 50 if args.nfe is None else args.nfe
        x, name = _sample_with(f"--nfe {nfe}", teacher_sample, r, args.sampler, nfe, x_T, cond, uncond), \
            f"teacher_{args.sampler}_{nfe}"
    else:
        K = max(r.Ks) if args.steps is None else args.steps
        x, name = _sample_with(f"--steps {K}", r.sample, K, x_T, cond), f"student_K{K}"
    out = Path(args.out or Path(args.run_dir) / f"samples_{name}.npy")
    x = x.float().cpu()
    atomic_write(out, lambda p: _write_npy(p, x.numpy()))
    r.family.save_samples(x.to(device), cond, out.with_suffix(".png"))
    print(f"wrote {n} samples to {out} and {out.with_suffix('.png')}")
    return 0


def _write_npy(path: Path, array) -> None:
    import numpy as np

    with open(path, "wb") as f:  # a file object: given a name, np.save would append '.npy' to it
        np.save(f, array)


def _labels(text: str | None):
    """`--labels 0,2` as a tensor (None without it)."""
    if text is None:
        return None
    import torch

    try:
        return torch.tensor([int(v) for v in text.split(",")])
    except ValueError:
        raise ValueError(f"--labels {text!r}: give comma-separated class numbers, e.g. 0,1,2") from None


def _sample_with(option: str, sample, *args):
    """A sampler whose grid does not fit the teacher's timesteps names the option that asked for it."""
    try:
        return sample(*args)
    except ValueError as err:
        raise ValueError(f"{option}: {err}") from None


def _export(args) -> int:
    from .export.pipeline import export_run

    out = export_run(args.run_dir, args.format, args.output)
    print(f"exported ({args.format}) to {out}; settings in {out / 'tdm_inference.json'}")
    return 0


def _sample_pipeline(args) -> int:
    """`tdm sample --teacher PATH --lora FOLDER --prompt TEXT | --prompt-file FILE`: the stock diffusers pipeline set up
    by tdm (the LoRA fused), `--n` images per prompt, each from its own seed (`--seed`, `--seed + 1`, ...)."""
    import torch

    from .export.pipeline import load_pipeline

    if bool(args.prompt) == bool(args.prompt_file):
        raise ValueError("--teacher samples --prompt TEXT or every line of --prompt-file FILE; give one of them")
    if args.prompt_file and not Path(args.prompt_file).is_file():
        raise FileNotFoundError(f"--prompt-file {args.prompt_file} is not a file; give a text file, one prompt per "
                                "line (or JSONL with a `prompt` field)")
    from PIL import Image

    from .families.diffusers.base import vae_factor
    from .families.diffusers.prompts import read_prompts

    prompts = read_prompts(args.prompt_file) if args.prompt_file else [args.prompt]
    n = 1 if args.n is None else args.n
    out = Path(args.out or "tdm_sample.png")
    kind = Image.registered_extensions().get(out.suffix.lower())
    if kind is None:
        raise ValueError(f"--out {out}: give an image file name, e.g. sample.png or sample.jpg")
    size = {k: v for k, v in (("height", args.height), ("width", args.width)) if v is not None}
    vae = Path(args.teacher) / "vae" / "config.json"
    factor = vae_factor(Path(args.teacher))[1] if size and vae.is_file() else 1
    for key, value in size.items():  # stock pipelines round other sizes down, silently
        if value % factor:
            raise ValueError(f"--{key} {value}: this pipeline's images come in multiples of {factor} pixels (its VAE "
                             f"factor); use e.g. {max(factor, value // factor * factor)}")
    device, dtype = _device_dtype(args)
    pipe, kwargs = load_pipeline(args.teacher, lora=args.lora, inference=args.inference, device=device, dtype=dtype,
                                 fuse=True, steps=args.steps)
    pipe.set_progress_bar_config(disable=True)
    jobs = [(p, args.seed + j) for p in prompts for j in range(n)]
    names = [out] if len(jobs) == 1 else [out.with_name(f"{out.stem}_{i:04d}{out.suffix}") for i in range(len(jobs))]
    for start in range(0, len(jobs), args.batch):
        batch = jobs[start:start + args.batch]
        generators = [torch.Generator(device).manual_seed(seed) for _, seed in batch]
        images = pipe([p for p, _ in batch], generator=generators, **size, **kwargs).images
        for image, path in zip(images, names[start:start + len(batch)]):
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda p, image=image: image.save(p, format=kind))
    print(f"wrote {names[0]}" + (f" ... {names[-1].name} ({len(names)} images)" if len(names) > 1 else ""))
    return 0


def _device_dtype(args):
    """`--device` (default: CUDA when present) and `--dtype` (default: bf16 on CUDA, fp32 on the CPU)."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no CUDA device; use --device cpu")
    dtype = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    if dtype == "fp16" and device == "cpu":
        raise ValueError("--dtype fp16 needs a GPU (CPU kernels for fp16 are missing or slow); use bf16 or fp32")
    return device, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def _eval(args) -> int:
    from .eval.evaluate import evaluate

    run.run_config(args.run_dir)  # a finished run, before its folder is locked
    with run.lock(Path(args.run_dir)):  # not while a run trains in it: its own evaluation writes the same files
        _print_metrics(evaluate(args.run_dir, n=args.n, seed=args.seed, overrides=args.overrides))
    print(f"wrote {Path(args.run_dir) / 'metrics.json'}")
    return 0


def _teacher_train(args) -> int:
    import torch

    if args.preset == "digits-sd":
        return _teacher_train_sd(args)
    from .eval.digits import teacher_check
    from .families.digits.data import load_digits_split
    from .families.digits.family import teacher_dir
    from .families.digits.teacher import RECIPE, train_teacher

    if args.preset != "digits":
        raise ValueError(f"`tdm teacher train` knows the presets 'digits' and 'digits-sd' only, got {args.preset!r}")
    torch.set_num_threads(1)  # a 1M-parameter UNet on 8x8 images: one thread is fastest and repeatable
    out = run.prepare(args.output) if args.output else teacher_dir("digits")
    log = train_teacher(load_digits_split(), out, steps=RECIPE["steps"] if args.steps is None else args.steps)
    log["check"] = teacher_check(out)
    write_json(out / "teacher.json", log)
    print(f"denoising loss {log['loss_first']:.4f} -> {log['loss_last']:.4f}; DDIM 25 steps, CFG 2: "
          f"FD {log['check']['fd']:.2f}, accuracy {log['check']['accuracy']:.3f}; teacher written to {out}")
    return 0


def _teacher_train_sd(args) -> int:
    """The digits-sd pipeline: VAE, frozen random text encoder, UNet on the latents, then a DDIM check."""
    import torch

    from .eval.digits import sd_teacher_check as teacher_check
    from .families.digits.data import load_digits_split
    from .families.digits.sd import teacher_dir
    from .families.digits.sd_teacher import train_sd_teacher

    torch.set_num_threads(1)  # small models: on a shared 2-core machine one thread is fastest and repeatable
    out = run.prepare(args.output) if args.output else teacher_dir("digits-sd")
    steps = {"vae_steps": args.steps, "steps": args.steps} if args.steps is not None else {}
    log = train_sd_teacher(load_digits_split(), out, **steps)
    log["check"] = check = teacher_check(out)
    write_json(out / "teacher.json", log)
    print(f"VAE L1 {log['vae']['recon_l1']:.4f}; UNet loss {log['unet']['loss_first']:.4f} -> "
          f"{log['unet']['loss_last']:.4f}; DDIM {check['steps']} steps, CFG {check['guidance']:g}: "
          f"FD {check['fd']:.2f}, accuracy {check['accuracy']:.3f}; pipeline written to {out}")
    return 0


def _presets(args) -> int:
    from .config import PRESETS, resolve

    if args.show:
        import yaml

        from .families import fields_read

        cfg = resolve(args.show)
        print(f"# {args.show}: the fields the {cfg.teacher.family} family and method={cfg.method} read; as a file, "
              "`tdm distill --config FILE` takes it")
        print(yaml.safe_dump(fields_read(cfg), sort_keys=False), end="")
        return 0
    for name, overrides in PRESETS.items():
        print(f"{name:16} {overrides}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (raised, then printed by `main` like every other error)."""

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


class UsageError(Exception):
    pass


def _count(text: str) -> int:
    """An integer >= 1: a count of 0 would mean nothing, never 'the default'."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value} (leave the option out for its default)")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a whole number, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tdm", description="Trajectory Distribution Matching distillation")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on an error, show the Python traceback too")
    p.add_argument("--debug", action="store_true", help="on an error, show the Python traceback too")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("distill", parents=[common], help="distil a teacher into a few-step student")
    d.add_argument("--preset", help="named preset (see `tdm presets`); or 'preset: NAME' in --config")
    d.add_argument("--config", metavar="FILE", help="YAML file of config sections (as `tdm presets --show NAME` "
                   "prints); key=value overrides win over it")
    d.add_argument("--teacher", help="local diffusers folder of the teacher (sets teacher.path)")
    d.add_argument("--prompts", help="prompt file: text, JSONL or a datasets folder (sets data.prompts)")
    d.add_argument("--output", help="run directory (default runs/PRESET); an existing run resumes")
    d.add_argument("--dry-run", action="store_true", help="print the resolved config, forwards and memory, and stop")
    d.add_argument("--gpu-memory", metavar="SIZE", help="with --dry-run: does it fit a GPU of SIZE (24GB, 80GiB)? "
                   "if not, which switches to turn on")
    d.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    d.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. student.steps=2")
    d.set_defaults(fn=_distill)

    s = sub.add_parser("sample", parents=[common], help="sample a trained student (or its teacher)")
    s.add_argument("run_dir", nargs="?", help="a run directory")
    s.add_argument("--teacher", help="diffusers teacher folder: sample with the stock pipeline (LoRA fused)")
    s.add_argument("--lora", help="with --teacher: exported LoRA folder or pytorch_lora_weights.safetensors")
    s.add_argument("--inference", help="with --teacher: tdm_inference.json (default: beside --lora)")
    s.add_argument("--prompt", help="with --teacher: the prompt")
    s.add_argument("--prompt-file", help="with --teacher: prompts, one per line (or JSONL), each sampled --n times")
    s.add_argument("--height", type=_count, help="with --teacher: image height (default: the pipeline's)")
    s.add_argument("--width", type=_count, help="with --teacher: image width (default: the pipeline's)")
    s.add_argument("--batch", type=_count, default=4, help="with --teacher: images per pipeline call")
    s.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when present)")
    s.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="frozen networks' dtype (default: bf16 on "
                   "CUDA, fp32 on the CPU)")
    s.add_argument("--steps", type=_count, help="student steps K (default: the trained K); with --teacher: the K of "
                   "an any-step (unify) export")
    s.add_argument("--n", type=_count, help="samples (per label with --labels; default 1000); with --teacher: "
                   "images per prompt (default 1)")
    s.add_argument("--labels", help="comma-separated class labels, e.g. 0,1,2")
    s.add_argument("--sampler", choices=["ddim", "dpmpp_2m"], help="sample the teacher with this sampler")
    s.add_argument("--nfe", type=_count, help="with --sampler: teacher sampler steps (default 50)")
    s.add_argument("--seed", type=_seed, default=0)
    s.add_argument("--out", help="output .npy path (a PNG is written beside it); with --teacher an image path")
    s.set_defaults(fn=_sample)

    x = sub.add_parser("export", parents=[common], help="export a diffusers-teacher run for stock pipelines")
    x.add_argument("run_dir")
    x.add_argument("--format", choices=["diffusers", "kohya", "full"], default="diffusers")
    x.add_argument("--output", help="output folder (default RUN_DIR/export_FORMAT)")
    x.set_defaults(fn=_export)

    e = sub.add_parser("eval", parents=[common], help="metrics of a run's student and its teacher")
    e.add_argument("run_dir")
    e.add_argument("--n", type=_count, help="samples per entry (default train.eval_samples)")
    e.add_argument("--seed", type=_seed, default=0)
    e.add_argument("overrides", nargs="*", metavar="key=value", help="eval.* settings, e.g. eval.clip=FOLDER "
                   "eval.features=FOLDER (diffusers runs: README, judging a diffusers run)")
    e.set_defaults(fn=_eval)

    t = sub.add_parser("teacher", parents=[common], help="train a teacher from data (the digits backend)")
    tt = t.add_subparsers(dest="teacher_command", required=True).add_parser("train", parents=[common],
                                                                            help="train a teacher")
    tt.add_argument("--preset", required=True, help="'digits': the class-conditional UNet on 8x8 digits; "
                    "'digits-sd': the text-to-image Stable Diffusion pipeline on 16x16 digits")
    tt.add_argument("--output", help="teacher folder (default: the committed one under tdm/assets/)")
    tt.add_argument("--steps", type=_count, help="training steps of each network (default: the committed recipe)")
    tt.set_defaults(fn=_teacher_train)

    pr = sub.add_parser("presets", parents=[common], help="list presets")
    pr.add_argument("--show", metavar="NAME", help="print a preset's resolved config: the fields its family reads")
    pr.set_defaults(fn=_presets)
    return p


# Failures a user can fix: one line and exit code 2 (RunError subclasses carry their own code).
def _expected() -> tuple[type, ...]:
    import yaml
    from safetensors import SafetensorError

    kinds = [RunError, UsageError, KeyError, ValueError, OSError, ImportError, yaml.YAMLError, SafetensorError]
    torch = sys.modules.get("torch")
    if torch is not None:
        kinds.append(torch.OutOfMemoryError)
    return tuple(kinds)


_OS_FIXES = {
    errno.ENOSPC: "the disk is full: free space, then run the same command again (a run resumes from its last "
                  "complete checkpoint)",
    errno.EDQUOT: "the disk quota is spent: free space, then run the same command again",
    errno.EACCES: "permission denied: check its permissions, or use another path",
    errno.EPERM: "not permitted: check its permissions, or use another path",
    errno.EROFS: "the file system is read-only: use another path",
    errno.ENOENT: "it does not exist: check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder: give a file",
    errno.EEXIST: "it exists already",
}


def describe(err: BaseException) -> str:
    """One line for an expected failure: what, and where possible which file and the fix."""
    if isinstance(err, KeyError):
        msg = err.args[0] if err.args else "a missing key"
    elif isinstance(err, UnicodeDecodeError):
        msg = f"a file is not UTF-8 text ({err.reason} at byte {err.start})"
    elif isinstance(err, OSError) and err.errno in _OS_FIXES and err.filename:
        msg = f"{err.filename}: {_OS_FIXES[err.errno]}"
    elif isinstance(err, OSError) and err.errno in _OS_FIXES:
        msg = f"{err.strerror or err}: {_OS_FIXES[err.errno]}"
    elif isinstance(err, ImportError) and not isinstance(err, ModuleNotFoundError):
        msg = str(err)
    elif isinstance(err, ModuleNotFoundError):
        msg = f"the package {err.name} is missing: pip install {err.name}"
    elif type(err).__name__ == "OutOfMemoryError":
        msg = (f"out of GPU memory ({str(err).splitlines()[0]}); `tdm distill --dry-run --gpu-memory SIZE` names "
               "the switches that fit (train.gradient_checkpointing, a smaller train.batch_size, ...)")
    else:
        msg = str(err)
    return " ".join(str(msg).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every expected failure ends in one line on stderr and a non-zero code: 2 for what a user
    can fix, 3 for a run stopped by non-finite values, 130 / 143 for SIGINT / SIGTERM; `--debug` adds the
    traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    command = next((a for a in argv if not a.startswith("-")), "")
    previous = {}
    if threading.current_thread() is threading.main_thread():  # SIGTERM as SIGINT: one line, not a silent death
        previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    formatwarning = warnings.formatwarning
    warnings.formatwarning = _own_warnings_in_one_line(formatwarning)
    try:
        parser = build_parser()
        args, rest = parser.parse_known_args(argv)
        command = args.command
        if args.command in ("distill", "eval"):  # key=value overrides may also follow options: `--dry-run lora.rank=8`
            args.overrides += [r for r in rest if "=" in r and not r.startswith("-")]
            rest = [r for r in rest if r not in args.overrides]
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return args.fn(args)
    except Interrupted as err:
        failure, line, code = err, str(err), err.exit_code
    except KeyboardInterrupt as err:  # SIGINT where `main` could not own the handler (not the main thread)
        failure, line, code = err, _STOPPED.format(name="SIGINT"), 130
    except _expected() as err:
        failure, line, code = err, f"error: {describe(err)}", getattr(err, "exit_code", 2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        warnings.formatwarning = formatwarning
    if debug:
        traceback.print_exception(type(failure), failure, failure.__traceback__)
    print(f"tdm {command}: {line}" if command else f"tdm: {line}", file=sys.stderr)
    return code


_STOPPED = "interrupted by {name}; every file is written whole or not at all: run the same command to go on"
_PACKAGE = str(Path(__file__).parent)


def _own_warnings_in_one_line(fallback):
    """A `warnings.formatwarning` that prints tdm's own warnings (notes on the user's inputs, e.g. dropped prompts)
    as one line; other packages' keep `fallback`'s form, with file and source line."""
    def format_warning(message, category, filename, lineno, line=None) -> str:
        if str(filename).startswith(_PACKAGE):
            return f"warning: {message}\n"
        return fallback(message, category, filename, lineno, line)

    return format_warning


def _raise_interrupted(signum, frame):
    """Outside the training loop (which stops at its next iteration boundary) a signal stops at once."""
    raise Interrupted(signum, _STOPPED.format(name=signal.Signals(signum).name))


if __name__ == "__main__":
    sys.exit(main())
