"""What every diffusers family must do, on tiny teachers built in code: two TDM iterations in LoRA and
full mode (LoRA: one copy of the base), previews, gradient checkpointing, and an exact resume."""

import pytest
import torch
from family_harness import overrides, teacher_folder, train
from PIL import Image
from tiny_pipelines import make_cogvideox, make_pixart, make_sd3, make_sd15, make_sdxl

FAMILIES = {  # name: (preset, builder, extra overrides)
    "sd15": ("sd15", make_sd15, ()),
    "sdxl": ("sdxl", make_sdxl, ()),
    "pixart": ("pixart-512", make_pixart, ()),
    "sd3": ("sd3", make_sd3, ()),
    "cogvideox": ("cogvideox-2b", make_cogvideox, ("teacher.frames=9",)),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    preset, build, extra = FAMILIES[request.param]
    return preset, teacher_folder(tmp_path_factory, request.param, build), extra


@pytest.mark.parametrize("lora", [True, False])
def test_two_iterations(family, tmp_path, one_thread, lora):
    preset, teacher, extra = family
    trainer, hist = train(preset, tmp_path / "r", overrides(teacher, *extra, "train.iterations=2", "train.preview_every=2",
                                                            f"lora.enabled={str(lora).lower()}",
                                                            "train.gradient_checkpointing=true"))
    assert len(hist) == 2 and torch.isfinite(torch.tensor([[m["loss_fake"], m["loss_student"]] for m in hist])).all()
    assert trainer.family.base.is_gradient_checkpointing
    # 3 distinct prompts x K = 1, 2, 4, decoded (video: the first frame)
    assert Image.open(tmp_path / "r" / "previews" / "step_0000002.png").size == (3 * 64, 3 * 64)
    base = trainer.family.base
    nets = [trainer.method.teacher.net.base, trainer.method.student.net.base, trainer.method.fake.net.base]
    if lora:  # one copy of the base weights serves teacher, student and fake
        assert all(n is base for n in nets)
        assert len({p.data_ptr() for n in nets for p in n.parameters()}) == len(list(base.parameters()))
    else:
        assert len({id(n) for n in nets}) == 3


def test_resume_matches_uninterrupted(family, tmp_path, one_thread):
    preset, teacher, extra = family
    _, full = train(preset, tmp_path / "full", overrides(teacher, *extra, "train.iterations=4"))
    train(preset, tmp_path / "split", overrides(teacher, *extra, "train.iterations=2"))
    _, rest = train(preset, tmp_path / "split", overrides(teacher, *extra, "train.iterations=4"))
    assert [(m["loss_fake"], m["loss_student"]) for m in full[2:]] == [(m["loss_fake"], m["loss_student"]) for m in rest]
