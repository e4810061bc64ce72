"""SD3 (rectified flow, TDM-METHOD §5) end to end on a tiny pipeline built in code: LoRA and full students,
resume, and export to a stock StableDiffusion3Pipeline with FlowMatchEulerDiscreteScheduler(sigmas=...)."""

import pytest
import torch
from tiny_pipelines import PROMPTS, make_sd3

from tdm.config import resolve
from tdm.trainer import Trainer


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    (root / "prompts.txt").write_text("\n".join([*PROMPTS, "", PROMPTS[0], "a red cube on a table"]) + "\n")
    return make_sd3(root / "teacher"), root / "prompts.txt"


def _overrides(teacher, *more):
    path, prompts = teacher
    return ["train.progress=false", f"teacher.path={path}", f"data.prompts={prompts}", "teacher.resolution=64",
            "train.batch_size=2", "lora.rank=4", "lora.alpha=8", "train.checkpoint_every=2", *more]


def _train(run, overrides):
    trainer = Trainer(resolve("sd3", overrides), run)
    return trainer, trainer.train()


def test_shifted_grid_and_exported_sigmas():
    """The preset's 'shifted' grid (s = 3) is a valid float grid on [0, 1000], and the exported
    FlowMatchEulerDiscreteScheduler, driven with its sigmas, steps through exactly that grid."""
    from tdm.export_scheduler import build_inference_scheduler, inference_scheduler
    from tdm.schedules import GridSpec, timestep_grid

    grid = timestep_grid(4, GridSpec("shifted", shift=3.0), T=1000, discrete=False)
    assert grid.dtype == torch.float64 and grid.tolist() == [999.0, 899.0, 749.0, 499.0, 0.0]
    spec = inference_scheduler({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}, grid, "flow")
    sched = build_inference_scheduler(spec)
    sched.set_timesteps(**spec["set_timesteps_kwargs"])
    assert torch.allclose(sched.sigmas.double(), grid / 1000, atol=1e-7)  # terminal 0 appended
    assert torch.allclose(sched.timesteps.double(), grid[:-1], atol=1e-4)


def test_prompt_embeddings_layout(teacher, tmp_path, one_thread):
    from tdm.families import build_family

    fam = build_family(resolve("sd3", _overrides(teacher)), run_dir=tmp_path)
    e, p = fam.embeddings["prompt_embeds"], fam.embeddings["pooled"]
    n = len(fam.prompts) + 1  # + the empty prompt
    assert e.shape == (n, 77 + 256, 96) and p.shape == (n, 32 + 40)
    assert (e[:, :77, 80:] == 0).all()  # CLIP features zero-padded to T5's width
    assert fam.sample_shape(2) == (2, 16, 8, 8) and fam.schedule.shift == 3.0 and fam.prediction_type == "flow"


@pytest.mark.parametrize("lora", [True, False])
def test_two_iterations(teacher, tmp_path, one_thread, lora):
    trainer, hist = _train(tmp_path / "r", _overrides(teacher, "train.iterations=2", f"lora.enabled={str(lora).lower()}",
                                                      "train.preview_every=2", "train.gradient_checkpointing=true"))
    assert trainer.family.base.is_gradient_checkpointing
    from PIL import Image

    preview = Image.open(tmp_path / "r" / "previews" / "step_0000002.png")
    assert preview.size == (3 * 64, 3 * 64)  # the 3 distinct prompts x K = 1, 2, 4 (16-channel VAE with shift_factor)
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


@pytest.mark.parametrize("fmt", ["diffusers", "full"])
def test_export_reproduces_student_in_stock_pipeline(teacher, tmp_path, one_thread, fmt):
    """Export, then a freshly built StableDiffusion3Pipeline (load_lora_weights, or the fused folder) set up
    from tdm_inference.json reproduces the library's K-step sampler to 1e-4 (fp32)."""
    from tdm.evaluate import load_run
    from tdm.export import export_run, load_pipeline
    from tdm.samplers import sample_student

    run = tmp_path / "r"
    _train(run, _overrides(teacher, "train.iterations=2", "optim.lr_student=1e-2"))
    ours = load_run(run)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(ours.family.sample_shape(2), generator=g)
    cond, _ = ours.family.sample_cond(2, g)
    x_ours = sample_student(ours.student, x_T, ours.grid(4), cond)
    x_teacher = sample_student(ours.family.teacher, x_T, ours.grid(4), cond)
    assert (x_ours - x_teacher).abs().max() > 1e-3  # the student has moved: the comparison can fail

    out = export_run(run, fmt)
    if fmt == "diffusers":
        assert (out / "pytorch_lora_weights.safetensors").exists()
        pipe, kwargs = load_pipeline(teacher[0], lora=out)
    else:
        pipe, kwargs = load_pipeline(out, inference=out / "tdm_inference.json")
    assert kwargs["guidance_scale"] == 1.0
    assert kwargs["sigmas"] == pytest.approx([0.999, 0.899, 0.749, 0.499], abs=1e-12)
    # guidance 1: no CFG, so no negative embeddings are needed
    x_pipe = pipe(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled"], latents=x_T.clone(),
                  output_type="latent", num_inference_steps=4, **kwargs).images
    err = (x_pipe - x_ours).abs().max().item()
    print(f"sd3 {fmt}: max |pipeline - sample_student| = {err:.2e}")
    assert err < 1e-4
