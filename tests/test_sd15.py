"""A diffusers teacher end to end on a tiny SD1.5 built in code: LoRA and full students, resume."""

import pytest
import torch
from tiny_pipelines import PROMPTS, make_sd15

from tdm.config import resolve
from tdm.trainer import Trainer


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd15")
    (root / "prompts.txt").write_text("\n".join([*PROMPTS, "", PROMPTS[0], "a red cube on a table"]) + "\n")
    return make_sd15(root / "teacher"), root / "prompts.txt"


def _overrides(teacher, *more):
    path, prompts = teacher
    return ["train.progress=false", f"teacher.path={path}", f"data.prompts={prompts}", "teacher.resolution=64",
            "train.batch_size=2", "lora.rank=4", "lora.alpha=8", "train.checkpoint_every=2", *more]


def _train(run, overrides):
    trainer = Trainer(resolve("sd15", overrides), run)
    return trainer, trainer.train()


@pytest.mark.parametrize("lora", [True, False])
def test_two_iterations(teacher, tmp_path, one_thread, lora):
    trainer, hist = _train(tmp_path / "r", _overrides(teacher, "train.iterations=2", f"lora.enabled={str(lora).lower()}"))
    assert len(hist) == 2 and all(torch.isfinite(torch.tensor([m["loss_fake"], m["loss_student"]])).all() for m in hist)
    base = trainer.family.base
    nets = [trainer.method.teacher.net.base, trainer.method.student.net.base, trainer.method.fake.net.base]
    if lora:  # one copy of the base weights serves teacher, student and fake
        assert all(n is base for n in nets)
        ptrs = {p.data_ptr() for n in nets for p in n.parameters()}
        assert len(ptrs) == len(list(base.parameters()))
    else:
        assert len({id(n) for n in nets}) == 3


def test_resume_matches_uninterrupted(teacher, tmp_path, one_thread):
    _, full = _train(tmp_path / "full", _overrides(teacher, "train.iterations=4"))
    _train(tmp_path / "split", _overrides(teacher, "train.iterations=2"))
    _, rest = _train(tmp_path / "split", _overrides(teacher, "train.iterations=4"))
    assert [(m["loss_fake"], m["loss_student"]) for m in full[2:]] == [(m["loss_fake"], m["loss_student"]) for m in rest]
