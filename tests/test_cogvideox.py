"""CogVideoX (v-prediction, zero-SNR, SNR-shifted VP; 5-D video latents) end to end on a tiny pipeline built
in code: schedule, shapes, broadcasting (its exports: tests/test_export_formats.py) (TDM-METHOD §1, §2)."""

import types

import pytest
import torch
from family_harness import overrides, teacher_folder
from tiny_pipelines import make_cogvideox

from tdm.config import resolve
from tdm.scheduler_config import vp_schedule


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return teacher_folder(tmp_path_factory, "cogvideox", make_cogvideox)


def _overrides(teacher, *more):
    return overrides(teacher, "teacher.frames=9", *more)


def test_per_sample_ops_broadcast_over_video_latents(one_thread):
    """Schedules, DDIM step, transition and losses act per sample on (B, F, C, H, W): batched == one by one."""
    from tdm.core.samplers import ddim_step
    from tdm.methods.losses import fake_score_loss, generator_loss, importance_weight

    sch = vp_schedule({"_class_name": "CogVideoXDDIMScheduler", "rescale_betas_zero_snr": True})
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

    from tdm.families.diffusers.cogvideox import rotary_embedding

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

    from tdm.families.diffusers.cogvideox import CogVideoXFamily

    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps(
        {"latent_channels": 16, "block_out_channels": [128, 256, 256, 512], "temporal_compression_ratio": 4}))
    fam = CogVideoXFamily.__new__(CogVideoXFamily)  # configs only: no weights needed
    fam.path = tmp_path
    fam.cfg = resolve("cogvideox-2b", [])
    fam.base = types.SimpleNamespace(config=types.SimpleNamespace(patch_size=2, sample_width=90, sample_height=60))
    assert fam.latent_shape() == (13, 16, 60, 90)
