"""What every diffusers family must do, on tiny teachers built in code: two TDM iterations in LoRA and
full mode (LoRA: one copy of the base), previews, gradient checkpointing, and an exact resume."""

import pytest
import torch
from family_harness import eval_models, overrides, teacher_folder, train
from PIL import Image
from tiny_pipelines import make_cogvideox, make_flux, make_pixart, make_sd3, make_sd15, make_sdxl, make_wan

from tdm import config
from tdm.estimate import static_bytes
from tdm.families import family_class
from tdm.families.base import Family
from tdm.meta_probe import kept_in_fp32

FAMILIES = {  # name: (preset, builder, extra overrides)
    "sd15": ("sd15", make_sd15, ()),
    "sdxl": ("sdxl", make_sdxl, ()),
    "pixart": ("pixart-512", make_pixart, ()),
    "sd3": ("sd3", make_sd3, ()),
    "cogvideox": ("cogvideox-2b", make_cogvideox, ("teacher.frames=9",)),
    "flux": ("flux-dev", make_flux, ()),
    "wan": ("wan-1.3b", make_wan, ("teacher.frames=9", "teacher.width=64")),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    preset, build, extra = FAMILIES[request.param]
    return preset, teacher_folder(tmp_path_factory, request.param, build), extra


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return eval_models(tmp_path_factory)


def test_eval_measures_the_run(family, models, tmp_path, one_thread):
    """`tdm eval` with a local CLIP (score and features): every entry measured, grid.png (a video: frame strips
    and video.gif of all 9 frames) and report.md."""
    import json

    from tdm.cli import main

    preset, teacher, extra = family
    run = tmp_path / "r"
    train(preset, run, overrides(teacher, *extra, "train.iterations=1"))
    assert main(["eval", str(run), "--n", "3", f"eval.clip={models['clip']}", f"eval.features={models['clip']}",
                 "eval.teacher_steps=[2]"]) == 0
    m = json.loads((run / "metrics.json").read_text())
    entries = [*m["student"].values(), *m["teacher"]["ddim"].values(), m["teacher_law"]]
    assert all({"clip_score", "fid_vs_teacher", "kid_vs_teacher"} <= set(e) for e in entries)
    assert all(e["clip_score"] is not None and e["fid_vs_teacher"] is not None for e in entries)
    assert Image.open(run / "grid.png").size[0] > 300 and "| student K=4 | 4 |" in (run / "report.md").read_text()
    if preset.startswith(("cogvideox", "wan")):
        assert Image.open(run / "video.gif").n_frames == 9


@pytest.mark.parametrize("lora", [True, False])
def test_two_iterations(family, tmp_path, one_thread, lora):
    preset, teacher, extra = family
    trainer, hist = train(preset, tmp_path / "r", overrides(teacher, *extra, "train.iterations=2",
                                                            "train.preview_every=2",
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
    losses = lambda hist: [(m["loss_fake"], m["loss_student"]) for m in hist]  # noqa: E731
    assert losses(full[2:]) == losses(rest)


def test_bf16_holds_frozen_networks_in_bf16_and_trains_in_fp32(family, tmp_path, one_thread):
    """Mixed precision as the best LoRA trainers do it: the frozen base (the teacher) and the VAE in bf16, the LoRA
    weights, their gradients and AdamW's moments in fp32; full mode trains fp32 copies beside a bf16 teacher."""
    preset, teacher, extra = family
    trainer, hist = train(preset, tmp_path / "lora", overrides(teacher, *extra, "train.iterations=1",
                                                               "train.preview_every=1"))
    assert trainer.cfg.train.mixed_precision == "bf16" and torch.isfinite(torch.tensor(hist[0]["loss_student"]))
    held = {n: p for n, p in trainer.family.base.named_parameters() if "lora_" not in n}
    # diffusers keeps Wan's norms and time embedding in fp32
    frozen = {n: p for n, p in held.items() if not kept_in_fp32(trainer.family.base, n, torch.bfloat16)}
    lora = {n: p for n, p in trainer.family.base.named_parameters() if "lora_" in n}
    assert frozen and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in frozen.values())
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    moments = [s[k] for opt in trainer.opts.values() for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq")]
    assert moments and all(m.dtype == torch.float32 for m in moments)
    assert all(p.dtype == torch.bfloat16 for p in trainer.family.vae.parameters())
    # the dry run's figures are these bytes: the frozen base as held, the adapters with their two AdamW moments
    static = static_bytes(trainer.cfg, family_class(trainer.cfg.teacher.family))
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    assert static["base network (bf16)"] == nbytes([*held.values(), *trainer.family.base.buffers()])
    assert static["LoRA student + fake: fp32 weights, AdamW"] == nbytes(lora.values()) + nbytes(moments)

    full, _ = train(preset, tmp_path / "full", overrides(teacher, *extra, "train.iterations=1", "lora.enabled=false"))
    assert all(p.dtype == torch.bfloat16 for n, p in full.family.base.named_parameters()
               if not kept_in_fp32(full.family.base, n, torch.bfloat16))
    for net in (full.nets["student"], full.nets["fake"]):
        assert all(p.dtype == torch.float32 and p.requires_grad for p in net.parameters())


@pytest.mark.parametrize("name", config.FAMILIES)
def test_every_family_fulfils_the_contract(name):
    """Every registered family subclasses `Family` and implements each required method itself or through a parent
    family (the base's raise NotImplementedError)."""
    cls = family_class(name)
    assert issubclass(cls, Family)
    required = [k for k, v in vars(Family).items() if callable(getattr(v, "__func__", v)) and not k.startswith("_")]
    assert required and all(getattr(cls, k) is not getattr(Family, k) for k in required), name
