"""A diffusers teacher end to end on a tiny SD1.5 built in code: LoRA and full students, the CLI, checkpointing
(its exports: tests/test_export_formats.py)."""

import pytest
import torch
from family_harness import overrides, teacher_folder, train
from tiny_pipelines import make_sd15

from tdm.config import resolve
from tdm.trainer import Trainer


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return teacher_folder(tmp_path_factory, "sd15", make_sd15)


def _train(run, args):
    return train("sd15", run, args)


def test_cli_distill_export_sample(teacher, tmp_path, one_thread, capsys):
    """The commands of README's "Distil your own model", on the tiny SD1.5."""
    from PIL import Image

    from tdm.cli import main
    from tdm.estimate import memory_estimate
    from tdm.families import family_class

    path, prompts = teacher
    common = ["--preset", "sd15", "--teacher", str(path), "--prompts", str(prompts)]
    small = ["teacher.resolution=64", "train.batch_size=2", "lora.rank=4", "train.progress=false"]
    assert main(["distill", *common, "--dry-run", *small]) == 0
    out = capsys.readouterr().out
    assert "at most 8 network calls" in out and "copies_of_base=1" in out

    run = tmp_path / "run"
    assert main(["distill", *common, "--output", str(run), *small, "train.iterations=1"]) == 0
    trainer = Trainer(resolve("sd15", [f"teacher.path={path}", f"data.prompts={prompts}", *small]), tmp_path / "x")
    est = memory_estimate(trainer.cfg, family_class("sd15"))
    assert est["lora_params"] == sum(p.numel() for p in trainer.nets["student"].trainable_parameters())

    assert main(["export", str(run)]) == 0
    png = tmp_path / "s.png"
    assert main(["sample", "--teacher", str(path), "--lora", str(run / "export_diffusers"), "--prompt",
                 "a cat", "--out", str(png)]) == 0
    img = Image.open(png)
    assert img.size == (64, 64)


def test_gradient_checkpointing_gives_the_same_lora(teacher, tmp_path, one_thread):
    """LoRA roles share one base, and checkpointing recomputes forwards during backward after other roles
    ran: the trainer re-selects the role first, so the trained adapters equal those without checkpointing."""
    runs = {}
    for gc in ("false", "true"):
        trainer, _ = _train(tmp_path / gc, overrides(teacher, "train.iterations=2",
                                                     f"train.gradient_checkpointing={gc}"))
        runs[gc] = {role: net.state_dict() for role, net in trainer.nets.items()}
    for role in ("student", "fake"):
        for k, v in runs["false"][role].items():
            assert torch.allclose(v, runs["true"][role][k], atol=1e-6), k


def test_full_mode_with_teacher_offload(teacher, tmp_path, one_thread):
    trainer, hist = _train(tmp_path / "r", overrides(teacher, "train.iterations=1", "lora.enabled=false",
                                                      "train.teacher_offload=true"))
    assert hasattr(trainer.family.base, "_hf_hook") and not hasattr(trainer.nets["student"].base, "_hf_hook")
    assert torch.isfinite(torch.tensor(hist[0]["loss_student"]))
