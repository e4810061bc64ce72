"""`tdm distill --dry-run`'s memory estimate against the measured peak of a training iteration.

    python benchmarks/memory.py [--batch 4] [--precision no] [--out benchmarks/results]

The medium UNet (benchmarks/networks.py: SD1.5's architecture, 37.5M parameters, 32x32 latents) with CFG,
in LoRA mode and in full mode, fp32 by default (`train.mixed_precision=no`: the dtypes every trainer
version holds; bf16 is for a GPU once the trainer holds its base in bf16). Each mode is measured in a fresh
subprocess on the second iteration (the first creates the AdamW state, as every later one finds it):
on CPU the process's peak RSS during the iteration (the high-water mark reset just before it) less its
RSS before the trainer was built, with `MALLOC_MMAP_THRESHOLD_=65536` so that freed tensors go back to
the OS; on CUDA `torch.cuda.max_memory_allocated`. Prints a table and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = {"LoRA": ["lora.enabled=true"], "full": ["lora.enabled=false"]}
PROMPTS = ["a photo of a cat sitting on a red chair", "An astronaut riding a horse on the moon, 4k",
           "a red cube on a table", "a watercolor painting of a lighthouse at dusk"]
MiB = 1024**2


def overrides(teacher: Path, prompts: Path, batch: int, precision: str, mode: str) -> list[str]:
    return [f"teacher.path={teacher}", f"data.prompts={prompts}", "teacher.resolution=256", f"train.batch_size={batch}",
            f"train.mixed_precision={precision}", "train.preview_every=0", "train.progress=false",
            "train.iterations=2",
            "train.checkpoint_every=1000000", *MODES[mode]]


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _tensor_bytes() -> int:
    """Bytes of the storages of all live CPU tensors (the process's RSS holds more: libraries, heap)."""
    import gc

    import torch

    storages = {}
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor) and o.device.type == "cpu":
            storages[o.untyped_storage().data_ptr()] = o.untyped_storage().nbytes()
    return sum(storages.values())


def measure(args: list[str], run_dir: Path) -> dict:
    """In a fresh process: build the trainer, run one iteration, measure the second."""
    import gc

    import diffusers  # noqa: F401  (imported before the baseline: libraries are not what we measure)
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401
    from diffusers import UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    import tdm.families.diffusers.sd15  # noqa: F401
    from tdm.config import resolve
    from tdm.trainer import Trainer

    torch.set_num_threads(1)
    cuda = torch.cuda.is_available()
    gc.collect()
    before = torch.cuda.memory_allocated() if cuda else _status("VmRSS")
    before_tensors = 0 if cuda else _tensor_bytes()
    trainer = Trainer(resolve("sd15", args), run_dir)
    trainer._step()
    gc.collect()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        start = tensors = torch.cuda.memory_allocated()
    else:
        tensors, start = _tensor_bytes(), _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    trainer._step()
    high = torch.cuda.max_memory_allocated() if cuda else _status("VmHWM")
    return {"device": "cuda" if cuda else "cpu", "peak": high - before, "before_iteration": start - before,
            "tensors_before_iteration": tensors - (0 if cuda else before_tensors), "growth": high - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--precision", choices=["no", "bf16", "fp16"], default="no", help="train.mixed_precision")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--measure", nargs=2, metavar=("ARGS_JSON", "RUN_DIR"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.measure:
        print(json.dumps(measure(json.loads(a.measure[0]), Path(a.measure[1]))))
        return

    from networks import MEDIUM_UNET, write_pipeline

    from tdm.config import resolve
    from tdm.estimate import memory_estimate
    from tdm.families import family_class

    work = Path(tempfile.mkdtemp(prefix="tdm-mem-"))
    teacher = write_pipeline(work / "teacher", "sd15", MEDIUM_UNET)
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    rows = {}
    for mode in MODES:
        args = overrides(teacher, prompts, a.batch, a.precision, mode)
        est = memory_estimate(resolve("sd15", args), family_class("sd15"))
        out = subprocess.run([sys.executable, __file__, "--measure", json.dumps(args), str(work / mode)],
                             env=env, capture_output=True, text=True, check=True).stdout
        m = json.loads(out.strip().splitlines()[-1])
        static, peak = sum(est["static"].values()), est["peak"][False]
        rows[mode] = {"device": m["device"], "estimate_MiB": peak / MiB, "measured_MiB": m["peak"] / MiB,
                      "error_pct": 100 * (peak / m["peak"] - 1),
                      "static_estimate_MiB": static / MiB,
                      "tensors_before_iteration_MiB": m["tensors_before_iteration"] / MiB,
                      "before_iteration_MiB": m["before_iteration"] / MiB,
                      "transient_estimate_MiB": (peak - static) / MiB, "growth_MiB": m["growth"] / MiB,
                      "phases_estimate_MiB": {k: v / MiB for k, v in est["phases"][False].items()}}
    print(f"medium UNet (37.5M parameters), batch {a.batch}, CFG, mixed precision {a.precision}, iteration 2, "
          f"{rows['LoRA']['device']}; MiB")
    print(f"{'':6}{'peak':>24}{'':9}{'before the iteration':>36}{'during it':>24}")
    print(f"{'mode':6}{'estimate':>12}{'measured':>12}{'error':>9}{'static est.':>12}{'tensors':>12}{'RSS':>12}"
          f"{'estimate':>12}{'growth':>12}")
    for mode, r in rows.items():
        print(f"{mode:6}{r['estimate_MiB']:>12.1f}{r['measured_MiB']:>12.1f}{r['error_pct']:>8.1f}%"
              f"{r['static_estimate_MiB']:>12.1f}{r['tensors_before_iteration_MiB']:>12.1f}{r['before_iteration_MiB']:>12.1f}"
              f"{r['transient_estimate_MiB']:>12.1f}{r['growth_MiB']:>12.1f}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"memory_batch{a.batch}{'' if a.precision == 'no' else '_' + a.precision}.json"
    path.write_text(json.dumps({"batch": a.batch, "precision": a.precision, "network": "medium UNet", **rows}, indent=2)
                    + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
