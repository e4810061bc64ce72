"""`tdm distill | eval | sample | presets` as a user runs them."""

import json

import matplotlib.image
import numpy as np
import yaml

from tdm.cli import main

TINY = ["train.progress=false", "net.hidden=32", "net.depth=1", "net.pretrain_steps=20", "net.pretrain_batch=128",
        "train.batch_size=32", "train.iterations=3", "train.eval_samples=200"]


def _image(path):
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0  # a real picture
    return img


def test_distill_eval_sample(tmp_path, one_thread, capsys):
    run = tmp_path / "run"
    assert main(["distill", "--preset", "toy-gmm", "--output", str(run), *TINY]) == 0
    for name in ("config.yaml", "student.safetensors", "metrics.json", "train_log.jsonl", "samples.png"):
        assert (run / name).exists(), name
    _image(run / "samples.png")
    m = json.loads((run / "metrics.json").read_text())
    keys = set(m["student"]["K=4"]) - {"nfe", "trained", "trajectory"}
    for sampler in ("ddim", "dpmpp_2m"):
        assert [e["nfe"] for e in m["teacher"][sampler].values()] == [1, 2, 4, 8, 50]
        assert all(set(e) - {"nfe"} == keys for e in m["teacher"][sampler].values())  # same keys, comparable
    # every entry is measured against the true law and against the teacher's own law (its reference sampler)
    assert {"energy_distance", "energy_distance_vs_teacher", "sliced_w1", "sliced_w1_vs_teacher"} <= keys
    assert set(m["reference"]) == keys and set(m["teacher_law"]) - {"nfe"} == keys and m["teacher_law"]["nfe"] == 200

    assert main(["eval", str(run), "--n", "100"]) == 0
    printed = capsys.readouterr().out
    assert "teacher ddim steps=4" in printed and "teacher law (reference)" in printed
    assert main(["sample", str(run), "--steps", "2", "--n", "50", "--out", str(tmp_path / "s.npy")]) == 0
    assert np.load(tmp_path / "s.npy").shape == (50, 2)
    _image(tmp_path / "s.png")
    assert main(["sample", str(run), "--sampler", "dpmpp_2m", "--nfe", "3", "--n", "20"]) == 0
    assert np.load(run / "samples_teacher_dpmpp_2m_3.npy").shape == (20, 2)

    # the same command with another config refuses to mix two runs in one directory, naming the difference
    capsys.readouterr()
    assert main(["distill", "--preset", "toy-gmm", "--output", str(run), *TINY, "student.steps=2"]) == 2
    assert "another config (student.steps: 4 -> 2)" in capsys.readouterr().err


def test_presets_and_errors(capsys):
    assert main(["presets"]) == 0
    assert "toy-gmm-cond" in capsys.readouterr().out
    assert main(["distill", "--preset", "toy-gmm", "--dry-run", "student.steps=2"]) == 0
    assert "steps: 2" in capsys.readouterr().out
    assert main(["distill", "--preset", "nope", "--dry-run"]) == 2
    assert main(["distill", "--preset", "toy-gmm", "--dry-run", "student.stepz=2"]) == 2
    assert "unknown config field" in capsys.readouterr().err


def test_conditional_sample_with_labels(tmp_path, one_thread):
    run = tmp_path / "c"
    assert main(["distill", "--preset", "toy-gmm-cond", "--output", str(run), "--no-eval", *TINY]) == 0
    assert main(["sample", str(run), "--labels", "0,2", "--n", "10", "--out", str(tmp_path / "c.npy")]) == 0
    assert np.load(tmp_path / "c.npy").shape == (20, 4)


def test_distill_takes_a_config_file(tmp_path, capsys):
    """`--config FILE` (the preset may come from it); overrides on the command line win over it."""
    f = tmp_path / "run.yaml"
    f.write_text("preset: toy-gmm-cond\nstudent:\n  steps: 2\ntrain:\n  iterations: 7\n")
    assert main(["distill", "--config", str(f), "--dry-run", "train.iterations=9"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["preset"] == "toy-gmm-cond" and printed["student"]["steps"] == 2
    assert printed["train"]["iterations"] == 9
