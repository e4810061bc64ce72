"""SDXL end to end on a tiny pipeline built in code: conditioning as the stock pipeline builds it (both CLIP
encoders, pooled, time ids, zeroed negatives), LoRA and full students, export to stock diffusers, resume."""

import pytest
import torch
from family_harness import lora_run, overrides, teacher_folder
from tiny_pipelines import make_sdxl

from tdm.config import resolve

GRID = [899, 674, 449, 224]  # the demo's 4-step grid (TDM-METHOD §2)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return teacher_folder(tmp_path_factory, "sdxl", make_sdxl)


@pytest.fixture(scope="module")
def trained(teacher, tmp_path_factory):
    """One LoRA run with a large student lr, shared by the export tests (export reads the run, never changes it)."""
    return lora_run("sdxl", teacher, tmp_path_factory.mktemp("sdxl_run"))


def _stock(folder, scheduler_spec=None):
    import diffusers

    from tdm.export.scheduler import build_inference_scheduler

    pipe = diffusers.DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    if scheduler_spec is not None:
        pipe.scheduler = build_inference_scheduler(scheduler_spec)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_conditioning_and_cfg_match_stock_pipeline(teacher, tmp_path, one_thread):
    """Cached embeddings = `encode_prompt`; the teacher at CFG w (empty prompt = zeros, force_zeros_for_empty_prompt)
    = the stock pipeline at guidance_scale w with no negative prompt, on the exact scheduler."""
    import json

    from tdm.core.samplers import sample_ddim
    from tdm.export.scheduler import inference_scheduler
    from tdm.families import build_family

    fam = build_family(resolve("sdxl", overrides(teacher)), run_dir=tmp_path)
    assert fam.embeddings["prompt_embeds"].shape[1:] == (77, 80) and fam.embeddings["pooled"].shape[1:] == (40,)
    assert fam.embeddings["time_ids"][0].tolist() == [64, 64, 0, 0, 64, 64]
    assert fam.embeddings["prompt_embeds"][-1].abs().max() == 0 and fam.embeddings["pooled"][-1].abs().max() == 0
    config = json.loads((teacher[0] / "scheduler" / "scheduler_config.json").read_text())
    pipe = _stock(teacher[0], inference_scheduler(config, [*GRID, 0], "vp"))
    with torch.no_grad():  # (batch 2 here, 4 in the cache: equal up to float rounding)
        e, _, p, _ = pipe.encode_prompt(fam.prompts[:2], device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(e, fam.embeddings["prompt_embeds"][:2], rtol=0, atol=1e-5)
    torch.testing.assert_close(p, fam.embeddings["pooled"][:2], rtol=0, atol=1e-5)

    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(fam.sample_shape(2), generator=g)
    cond, uncond = fam.sample_cond(2, g)
    ours = sample_ddim(fam.teacher, x_T, torch.tensor([*GRID, 0]), cond, uncond, w=5.0)
    theirs = pipe(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled"], latents=x_T.clone(),
                  guidance_scale=5.0, timesteps=GRID, output_type="latent").images
    err = (ours - theirs).abs().max()
    print(f"sdxl teacher CFG 5: max |pipeline - sample_ddim| = {err:.3g}")
    assert err < 1e-4


@pytest.mark.parametrize("fmt", ["diffusers", "full"])
def test_export_reproduces_student_in_stock_pipeline(teacher, trained, tmp_path, one_thread, fmt):
    """Export, then a freshly built StableDiffusionXLPipeline (load_lora_weights, or the fused folder) configured
    from tdm_inference.json reproduces the library's own 4-step sampler to 1e-4 (fp32)."""
    from tdm.core.samplers import sample_student
    from tdm.export.pipeline import export_run, load_pipeline
    from tdm.run import load_run

    ours = load_run(trained)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(ours.family.sample_shape(2), generator=g)
    cond, _ = ours.family.sample_cond(2, g)
    x_ours = sample_student(ours.student, x_T, ours.grid(4), cond)
    x_teacher = sample_student(ours.family.teacher, x_T, ours.grid(4), cond)
    gap = (x_ours - x_teacher).abs().max()
    print(f"sdxl: max |student - teacher| = {gap:.3g}, max |student| = {x_ours.abs().max():.3g}")
    assert gap > 1e-3  # the student has moved: the comparison can fail

    out = export_run(trained, fmt, tmp_path / fmt)
    if fmt == "diffusers":
        assert (out / "pytorch_lora_weights.safetensors").exists()
        pipe, kwargs = load_pipeline(teacher[0], lora=out)
    else:
        pipe, kwargs = load_pipeline(out, inference=out / "tdm_inference.json")
    assert kwargs == {"guidance_scale": 1.0, "timesteps": GRID}
    pipe.set_progress_bar_config(disable=True)
    x_pipe = pipe(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled"], latents=x_T.clone(),
                  output_type="latent", num_inference_steps=4, **kwargs).images
    err = (x_pipe - x_ours).abs().max()
    print(f"sdxl {fmt}: max |pipeline - sample_student| = {err:.3g}")
    assert err < 1e-4
