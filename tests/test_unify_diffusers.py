"""TDM-unify (§6) on a diffusers teacher: the student and fake score own a zero-initialised step-count embedding added
to the UNet's time embedding (the initial student equals the teacher), and the export writes one LoRA per K with K's
embedding folded into a LoRA bias, which the stock pipeline samples at each K like the library's K-step sampler."""

import json

import pytest
import torch
from family_harness import lora_run, teacher_folder
from safetensors import safe_open
from tiny_pipelines import make_cogvideox, make_flux, make_pixart, make_sd3, make_sd15, make_sdxl, make_wan

from tdm.config import resolve
from tdm.export.pipeline import export_run, load_pipeline
from tdm.families import build_family, check_inputs
from tdm.files import save_tensors
from tdm.run import load_run, run_config

UNIFY = "student.unify=[1,2,4]"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return teacher_folder(tmp_path_factory, "sd15u", make_sd15)


@pytest.fixture(scope="module")
def run_dir(teacher, tmp_path_factory):
    """A 2-iteration unify run whose student's K embeddings are then set to distinct random values (2 iterations
    train only the Ks they drew), so that each K's export differs from the others."""
    run = lora_run("sd15", teacher, tmp_path_factory.mktemp("sd15u_run"), UNIFY)
    path = run / "student.safetensors"
    with safe_open(str(path), "pt") as f:
        meta, weights = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert weights["k_embed.weight"].shape[0] == 5
    weights["k_embed.weight"] = torch.randn(weights["k_embed.weight"].shape, generator=torch.Generator().manual_seed(1))
    save_tensors(weights, path, meta)
    return run


def _overrides(teacher, *more):
    path, prompts = teacher
    return [f"teacher.path={path}", f"data.prompts={prompts}", "teacher.resolution=64", "lora.rank=4", *more]


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_k_embedding_starts_at_the_teacher(name, teacher, tmp_path_factory, tmp_path, one_thread):
    """SD1.5 and SDXL UNets: at initialisation the K-conditioned student and fake equal the teacher at every K; a
    nonzero embedding changes the role's output at its K only, never the teacher's; a K-conditioned role
    refuses a call without K."""
    if name == "sdxl":
        teacher = teacher_folder(tmp_path_factory, "sdxlu", make_sdxl)
    cfg = resolve(name, _overrides(teacher, UNIFY))
    fam = build_family(cfg, run_dir=tmp_path)
    nets = fam.role_nets(fam.base, ["student", "fake"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(fam.sample_shape(2), generator=g)
    cond, _ = fam.sample_cond(2, g)
    t = torch.tensor([500, 500])
    with torch.no_grad():
        ref = fam.teacher.net(x, t, cond)
        for net in nets.values():
            for K in (1, 2, 4):
                assert torch.equal(net(x, t, cond, k_steps=torch.tensor(K)), ref)
        nets["student"].k_embed.weight[2].normal_()
        assert (nets["student"](x, t, cond, k_steps=torch.tensor(2)) - ref).abs().max() > 1e-3
        assert torch.equal(nets["student"](x, t, cond, k_steps=torch.tensor(4)), ref)
        assert torch.equal(nets["fake"](x, t, cond, k_steps=torch.tensor(2)), ref)
        assert torch.equal(fam.teacher.net(x, t, cond), ref)
    assert "k_embed.weight" in nets["student"].state_dict()
    assert any(p is nets["student"].k_embed.weight for p in nets["student"].trainable_parameters())
    with pytest.raises(ValueError, match="pass k_steps"):
        nets["student"](x, t, cond)


def test_unify_refused_where_no_time_embedding(one_thread):
    """A family without a step-count embedding (the digits UNet) refuses student.unify in one line naming the
    field."""
    cfg = resolve("digits", [UNIFY])
    with pytest.raises(ValueError, match="student.unify") as err:
        check_inputs(cfg, dry=True)
    assert "\n" not in str(err.value)


def test_unify_export_per_k(teacher, run_dir, tmp_path, one_thread):
    """Each K's exported LoRA through the stock pipeline and its recorded scheduler reproduces the library's K-step
    sampler to 1e-4 (fp32); the K=1 file sampled at K=4 does not; kohya cannot carry the embedding and is refused."""
    out = export_run(run_dir, "diffusers", tmp_path / "exp")
    index = json.loads((out / "tdm_inference.json").read_text())
    assert sorted(index["unify"]) == ["1", "2", "4"]
    run = load_run(run_dir)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(run.family.sample_shape(2), generator=g)
    cond, _ = run.family.sample_cond(2, g)

    def stock(K, file_K=None):
        pipe, kwargs = load_pipeline(teacher[0], lora=out, steps=file_K or K)
        if file_K:  # K's scheduler with another K's file
            _, kwargs = load_pipeline(teacher[0], lora=out, steps=K)
        pipe.set_progress_bar_config(disable=True)
        return pipe(prompt_embeds=cond["prompt_embeds"], latents=x_T.clone(), output_type="latent", **kwargs).images

    for K in (1, 2, 4):
        assert index["unify"][str(K)]["file"] == f"K{K}/pytorch_lora_weights.safetensors"
        ours = run.sample(K, x_T, cond)
        err = (stock(K) - ours).abs().max().item()
        print(f"sd15 unify K={K}: max |pipeline - sample| = {err:.2e}")
        assert err < 1e-4
    wrong = (stock(4, file_K=1) - run.sample(4, x_T, cond)).abs().max().item()
    print(f"sd15 unify: K=1 file at K=4: max |pipeline - sample| = {wrong:.2e}")
    assert wrong > 1e-3
    with pytest.raises(ValueError, match="--steps 3") as err:
        load_pipeline(teacher[0], lora=out, steps=3)
    with pytest.raises(ValueError, match="export --format diffusers or full") as err:
        export_run(run_dir, "kohya", tmp_path / "k")
    assert "\n" not in str(err.value) and run_config(run_dir).student.unify == [1, 2, 4]


def test_unify_export_full(teacher, run_dir, tmp_path, one_thread):
    """--format full: a whole pipeline per K with K's embedding folded into the time embedding's last bias; K=2's
    folder matches the library's 2-step sampler to 1e-4, K=4's does not at K=2's timesteps."""
    out = export_run(run_dir, "full", tmp_path / "full")
    assert json.loads((out / "tdm_inference.json").read_text())["unify"]["2"]["file"] == "K2"
    run = load_run(run_dir)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(run.family.sample_shape(2), generator=g)
    cond, _ = run.family.sample_cond(2, g)
    ours = run.sample(2, x_T, cond)
    errs = {}
    for folder in ("K2", "K4"):
        pipe, kwargs = load_pipeline(out / folder, inference=out / "K2" / "tdm_inference.json")
        pipe.set_progress_bar_config(disable=True)
        x = pipe(prompt_embeds=cond["prompt_embeds"], latents=x_T.clone(), output_type="latent", **kwargs).images
        errs[folder] = (x - ours).abs().max().item()
    print(f"sd15 unify full: K=2 {errs['K2']:.2e}, K=4's folder at K=2 {errs['K4']:.2e}")
    assert errs["K2"] < 1e-4 and errs["K4"] > 1e-3


def test_unify_resume_bit_exact_and_full_mode(teacher, tmp_path, one_thread):
    """A unify run resumed from its checkpoint equals the uninterrupted one (losses and the saved K embedding); its
    previews tell the student K; full mode (lora.enabled=false) trains a K embedding per role too."""
    from family_harness import overrides, train

    more = (UNIFY, "train.preview_every=2")
    _, full = train("sd15", tmp_path / "full", overrides(teacher, *more, "train.iterations=4"))
    train("sd15", tmp_path / "split", overrides(teacher, *more, "train.iterations=2"))
    _, rest = train("sd15", tmp_path / "split", overrides(teacher, *more, "train.iterations=4"))
    assert [(m["loss_fake"], m["loss_student"]) for m in full[2:]] == [(m["loss_fake"], m["loss_student"])
                                                                        for m in rest]
    k = [load_run(tmp_path / r).student.net.k_embed.weight for r in ("full", "split")]
    assert torch.equal(*k) and k[0].abs().max() > 0
    trainer, hist = train("sd15", tmp_path / "fm", overrides(teacher, UNIFY, "train.iterations=1",
                                                             "lora.enabled=false"))
    assert trainer.method.fake.net.k_embed is not None and torch.isfinite(torch.tensor(hist[0]["loss_student"]))


def test_cli_samples_an_any_step_export_at_the_k_asked(teacher, run_dir, tmp_path, one_thread, capsys):
    """`tdm sample --teacher --lora EXPORT --steps K` picks K's file (not fused: peft cannot merge its LoRA bias);
    without --steps the one line names the Ks the export serves."""
    from tdm.cli import main

    out = export_run(run_dir, "diffusers", tmp_path / "exp")
    base = ["sample", "--teacher", str(teacher[0]), "--lora", str(out), "--prompt", "a cube"]
    assert main([*base, "--steps", "2", "--out", str(tmp_path / "k2.png")]) == 0
    assert (tmp_path / "k2.png").is_file()
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "none.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "serves K in [1, 2, 4]" in err[0], err


# The DiT families: (preset, builder, extra overrides, pipeline call arguments), as tests/test_export_formats.py
DITS = {
    "pixart": ("pixart-512", make_pixart, (), {"use_resolution_binning": False, "height": 64, "width": 64}),
    "sd3": ("sd3", make_sd3, (), {}),
    "flux": ("flux-dev", make_flux, (), {"height": 64, "width": 64}),
    "cogvideox": ("cogvideox-2b", make_cogvideox, ("teacher.frames=9",), {"num_frames": 9, "height": 64, "width": 64}),
    "wan": ("wan-1.3b", make_wan, ("teacher.frames=9", "teacher.width=64"),
            {"num_frames": 9, "height": 64, "width": 64}),
}
PIPE_ARGS = {"prompt_embeds": "prompt_embeds", "pooled": "pooled_prompt_embeds",
             "prompt_attention_mask": "prompt_attention_mask"}  # condition -> the pipeline's argument


@pytest.fixture(scope="module", params=list(DITS))
def dit_run(request, tmp_path_factory):
    """(name, teacher folder, run folder) of a 2-iteration unify run of a DiT family, its K embeddings then set to
    distinct random values."""
    name = request.param
    preset, build, extra, _ = DITS[name]
    teacher = teacher_folder(tmp_path_factory, f"{name}u", build)
    run = lora_run(preset, teacher, tmp_path_factory.mktemp(f"{name}u_run"), UNIFY, *extra)
    path = run / "student.safetensors"
    with safe_open(str(path), "pt") as f:
        meta, weights = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    weights["k_embed.weight"] = torch.randn(weights["k_embed.weight"].shape, generator=torch.Generator().manual_seed(1))
    save_tensors(weights, path, meta)
    return name, teacher, run


def test_dit_k_embedding_starts_at_the_teacher(dit_run, tmp_path, one_thread):
    """PixArt, SD3, FLUX, CogVideoX, Wan: the K embedding rides on the family's time embedding
    (`time_embedding_path`); at initialisation student and fake equal the teacher at every K, a nonzero embedding
    changes the role's output at its K only."""
    name, teacher, _ = dit_run
    preset, _, extra, _ = DITS[name]
    cfg = resolve(preset, _overrides(teacher, UNIFY, *extra))
    fam = build_family(cfg, run_dir=tmp_path)
    nets = fam.role_nets(fam.base, ["student", "fake"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(fam.sample_shape(2), generator=g)
    cond, _ = fam.sample_cond(2, g)
    t = fam.schedule.grid(4, cfg.student.grid_spec())[1].expand(2)
    with torch.no_grad():
        ref = fam.teacher.net(x, t, cond)
        for net in nets.values():
            for K in (1, 2, 4):
                assert torch.equal(net(x, t, cond, k_steps=torch.tensor(K)), ref)
        nets["student"].k_embed.weight[2].normal_()
        assert (nets["student"](x, t, cond, k_steps=torch.tensor(2)) - ref).abs().max() > 1e-4
        assert torch.equal(nets["student"](x, t, cond, k_steps=torch.tensor(4)), ref)
        assert torch.equal(fam.teacher.net(x, t, cond), ref)


def test_dit_unify_export_per_k(dit_run, tmp_path, one_thread):
    """Each K's exported file (diffusers LoRA; PixArt: peft's adapter folder, merged) through the stock pipeline
    and its recorded scheduler reproduces the library's K-step sampler to 1e-4 (fp32, relative to max(1, max|x|));
    the K=1 file with K=4's scheduler does not; --format full's K=2 folder matches at K=2."""
    name, teacher, run_dir = dit_run
    out = export_run(run_dir, "diffusers", tmp_path / "exp")
    index = json.loads((out / "tdm_inference.json").read_text())
    assert sorted(index["unify"]) == ["1", "2", "4"]
    run = load_run(run_dir)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(run.family.sample_shape(2), generator=g)
    cond, _ = run.family.sample_cond(2, g)
    args = {PIPE_ARGS[k]: v for k, v in cond.items() if k in PIPE_ARGS}

    def call(pipe, kwargs):
        pipe.set_progress_bar_config(disable=True)
        res = pipe(**args, latents=x_T.clone(), output_type="latent", **DITS[name][3], **kwargs)
        return res.frames if name in ("cogvideox", "wan") else res.images

    def stock(K, file_K=None):
        pipe, kwargs = load_pipeline(teacher[0], lora=out, steps=file_K or K)
        if file_K:  # K's scheduler with another K's file
            _, kwargs = load_pipeline(teacher[0], lora=out, steps=K)
        return call(pipe, kwargs)

    def rel(x, ours):
        return (x - ours).abs().max().item() / max(1.0, ours.abs().max().item())

    for K in (1, 2, 4):
        ours = run.sample(K, x_T, cond)
        err = rel(stock(K), ours)
        print(f"{name} unify K={K}: max |pipeline - sample| / max(1, max|x|) = {err:.2e}")
        assert err < 1e-4
    wrong = rel(stock(4, file_K=1), run.sample(4, x_T, cond))
    print(f"{name} unify: K=1 file at K=4: {wrong:.2e}")
    assert wrong > 1e-3
    full = export_run(run_dir, "full", tmp_path / "full")
    pipe, kwargs = load_pipeline(full / "K2", inference=full / "K2" / "tdm_inference.json")
    err = rel(call(pipe, kwargs), run.sample(2, x_T, cond))
    print(f"{name} unify full K=2: {err:.2e}")
    assert err < 1e-4


def test_k_lora_refuses_a_lora_on_the_time_embedding():
    """lora.targets that put a LoRA on the time embedding's linear_2 leave no room for K's bias: one line naming the
    field."""
    from tdm.export.pipeline import k_lora_state_dict

    sd = {"adaln_single.emb.timestep_embedder.linear_2.lora_A.weight": torch.zeros(4, 8)}
    with pytest.raises(ValueError, match="lora.targets") as err:
        k_lora_state_dict(sd, torch.zeros(8), 4, "adaln_single.emb.timestep_embedder")
    assert "\n" not in str(err.value)
