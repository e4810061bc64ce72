"""CogVideoX (v-prediction, zero-SNR, SNR-shifted VP; 5-D video latents) end to end on a tiny pipeline built
in code: LoRA and full students, resume, and export to a stock CogVideoXPipeline (TDM-METHOD §1, §2)."""

import types

import pytest
import torch
from tiny_pipelines import PROMPTS, make_cogvideox

from tdm.config import resolve
from tdm.trainer import Trainer


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("cogvideox")
    (root / "prompts.txt").write_text("\n".join([*PROMPTS, "", PROMPTS[0], "a red cube on a table"]) + "\n")
    return make_cogvideox(root / "teacher"), root / "prompts.txt"


def _overrides(teacher, *more):
    path, prompts = teacher
    return ["train.progress=false", f"teacher.path={path}", f"data.prompts={prompts}", "teacher.resolution=64",
            "teacher.frames=9", "train.batch_size=2", "lora.rank=4", "lora.alpha=8", "train.checkpoint_every=2",
            *more]


def _train(run, overrides):
    trainer = Trainer(resolve("cogvideox-2b", overrides), run)
    return trainer, trainer.train()


def test_per_sample_ops_broadcast_over_video_latents(one_thread):
    """Schedules, DDIM step, transition and losses act per sample on (B, F, C, H, W): batched == one by one."""
    from tdm.losses import fake_score_loss, generator_loss, importance_weight
    from tdm.samplers import ddim_step
    from tdm.schedules import VPSchedule

    sch = VPSchedule.from_config({"_class_name": "CogVideoXDDIMScheduler", "rescale_betas_zero_snr": True})
    g = torch.Generator().manual_seed(0)
    # B = F = 3: a per-sample factor shaped (B, 1, 1, 1) would silently broadcast over frames instead
    x, e, xi, x2 = (torch.randn(3, 3, 4, 2, 2, generator=g) for _ in range(4))
    s, tau = torch.tensor([100.0, 400.0, 856.0]), torch.tensor([300.0, 665.0, 999.0])
    one = lambda f, *a: torch.cat([f(*(v[i : i + 1] for v in a)) for i in range(3)])  # noqa: E731
    assert torch.allclose(sch.transition(x, s, tau, xi), one(sch.transition, x, s, tau, xi))
    assert torch.allclose(ddim_step(sch, x, e, tau), one(lambda a, b, t: ddim_step(sch, a, b, t), x, e, tau))
    out = sch.to_x0_eps(x, x2, tau, "v_prediction")
    ref = [one(lambda a, b, t, j=j: sch.to_x0_eps(a, b, t, "v_prediction")[j], x, x2, tau) for j in (0, 1)]
    assert all(torch.allclose(o, r) for o, r in zip(out, ref))
    w = importance_weight(x, x2, xi, sch.alpha(tau), sch.sigma(tau))
    w_one = one(lambda a, b, c, t: importance_weight(a, b, c, sch.alpha(t), sch.sigma(t)), x, x2, xi, tau)
    assert torch.allclose(w, w_one)
    rows = lambda f: torch.stack([f(slice(i, i + 1)) for i in range(3)]).mean()  # noqa: E731
    for kind in ("huber_demo", "huber_paper", "mse"):
        loss, _ = generator_loss(x, x2, xi, kind)
        assert torch.allclose(loss, rows(lambda i: generator_loss(x[i], x2[i], xi[i], kind)[0]))
    assert torch.allclose(fake_score_loss(x, x2, w), rows(lambda i: fake_score_loss(x[i], x2[i], w[i])))


def test_rotary_embedding_matches_pipeline():
    """CogVideoX-5B's RoPE (unused by the 2B teacher) equals what CogVideoXPipeline builds for the same grid."""
    from diffusers import CogVideoXPipeline

    from tdm.families.cogvideox import rotary_embedding

    config = types.SimpleNamespace(patch_size=2, patch_size_t=None, sample_width=90, sample_height=60,
                                   attention_head_dim=64)
    fake_pipe = types.SimpleNamespace(vae_scale_factor_spatial=8, transformer=types.SimpleNamespace(config=config))
    ref = CogVideoXPipeline._prepare_rotary_positional_embeddings(fake_pipe, 480, 720, 13, "cpu")
    ours = rotary_embedding(config, 13, 60, 90, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))


def test_family_shapes_and_schedule(teacher, tmp_path, one_thread):
    from diffusers import CogVideoXDDIMScheduler

    from tdm.families import build_family

    fam = build_family(resolve("cogvideox-2b", _overrides(teacher)), run_dir=tmp_path)
    assert fam.embeddings["prompt_embeds"].shape == (len(fam.prompts) + 1, 226, 32)
    assert fam.sample_shape(2) == (2, 3, 16, 8, 8)  # (B, F_lat, C, H/8, W/8): frames before channels
    assert fam.prediction_type == "v_prediction"
    ref = CogVideoXDDIMScheduler.from_pretrained(teacher[0], subfolder="scheduler").alphas_cumprod.double()
    abar = fam.schedule.alpha(torch.arange(1000.0)) ** 2  # SNR shift 3 and zero-SNR as diffusers builds them
    assert torch.allclose(abar[:-1], ref[:-1], rtol=1e-5, atol=0)
    assert ref[-1] == 0 and abar[-1].item() == pytest.approx(2.0**-24, rel=1e-9)  # zero SNR, inference terminal

    # previews decode only the first chunk of latent frames: exactly the full video's first frame
    z = torch.randn(1, 5, 16, 8, 8, generator=torch.Generator().manual_seed(0))  # chunks [0:3], [3:5]
    first = fam.decode(z)
    vae = fam._vae
    with torch.no_grad():
        full = (vae.decode(z.permute(0, 2, 1, 3, 4) / vae.config.scaling_factor).sample[:, :, 0] / 2 + 0.5).clamp(0, 1)
    assert first.shape == (1, 3, 64, 64) and torch.equal(first, full)


def test_latent_shape_keeps_native_aspect(tmp_path):
    """teacher.resolution is the height; CogVideoX-2B's 480 px and 49 frames give its pipeline's (13, 16, 60, 90)."""
    import json

    from tdm.families.cogvideox import CogVideoXFamily

    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps(
        {"latent_channels": 16, "block_out_channels": [128, 256, 256, 512], "temporal_compression_ratio": 4}))
    fam = CogVideoXFamily.__new__(CogVideoXFamily)  # configs only: no weights needed
    fam.path = tmp_path
    fam.cfg = resolve("cogvideox-2b", [])
    fam.base = types.SimpleNamespace(config=types.SimpleNamespace(patch_size=2, sample_width=90, sample_height=60))
    assert fam.latent_shape() == (13, 16, 60, 90)


@pytest.mark.parametrize("lora", [True, False])
def test_two_iterations(teacher, tmp_path, one_thread, lora):
    trainer, hist = _train(tmp_path / "r", _overrides(teacher, "train.iterations=2", f"lora.enabled={str(lora).lower()}",
                                                      "train.preview_every=2", "train.gradient_checkpointing=true"))
    assert trainer.family.base.is_gradient_checkpointing
    from PIL import Image

    preview = Image.open(tmp_path / "r" / "previews" / "step_0000002.png")
    assert preview.size == (3 * 64, 3 * 64)  # the 3 distinct prompts x K = 1, 2, 4 (first frame of each video)
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
    """Export, then a freshly built CogVideoXPipeline (load_lora_weights, or the fused folder) set up from
    tdm_inference.json reproduces the library's K-step sampler on the video LoRA's grid to 1e-4 (fp32)."""
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
    assert kwargs == {"guidance_scale": 1.0, "timesteps": [999, 856, 665, 399]}
    x_pipe = pipe(prompt_embeds=cond["prompt_embeds"], latents=x_T.clone(), output_type="latent", num_frames=9,
                  height=64, width=64, num_inference_steps=4, **kwargs).frames
    err = (x_pipe - x_ours).abs().max().item()
    print(f"cogvideox {fmt}: max |pipeline - sample_student| = {err:.2e} (|x| max {x_ours.abs().max():.2f})")
    assert err < 1e-4
