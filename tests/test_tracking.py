"""What a run reports: on the console its progress and results only (no third-party noise); to the tracker
(`train.report_to`) every logged number (losses, learning rates, gradient norms) and the preview images;
`train.validation_prompts` make the preview grid, encoded once with the training prompts, and leave training
untouched; wandb offline when it is installed."""

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from family_harness import overrides, teacher_folder, train
from PIL import Image
from tiny_pipelines import make_sdxl

from tdm.config import Config, dump
from tdm.run import config_changes

TINY = ["train.progress=false", "net.hidden=32", "net.depth=1", "net.pretrain_steps=20", "net.pretrain_batch=128",
        "train.batch_size=32", "train.iterations=3", "train.eval_samples=0", "train.log_every=1"]
LOGGED = ("loss_fake", "loss_student", "lr_student", "lr_fake", "grad_norm_student", "grad_norm_fake")


def _events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (run_dir / "logs" / "tdm").glob("events.out.tfevents.*")  # beside: hparams' own
    acc = EventAccumulator(str(events.parent), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def _log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def test_tensorboard_gets_losses_learning_rates_and_grad_norms(tmp_path, one_thread):
    train("toy-gmm", tmp_path / "r", TINY)
    log, events = _log(tmp_path / "r"), _events(tmp_path / "r")
    for key in LOGGED:
        assert [(e.step, e.value) for e in events.Scalars(key)] == [
            (m["step"], pytest.approx(m[key], rel=1e-6)) for m in log], key


def test_report_to_none_writes_no_tracker_files(tmp_path, one_thread):
    train("toy-gmm", tmp_path / "r", [*TINY, "train.report_to=none"])
    assert len(_log(tmp_path / "r")) == 3 and not (tmp_path / "r" / "logs").exists()


def test_a_run_from_before_these_fields_resumes(tmp_path):
    """A config.yaml written before `train.report_to` and `train.validation_prompts` existed is the same run."""
    old = yaml.safe_load(dump(Config()))
    del old["train"]["report_to"], old["train"]["validation_prompts"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert config_changes(tmp_path, Config().to_dict()) == []
    old["train"]["seed"] = 1  # the comparison still sees a field that matters
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert config_changes(tmp_path, Config().to_dict()) == ["train.seed: 1 -> 0"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """SDXL: conditions beyond the encoders' (its micro-conditioning `time_ids`) must cover the validation rows."""
    return teacher_folder(tmp_path_factory, "sdxl_tracking", make_sdxl)


VALIDATION = ["a blue bird on a tree", "a dragon over a castle"]


def test_validation_prompts_make_the_preview(teacher, tmp_path, one_thread):
    from tdm.core.samplers import sample_student

    common = ["train.mixed_precision=no", "train.iterations=1", "train.preview_every=1"]
    trainer, hist = train("sdxl", tmp_path / "v", overrides(teacher, *common,
                                                            f"train.validation_prompts={json.dumps(VALIDATION)}"))
    _, plain = train("sdxl", tmp_path / "p", overrides(teacher, *common))
    assert hist[0]["loss_student"] == plain[0]["loss_student"]  # training never draws them
    # encoded once with the training prompts, in one cache file: 3 prompts, the empty one, 2 validation prompts
    fam = trainer.family
    (cache,) = (tmp_path / "v").glob("prompt_embeddings_*.safetensors")
    from safetensors.torch import load_file

    assert load_file(str(cache))["prompt_embeds"].shape[0] == 3 + 1 + 2
    # the grid: K = 1, 2, 4 rows x one column per validation prompt, the student on their freshly encoded embeddings
    png = Image.open(tmp_path / "v" / "previews" / "step_0000001.png")
    assert png.size == (2 * 64, 3 * 64)

    def grid_of(K):
        return fam.schedule.grid(K, trainer.cfg.student.grid_spec())

    student = trainer.method.student
    x_T = torch.randn(fam.sample_shape(2), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        def picture(cond):
            rows = [fam.decode(sample_student(student, x_T, grid_of(K), cond)) for K in (1, 2, 4)]
            return torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)

        encoded = fam.encode_prompts(fam.path, VALIDATION)
        expected = picture({**{k: v[:2] for k, v in fam.embeddings.items()}, **encoded})  # + SDXL's time_ids
        training = picture(fam._cond(torch.arange(2)))
        image = fam.preview(student, grid_of, tmp_path / "again.png")
    assert (image - expected).abs().max() < 1e-5 and (training - expected).abs().max() > 1e-2
    assert (torch.tensor(np.array(png)).permute(2, 0, 1) == (image * 255).round().to(torch.uint8)).all()
    # the tracker got the same picture at its step
    (event,) = _events(tmp_path / "v").Images("preview")
    assert event.step == 1 and (event.width, event.height) == png.size


def _wandb_records(path) -> list:
    """The records of an offline `.wandb` file: a 7-byte header, then LevelDB-log blocks of 32 KiB whose chunks
    (7-byte header: crc, length, kind 1 full / 2 first / 3 middle / 4 last) join into protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2

    data, pos, buf, out = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:  # block padding
            pos += left
            continue
        buf, pos = (buf if kind in (3, 4) else b"") + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            out.append(record)
    return out


def test_wandb_offline_gets_the_same_numbers(tmp_path, monkeypatch, one_thread):
    """Runs only where wandb is installed (`pip install wandb`; CI refuses it instead: tests/test_bad_inputs.py)."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train("toy-gmm", tmp_path / "r", [*TINY, "train.report_to=wandb"])
    (path,) = (tmp_path / "r" / "wandb").glob("offline-run-*/*.wandb")  # in the run folder, not the working one
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in _wandb_records(path) if r.WhichOneof("record_type") == "history"]
    for key in LOGGED:
        assert [(h["_step"], h[key]) for h in history] == [(m["step"], pytest.approx(m[key])) for m in
                                                         _log(tmp_path / "r")], key


def test_a_run_prints_its_results_not_library_noise(teacher, tmp_path):
    """A tiny SDXL run (the most talkative loading: two text encoders through a pipeline) with every warning shown
    (-W default): stderr holds only tdm's one-line note on the prompt file. Before: 18 lines (progress bars of
    diffusers and transformers, transformers' torchvision note, peft's second-adapter warning, the note in two)."""
    run = tmp_path / "r"
    argv = [sys.executable, "-W", "default", "-m", "tdm.cli", "distill", "--preset", "sdxl", "--output", str(run),
            *overrides(teacher, "train.iterations=1", "train.preview_every=1")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [f"warning: {teacher[1]}: dropped 1 empty and 1 duplicate prompts, truncated 0 "
                                        "over 1000 characters; 3 remain"]
    assert done.stdout.splitlines() == [f"next: tdm export {run} --format diffusers", f"run directory: {run}"]
