"""The TDM loop end to end on the exact Gaussian-mixture teacher (TDM-METHOD §4, §6)."""

import json

import pytest
import torch

from tdm.config import resolve
from tdm.eval.evaluate import evaluate
from tdm.trainer import Trainer

TINY = ["train.progress=false", "net.hidden=64", "net.depth=2", "net.pretrain_steps=50", "net.pretrain_batch=256",
        "train.batch_size=64"]


def _train(tmp, name, preset="toy-gmm", overrides=()):
    trainer = Trainer(resolve(preset, TINY + list(overrides)), tmp / name)
    return trainer, trainer.train()


def test_resume_continues_with_identical_losses(tmp_path, one_thread):
    """Stop at a checkpoint, build a fresh trainer on the same directory: the losses go on as if never stopped."""
    _, full = _train(tmp_path, "full", overrides=["train.iterations=12", "train.checkpoint_every=6"])
    _, first = _train(tmp_path, "split", overrides=["train.iterations=6", "train.checkpoint_every=6"])
    trainer, rest = _train(tmp_path, "split", overrides=["train.iterations=12", "train.checkpoint_every=6"])
    assert [m["step"] for m in rest] == list(range(7, 13))
    for a, b in zip(full[6:], rest):
        assert a["loss_fake"] == b["loss_fake"] and a["loss_student"] == b["loss_student"]
    assert [m["loss_student"] for m in full[:6]] == [m["loss_student"] for m in first]
    assert sorted(p.name for p in trainer.checkpoint_dir.iterdir()) == ["step_0000006", "step_0000012"]
    logged = [json.loads(line)["step"] for line in (tmp_path / "split" / "train_log.jsonl").read_text().splitlines()]
    assert logged == [6, 10, 12]  # log_every=10 plus the last step of each run; the resumed run appends


def test_forwards_per_iteration_below_demo(one_thread):
    """K=4 spends at most 8 network calls (demo: 11); K=1 exactly 5: rollout 1, fake 1, student 1, teacher 1, fake 1."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        _, h4 = _train(Path(d), "k4", overrides=["train.iterations=5"])
        _, h1 = _train(Path(d), "k1", overrides=["train.iterations=5", "student.steps=1"])
    assert all(m["forwards"] <= 8 for m in h4) and all(m["forwards_batch_equiv"] < 8 for m in h4)
    assert all(m["forwards"] == 5 for m in h1) and all(m["forwards_batch_equiv"] == 5 for m in h1)


def test_unify_trains_step_count_embeddings(tmp_path, one_thread):
    """TDM-unify (§6): K drawn from the set, and the zero-initialised K embeddings of student and fake move."""
    trainer, hist = _train(tmp_path, "u", overrides=["train.iterations=12", "student.unify=[1,2,4]"])
    assert {m["K"] for m in hist} <= {1, 2, 4} and len({m["K"] for m in hist}) > 1
    for net in (trainer.nets["student"], trainer.nets["fake"]):
        assert net.k_embed.weight.abs().sum() > 0


def test_shared_interval_trains_the_fake_score_s_step_embedding(tmp_path, one_thread):
    """tdm.interval=shared (§4 step 3) with TDM-unify: the fake score alone gets a step-k embedding beside the K one,
    both move; the student has none and evaluates."""
    trainer, hist = _train(tmp_path, "s", overrides=["train.iterations=6", "student.unify=[1,2,4]",
                                                     "tdm.interval=shared"])
    fake, student = trainer.nets["fake"], trainer.nets["student"]
    assert fake.step_embed.weight.abs().sum() > 0 and fake.k_embed.weight.abs().sum() > 0
    assert student.step_embed is None and student.k_embed.weight.abs().sum() > 0
    assert evaluate(tmp_path / "s", n=200, steps=())["student"]["K=4"]["trained"]


def test_student_beats_teacher_ddim_at_equal_nfe(tmp_path, one_thread):
    """Quality on a teacher whose law is known: a 4-step student lands at most half the energy
    distance of the exact teacher's own 4-step DDIM (measured at one thread: 0.0072 vs 0.0331)."""
    run = tmp_path / "q"
    cfg = resolve("toy-gmm", ["train.progress=false", "net.pretrain_steps=2000",
                              "train.iterations=400", "train.eval_samples=3000"])
    Trainer(cfg, run).train()
    m = evaluate(run, steps=(4,))
    student, ddim4 = m["student"]["K=4"]["energy_distance"], m["teacher"]["ddim"]["steps=4"]["energy_distance"]
    assert student <= 0.5 * ddim4, (student, ddim4)
    assert m["student"]["K=4"]["mode_coverage"] == 1.0
    # the trajectory is measured at the student's own grid points (§3)
    traj = m["student"]["K=4"]["trajectory"]
    assert [p["t"] for p in traj] == [899, 674, 449, 224]
    assert (run / "samples.png").stat().st_size > 10_000


def test_conditional_teacher_with_cfg(tmp_path, one_thread):
    """Class-conditional teacher, CFG 2: runs, and reports class accuracy, computed against the right labels (true
    samples sit on their own class). After 4 iterations the student's own accuracy says nothing (measured 0.07)."""
    trainer, hist = _train(tmp_path, "c", "toy-gmm-cond", ["train.iterations=4"])
    assert all(m["forwards"] <= 8 for m in hist)
    m = evaluate(tmp_path / "c", n=300, steps=(2,))
    assert "class_accuracy" in m["student"]["K=4"]
    assert m["reference"]["class_accuracy"] >= 0.99  # measured 1.0; shuffled labels would give about 1/3
    assert m["teacher"]["ddim"]["steps=2"]["nfe"] == 4  # both CFG passes counted
    # measured against the true law and against the guided teacher's own law (a second draw of it: the floor)
    assert m["teacher_law"]["nfe"] == 400 and m["teacher_law"]["class_accuracy"] == 1.0
    assert {"energy_distance_vs_teacher", "sliced_w1_vs_teacher"} <= set(m["student"]["K=4"]) & set(m["reference"])
    assert evaluate(tmp_path / "c", n=300, steps=())["teacher"]["ddim"] == {}  # students only (benchmarks/toy.py)


def test_ema_student_is_saved_and_resumed(tmp_path, one_thread):
    """With optim.ema the saved student is the EMA, which lags the raw weights, and it survives a resume."""
    from safetensors.torch import load_file

    ema = ["optim.ema=0.9", "train.checkpoint_every=4"]
    _, full = _train(tmp_path, "full", overrides=["train.iterations=8", *ema])
    _train(tmp_path, "split", overrides=["train.iterations=4", *ema])
    trainer, _ = _train(tmp_path, "split", overrides=["train.iterations=8", *ema])
    saved = load_file(str(tmp_path / "split" / "student.safetensors"))
    raw = trainer.accelerator.unwrap_model(trainer.nets["student"]).state_dict()
    assert any(not torch.equal(saved[k], raw[k]) for k in saved)  # the EMA, not the raw student
    full_saved = load_file(str(tmp_path / "full" / "student.safetensors"))
    assert all(torch.equal(saved[k], full_saved[k]) for k in saved)  # resumed EMA == uninterrupted EMA


def test_two_processes_with_torchrun(tmp_path):
    """Data-parallel training through accelerate: 2 CPU processes (gloo) finish, one log, one checkpoint."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    run = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")  # else accelerate stays single-process
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "tdm.cli", "distill",
           "--preset", "toy-gmm", "--output", str(run), "--no-eval", *TINY, "train.iterations=10"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("run directory") == 2
    assert [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()] == [10]
    assert (run / "checkpoints" / "step_0000010" / "random_states_1.pkl").exists()  # both ranks' RNG saved


def test_fixed_shape_rollout_computes_the_same_iteration(tmp_path, one_thread):
    """`train.compile`'s rollout runs every step on the whole batch (one graph shape); it must compute what the
    partial rollout computes, at more forwards."""
    _, partial = _train(tmp_path, "partial", overrides=["train.iterations=4"])
    trainer = Trainer(resolve("toy-gmm", TINY + ["train.iterations=4"]), tmp_path / "fixed")
    trainer.method.fixed_shapes = True
    fixed = trainer.train()
    for a, b in zip(partial, fixed):
        assert b["loss_fake"] == pytest.approx(a["loss_fake"], rel=1e-5)
        assert b["loss_student"] == pytest.approx(a["loss_student"], rel=1e-5)
    assert sum(m["forwards_batch_equiv"] for m in fixed) > sum(m["forwards_batch_equiv"] for m in partial)


def test_learning_rate_warms_up_then_follows_the_cosine(tmp_path, one_thread):
    """optim.warmup=2, optim.decay=cosine over 6 iterations: the logged next-step rate is lr (i+1)/2 during warm-up,
    then lr (1 + cos(pi (i - 2) / 4)) / 2, for both roles."""
    _, logged = _train(tmp_path, "run", overrides=["train.iterations=6", "train.log_every=1", "optim.warmup=2",
                                                   "optim.decay=cosine", "optim.lr_student=1e-4", "optim.lr_fake=1e-3"])
    logged = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    factor = [1.0, 1.0, 0.5 * (1 + 2 ** -0.5), 0.5, 0.5 * (1 - 2 ** -0.5), 0.0]  # after steps 1..6
    assert [m["step"] for m in logged] == [1, 2, 3, 4, 5, 6]
    assert [m["lr_student"] for m in logged] == pytest.approx([1e-4 * f for f in factor], abs=1e-12)
    assert [m["lr_fake"] for m in logged] == pytest.approx([1e-3 * f for f in factor], abs=1e-12)
