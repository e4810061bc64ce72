"""Data parallel through accelerate on 2 CPU processes (gloo): the same losses as one process at the same global
batch, in LoRA mode (two DDP wrappers over one shared base, each reducing only its own adapter) and in full mode."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from family_harness import overrides, teacher_folder
from tiny_pipelines import make_sd15

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return teacher_folder(tmp_path_factory, "sd15", make_sd15)


def _distill(run: Path, args: list[str], processes: int) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")  # without it accelerate stays single-process
    launch = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes)] if processes > 1 else []
    cmd = [sys.executable, *launch, "-m", "tdm.cli", "distill", "--preset", "sd15", "--output", str(run), "--no-eval",
           *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    own = [line for line in done.stderr.splitlines() if "tdm distill" in line]  # each rank's one-line error
    assert done.returncode == 0, "\n".join(own) + "\n" + done.stderr[-3000:]
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("lora", [True, False])
def test_two_processes_give_the_losses_of_one(teacher, tmp_path, lora):
    """Each process draws the global batch's numbers and keeps its rows (tdm.core.rng.RunRNG); DDP averages the
    gradients, the log averages the losses: one process at batch 4 and two at 2 + 2 must agree to float
    rounding, while the large learning rates make every step move the weights. Both step the LR schedule once per
    iteration (accelerate would step it once per process)."""
    args = overrides(teacher, "train.batch_size=4", "train.iterations=3", "train.log_every=1",
                     "train.mixed_precision=no", "train.preview_every=0", f"lora.enabled={str(lora).lower()}",
                     "optim.lr_student=1e-2" if lora else "optim.lr_student=1e-3", "optim.lr_fake=1e-2",
                     "optim.warmup=2", "optim.decay=cosine")
    one = _distill(tmp_path / "one", args, 1)
    two = _distill(tmp_path / "two", args, 2)
    assert [m["step"] for m in two] == [1, 2, 3]
    for key in ("loss_fake", "loss_student", "D", "w_IS", "lr_student", "lr_fake"):
        a, b = [m[key] for m in one], [m[key] for m in two]
        assert b == pytest.approx(a, rel=1e-4), key
    assert len({m["loss_student"] for m in one}) == 3  # the steps differ: the comparison can fail
