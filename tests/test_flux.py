"""FLUX.1 on tiny pipelines built in code: the resolution-dependent shift of the schedule, the packed latents and
prompt embeddings, the guidance-embedded teacher (dev) against two-pass CFG (schnell), and the dry run of a
config-only folder of the real size (its exports: tests/test_export_formats.py; training and resume:
tests/test_families.py)."""

import json
import math

import pytest
import torch
from family_harness import overrides, teacher_folder
from tiny_pipelines import make_flux

from tdm.config import resolve
from tdm.families import build_family

DEV_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                 "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                 "max_image_seq_len": 4096}


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    return teacher_folder(tmp_path_factory, "flux_dev", make_flux)


@pytest.mark.parametrize("seq", [16, 1024, 4096])
def test_dynamic_shift_is_the_schedules(seq):
    """FlowSchedule.from_config warps uniform times exactly as FLUX's scheduler shifts its sigmas with the
    pipeline's `mu` for that many image tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from tdm.core.schedules import FlowSchedule

    schedule = FlowSchedule.from_config(DEV_SCHEDULER, image_seq_len=seq)
    sched = FlowMatchEulerDiscreteScheduler.from_config(DEV_SCHEDULER)
    u = torch.linspace(1.0, 0.05, 8, dtype=torch.float64)
    sched.set_timesteps(sigmas=u.tolist(), mu=calculate_shift(seq))
    torch.testing.assert_close(schedule.warp(1000 * u) / 1000, sched.sigmas[:-1].double(), rtol=0, atol=1e-6)
    assert math.isclose(FlowSchedule.from_config(DEV_SCHEDULER, 4096).shift, math.exp(1.15))


def test_packed_latents_and_prompts(dev, tmp_path, one_thread):
    fam = build_family(resolve("flux-dev", overrides(dev)), run_dir=tmp_path)
    e, p = fam.embeddings["prompt_embeds"], fam.embeddings["pooled"]
    assert e.shape == (len(fam.prompts) + 1, 512, 48) and p.shape == (len(fam.prompts) + 1, 32)
    assert fam.sample_shape(2) == (2, 16, 64)  # 64 px: 8x8x16 latents, 2x2 patches packed into 16 tokens of 64
    assert math.isclose(fam.schedule.shift, math.exp(0.5 - 240 * 0.65 / 3840))  # mu of 16 image tokens
    x = torch.randn(2, 16, 64)
    from diffusers import FluxPipeline

    from tdm.families.diffusers.flux import unpack

    torch.testing.assert_close(unpack(x), FluxPipeline._unpack_latents(x, 64, 64, 8), rtol=0, atol=0)


def test_guidance_embedding_is_one_teacher_call(dev, tmp_path, one_thread):
    """FLUX.1-dev's teacher guided at w is one call at B rows with the embedding w, not cond/uncond CFG; the student
    runs at the teacher's scale unless student.guidance_embedding sets it."""
    fam = build_family(resolve("flux-dev", overrides(dev)), run_dir=tmp_path)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(fam.sample_shape(2), generator=g), torch.tensor([700.0, 300.0])
    cond, uncond = fam.sample_cond(2, g)
    fam.teacher.reset_counters()
    x0, _ = fam.teacher.guided(x, t, cond, uncond, 3.5)
    assert fam.teacher.reset_counters() == (1, 2)
    torch.testing.assert_close(x0, fam.teacher(x, t, {**cond, "guidance": torch.full((2,), 3.5)})[0])
    assert (x0 - fam.teacher.guided(x, t, cond, uncond, 1.0)[0]).abs().max() > 1e-4  # the embedding matters
    torch.testing.assert_close(x0, fam.teacher(x, t, cond)[0])  # no embedding given: the student's, 3.5
    assert fam.inference_guidance == 3.5
    other = build_family(resolve("flux-dev", overrides(dev, "student.guidance_embedding=2.0")), run_dir=tmp_path)
    assert other.inference_guidance == 2.0


def test_schnell_keeps_two_pass_cfg(tmp_path_factory, tmp_path, one_thread):
    schnell = teacher_folder(tmp_path_factory, "flux_schnell", lambda p: make_flux(p, guidance_embeds=False))
    fam = build_family(resolve("flux-schnell", overrides(schnell, "teacher.guidance=2.0")), run_dir=tmp_path)
    assert fam.schedule.shift == 1.0 and fam.inference_guidance == 1.0
    g = torch.Generator().manual_seed(0)
    cond, uncond = fam.sample_cond(2, g)
    fam.teacher.reset_counters()
    fam.teacher.guided(torch.randn(fam.sample_shape(2), generator=g), torch.tensor([700.0, 300.0]), cond, uncond, 2.0)
    assert fam.teacher.reset_counters() == (1, 4)  # cond and uncond batched
    with pytest.raises(ValueError, match=r"student.guidance_embedding=3.0: .* no guidance embedding .*; remove it"):
        build_family(resolve("flux-schnell", overrides(schnell, "student.guidance_embedding=3.0")))


def test_dry_run_counts_the_real_transformer(tmp_path, capsys):
    """`--dry-run` on a config-only folder of FLUX.1-dev's public configs: the transformer's 11.9B parameters, one
    teacher call per guided sample."""
    from tdm.cli import main

    root = tmp_path / "flux1-dev"
    files = {
        "model_index.json": {"_class_name": "FluxPipeline",
                             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                             "transformer": ["diffusers", "FluxTransformer2DModel"],
                             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": [None, None],
                             "text_encoder_2": [None, None]},
        "scheduler/scheduler_config.json": DEV_SCHEDULER,
        "transformer/config.json": {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64,
                                    "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
                                    "num_attention_heads": 24, "joint_attention_dim": 4096,
                                    "pooled_projection_dim": 768, "guidance_embeds": True,
                                    "axes_dims_rope": [16, 56, 56]},
        "vae/config.json": {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512],
                            "latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159},
    }
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(content))
    assert main(["distill", "--preset", "flux-dev", "--teacher", str(root), "--dry-run"]) == 0
    out = capsys.readouterr().out
    params = float(out.split("base_params_M=")[1].split(",")[0])
    print(f"FLUX.1-dev transformer from its config: {params / 1e3:.3f}B parameters")
    assert 11_850 < params < 11_950
