"""The digits image backend: teacher training, the committed teacher, and distillation on it."""

import json

import matplotlib.image
import pytest
import torch

from tdm.cli import main
from tdm.config import resolve
from tdm.core.samplers import sample_student
from tdm.eval.digits import DigitsEvaluator, teacher_check
from tdm.families.digits.data import load_digits_split
from tdm.families.digits.family import DigitsFamily, teacher_dir
from tdm.families.digits.teacher import train_teacher
from tdm.run import load_run
from tdm.trainer import Trainer

FAST = ["train.progress=false", "train.checkpoint_every=1000"]


def test_teacher_training_reduces_denoising_loss(tmp_path, one_thread):
    log = train_teacher(load_digits_split(), tmp_path / "t", steps=60, batch_size=32, progress=False)
    assert log["loss_last"] < 0.7 * log["loss_first"], log
    assert (tmp_path / "t" / "unet" / "config.json").exists()


def test_committed_teacher_reproduces_its_recorded_metrics(one_thread):
    recorded = json.loads((teacher_dir("digits") / "teacher.json").read_text())["check"]
    now = teacher_check(teacher_dir("digits"), recorded["steps"], recorded["guidance"], recorded["seed"])
    assert now["accuracy"] == pytest.approx(recorded["accuracy"], abs=0.01)
    assert now["fd"] == pytest.approx(recorded["fd"], rel=0.05)
    assert now["accuracy"] >= 0.9  # the committed teacher draws the digit it is asked for


def test_short_distillation_improves_fd_over_the_start(tmp_path, one_thread):
    """Data-free TDM on the committed teacher (w = 1, to isolate the method from guidance): 150 small
    iterations lower the 4-step FD of the student from its start, the teacher itself (measured 153 -> 107)."""
    cfg = resolve("digits", FAST + ["train.iterations=150", "train.batch_size=32", "teacher.guidance=1"])
    fam = DigitsFamily(cfg)
    judge = DigitsEvaluator(fam)
    g = torch.Generator().manual_seed(0)
    labels, _ = judge.cond(450, g)
    x_T = torch.randn(fam.sample_shape(450), generator=g)

    trainer = Trainer(cfg, tmp_path / "d")
    start = judge.quality(sample_student(trainer.method.student, x_T, trainer.method.grids[4], labels), labels, g)
    trainer.train()
    end = judge.quality(load_run(tmp_path / "d").sample(4, x_T, labels), labels, g)
    assert end["fd"] < 0.8 * start["fd"], (start, end)


def test_digits_run_writes_real_figures(tmp_path, one_thread):
    run = tmp_path / "run"
    assert main(["distill", "--preset", "digits", "--output", str(run), *FAST, "train.iterations=2",
                 "train.batch_size=8", "train.eval_samples=60"]) == 0
    for name in ("grid.png", "quality.png"):
        img = matplotlib.image.imread(run / name)
        assert img.ndim == 3 and min(img.shape[:2]) > 100 and img.std() > 0.01
    report = (run / "report.md").read_text()
    assert "| student K=4 | 4 |" in report and "teacher ddim steps=50 | 100 |" in report
    m = json.loads((run / "metrics.json").read_text())
    assert set(m["student"]) == {"K=1", "K=2", "K=4"} and m["student"]["K=4"]["trained"]
    assert [e["nfe"] for e in m["teacher"]["ddim"].values()] == [2, 4, 8, 16, 50, 100]  # CFG: 2 per step
    assert main(["sample", str(run), "--labels", "3,7", "--n", "4", "--out", str(tmp_path / "s.npy")]) == 0
    assert matplotlib.image.imread(tmp_path / "s.png").std() > 0.01
