"""PixArt-alpha end to end on a tiny pipeline built in code: T5 conditioning with attention masks as the stock
pipeline builds it, learned sigma, micro-conditions of the 1024 model, LoRA and full students, resume, and
export to a stock PixArtAlphaPipeline (fused folder, or peft's adapter folder: diffusers 0.42 has no LoRA
loader for PixArt)."""

import json

import pytest
import torch
from family_harness import lora_run, overrides, teacher_folder
from tiny_pipelines import make_pixart

from tdm.config import resolve

GRID = [899, 674, 449, 224]  # the demo's 4-step grid (TDM-METHOD §2)
TINY = {"use_resolution_binning": False, "height": 64, "width": 64}  # no aspect-ratio bin at 64 px


def _err(a, b, what):
    """Max |a - b| relative to max(1, max |b|): PixArt's linear betas leave alpha_899 ~ 0.01, so the random
    tiny teacher's x0 reaches a few hundred and float32 (diffusers' tables) gives ~1e-6 relative, not absolute."""
    err, scale = (a - b).abs().max().item(), max(1.0, b.abs().max().item())
    print(f"pixart {what}: max diff = {err:.3g} (max |ours| = {scale:.3g}, relative {err / scale:.2g})")
    return err / scale


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return teacher_folder(tmp_path_factory, "pixart", make_pixart)


@pytest.fixture(scope="module")
def teacher_1024(teacher, tmp_path_factory):
    """The same pipeline with a transformer of sample_size 128, which (as PixArt-XL-2-1024-MS) takes the
    resolution / aspect-ratio micro-conditions; it runs at 64 px too (its sincos position grid is rebuilt)."""
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel

    pipe = PixArtAlphaPipeline.from_pretrained(teacher[0], local_files_only=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # width 3 heads x 8: the size embeddings take a third of it each (1152 = 3 x 384 in the real model)
        config = {**pipe.transformer.config, "sample_size": 128, "num_attention_heads": 3, "cross_attention_dim": 24}
        pipe.transformer = PixArtTransformer2DModel.from_config(config)
    assert pipe.transformer.use_additional_conditions
    path = tmp_path_factory.mktemp("pixart_1024") / "teacher"
    pipe.save_pretrained(path)
    return path, teacher[1]


@pytest.fixture(scope="module")
def trained(teacher, tmp_path_factory):
    """One LoRA run with a large student lr, shared by the export tests (export reads the run, never changes it)."""
    return lora_run("pixart-512", teacher, tmp_path_factory.mktemp("pixart_run"))


def _stock(folder, scheduler_spec):
    import diffusers

    from tdm.export.scheduler import build_inference_scheduler

    pipe = diffusers.DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.scheduler = build_inference_scheduler(scheduler_spec)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("which", ["512", "1024"])
def test_conditioning_and_cfg_match_stock_pipeline(teacher, teacher_1024, tmp_path, one_thread, which):
    """Cached embeddings and masks = `encode_prompt`; the teacher at CFG w (empty prompt = the pipeline's default
    negative "") = the stock pipeline at guidance_scale w, on the exact scheduler, with the 1024 model's
    micro-conditions and the learned-sigma channels dropped on both sides."""
    from tdm.core.samplers import sample_ddim
    from tdm.export.scheduler import inference_scheduler
    from tdm.families import build_family

    path = (teacher if which == "512" else teacher_1024)[0]
    fam = build_family(resolve("pixart-512", overrides((path, teacher[1]))), run_dir=tmp_path)
    emb = fam.embeddings
    assert emb["prompt_embeds"].shape[1:] == (120, 32) and emb["prompt_attention_mask"].shape[1:] == (120,)
    assert emb["prompt_attention_mask"][-1].sum() == 1  # "": </s> alone
    assert ("resolution" in emb) == (which == "1024")
    config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    pipe = _stock(path, inference_scheduler(config, [*GRID, 0], "vp"))
    with torch.no_grad():  # (batch 2 here, 4 in the cache: equal up to float rounding)
        e, m, _, _ = pipe.encode_prompt(fam.prompts[:2], do_classifier_free_guidance=False, device="cpu",
                                        clean_caption=True)  # as pipe(prompt) does by default
    torch.testing.assert_close(e, emb["prompt_embeds"][:2], rtol=0, atol=1e-5)
    assert torch.equal(m, emb["prompt_attention_mask"][:2])

    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(fam.sample_shape(2), generator=g)
    cond, uncond = fam.sample_cond(2, g)
    ours = sample_ddim(fam.teacher, x_T, torch.tensor([*GRID, 0]), cond, uncond, w=4.5)
    theirs = pipe(prompt_embeds=cond["prompt_embeds"], prompt_attention_mask=cond["prompt_attention_mask"],
                  latents=x_T.clone(), guidance_scale=4.5, timesteps=GRID, output_type="latent", **TINY).images
    assert ours.shape == theirs.shape == (2, 4, 8, 8) and _err(theirs, ours, f"{which} teacher CFG 4.5") < 1e-5


def _student_vs_teacher(run_dir):
    from tdm.core.samplers import sample_student
    from tdm.run import load_run

    ours = load_run(run_dir)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(ours.family.sample_shape(2), generator=g)
    cond, _ = ours.family.sample_cond(2, g)
    x_ours = sample_student(ours.student, x_T, ours.grid(4), cond)
    x_teacher = sample_student(ours.family.teacher, x_T, ours.grid(4), cond)
    # the student has moved, far beyond the tolerance below: the comparison can fail
    assert _err(x_teacher, x_ours, "student vs teacher") > 1e-3
    return x_T, cond, x_ours


def _run_pipe(pipe, x_T, cond, kwargs):
    kwargs = {"num_inference_steps": 4, **kwargs}
    return pipe(prompt_embeds=cond["prompt_embeds"], prompt_attention_mask=cond["prompt_attention_mask"],
                latents=x_T.clone(), output_type="latent", **TINY, **kwargs).images


@pytest.mark.parametrize("fmt", ["peft", "full"])
def test_export_reproduces_student_in_stock_pipeline(teacher, trained, tmp_path, one_thread, fmt):
    """A freshly built stock PixArtAlphaPipeline configured from tdm_inference.json reproduces the library's own
    4-step sampler to 1e-5 relative (fp32): the fused `full` export through export_run / load_pipeline, and the LoRA
    through peft's stock route, `PeftModel.from_pretrained(pipe.transformer, folder)` (as the PixArt-LCM-LoRA
    model card loads it), both wrapped and merged."""
    from tdm.export.pipeline import export_run, load_pipeline

    x_T, cond, x_ours = _student_vs_teacher(trained)
    if fmt == "full":
        out = export_run(trained, "full", tmp_path / fmt)
        model_index = json.loads((out / "model_index.json").read_text())
        assert model_index["transformer"] == ["diffusers", "PixArtTransformer2DModel"]  # a stock folder
        pipe, kwargs = load_pipeline(out, inference=out / "tdm_inference.json")
        pipes = {"fused": pipe}
    else:
        from peft import PeftModel

        out = export_run(trained, "diffusers", tmp_path / fmt)
        spec = json.loads((out / "tdm_inference.json").read_text())
        pipe = _stock(teacher[0], spec["scheduler"])
        kwargs = {"guidance_scale": spec["guidance_scale"], **spec["scheduler"]["set_timesteps_kwargs"]}
        pipe.transformer = PeftModel.from_pretrained(pipe.transformer, str(out))
        pipes = {"peft-wrapped": pipe}
    assert kwargs == {"guidance_scale": 1.0, "timesteps": GRID}
    for name, p in pipes.items():
        p.set_progress_bar_config(disable=True)
        assert _err(_run_pipe(p, x_T, cond, kwargs), x_ours, f"student {name}") < 1e-5
    if fmt == "peft":  # merged into a plain stock transformer
        pipe.transformer = pipe.transformer.merge_and_unload()
        assert type(pipe.transformer).__name__ == "PixArtTransformer2DModel"
        assert _err(_run_pipe(pipe, x_T, cond, kwargs), x_ours, "student peft-merged") < 1e-5


@pytest.mark.parametrize("K", [1, 4])
def test_euler_export_scheduler_for_pixart(teacher, trained, tmp_path, one_thread, K):
    """`PixArtFamily.vp_scheduler = "euler"`: with it the stock pipeline reproduces the student at K = 1 and 4;
    with DPM-Solver a ONE-step PixArtAlphaPipeline crashes (`step(...)[1]` on a 1-tuple)."""
    from peft import PeftModel

    from tdm.core.samplers import sample_student
    from tdm.export.scheduler import inference_scheduler
    from tdm.run import load_run

    run = load_run(trained)
    assert run.family.vp_scheduler == "euler"
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(run.family.sample_shape(2), generator=g)
    cond, _ = run.family.sample_cond(2, g)
    grid = run.grid(K)
    x_ours = sample_student(run.student, x_T, grid, cond)
    config = json.loads((teacher[0] / "scheduler" / "scheduler_config.json").read_text())
    from tdm.export.pipeline import export_run

    out = export_run(trained, "diffusers", tmp_path / "peft")
    for name in ("dpm", "euler"):
        spec = inference_scheduler(config, grid, "vp", vp_scheduler=name)
        pipe = _stock(teacher[0], spec)
        pipe.transformer = PeftModel.from_pretrained(pipe.transformer, str(out)).merge_and_unload()
        kwargs = {"guidance_scale": 1.0, **spec["set_timesteps_kwargs"]}
        if name == "dpm" and K == 1:
            with pytest.raises(IndexError):
                _run_pipe(pipe, x_T, cond, kwargs)
        else:
            assert _err(_run_pipe(pipe, x_T, cond, {**kwargs, "num_inference_steps": K}), x_ours,
                        f"student K={K} {name}") < 1e-5


def test_diffusers_lora_export_via_export_run(teacher, trained, tmp_path, one_thread):
    from tdm.export.pipeline import export_run, load_pipeline

    x_T, cond, x_ours = _student_vs_teacher(trained)
    out = export_run(trained, "diffusers", tmp_path / "diffusers")
    pipe, kwargs = load_pipeline(teacher[0], lora=out)
    pipe.set_progress_bar_config(disable=True)
    assert _err(_run_pipe(pipe, x_T, cond, kwargs), x_ours, "student diffusers LoRA") < 1e-5
