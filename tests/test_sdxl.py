"""SDXL end to end on a tiny pipeline built in code: conditioning as the stock pipeline builds it (both CLIP
encoders, pooled, time ids, zeroed negatives) and the teacher's CFG in the stock pipeline (its exports:
tests/test_export_formats.py)."""

import pytest
import torch
from family_harness import overrides, teacher_folder
from tiny_pipelines import make_sdxl

from tdm.config import resolve

GRID = [899, 674, 449, 224]  # the demo's 4-step grid (TDM-METHOD §2)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return teacher_folder(tmp_path_factory, "sdxl", make_sdxl)


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
