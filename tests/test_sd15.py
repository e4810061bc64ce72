"""A diffusers teacher end to end on a tiny SD1.5 built in code: LoRA and full students, resume."""

import pytest
import torch
from tiny_pipelines import PROMPTS, make_sd15

from tdm.config import resolve
from tdm.trainer import Trainer


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd15")
    (root / "prompts.txt").write_text("\n".join([*PROMPTS, "", PROMPTS[0], "a red cube on a table"]) + "\n")
    return make_sd15(root / "teacher"), root / "prompts.txt"


def _overrides(teacher, *more):
    path, prompts = teacher
    return ["train.progress=false", f"teacher.path={path}", f"data.prompts={prompts}", "teacher.resolution=64",
            "train.batch_size=2", "lora.rank=4", "lora.alpha=8", "train.checkpoint_every=2", *more]


def _train(run, overrides):
    trainer = Trainer(resolve("sd15", overrides), run)
    return trainer, trainer.train()


@pytest.mark.parametrize("lora", [True, False])
def test_two_iterations(teacher, tmp_path, one_thread, lora):
    trainer, hist = _train(tmp_path / "r", _overrides(teacher, "train.iterations=2", f"lora.enabled={str(lora).lower()}",
                                                      "train.preview_every=2", "train.gradient_checkpointing=true"))
    assert trainer.family.base.is_gradient_checkpointing
    preview = tmp_path / "r" / "previews" / "step_0000002.png"
    from PIL import Image

    assert Image.open(preview).size == (3 * 64, 3 * 64)  # the 3 distinct prompts x K = 1, 2, 4
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "r" / "logs" / "tdm"))
    events.Reload()
    assert "preview" in events.Tags()["images"] and "loss_fake" in events.Tags()["scalars"]  # trackers got them
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
    """Export, then a freshly built stock pipeline (load_lora_weights, or the fused folder) configured from
    tdm_inference.json reproduces the library's own K-step sampler to 1e-4 (fp32)."""
    from tdm.evaluate import load_run
    from tdm.export import export_run, load_pipeline
    from tdm.samplers import sample_student

    run = tmp_path / "r"
    trainer, _ = _train(run, _overrides(teacher, "train.iterations=2", "optim.lr_student=1e-2"))
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
    assert kwargs == {"guidance_scale": 1.0, "timesteps": [899, 674, 449, 224]}
    x_pipe = pipe(prompt_embeds=cond["prompt_embeds"], latents=x_T.clone(), output_type="latent",
                  num_inference_steps=4, **kwargs).images
    assert (x_pipe - x_ours).abs().max() < 1e-4


def test_kohya_export_keys(teacher, tmp_path, one_thread):
    from safetensors.torch import load_file

    from tdm.export import export_run

    run = tmp_path / "r"
    _train(run, _overrides(teacher, "train.iterations=1"))
    keys = load_file(str(export_run(run, "kohya") / "pytorch_lora_weights_kohya.safetensors"))
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    alphas = [v for k, v in keys.items() if k.endswith(".alpha")]
    assert alphas and all(int(a) == 4 for a in alphas)  # alpha = rank: alpha/rank is baked into lora_up
    assert any("lora_down" in k for k in keys)


def test_cli_distill_export_sample(teacher, tmp_path, one_thread, capsys):
    """The commands of README's "Distil your own model", on the tiny SD1.5."""
    from PIL import Image

    from tdm.cli import main
    from tdm.estimate import memory_estimate
    from tdm.families import family_class

    path, prompts = teacher
    common = ["--preset", "sd15", "--teacher", str(path), "--prompts", str(prompts)]
    small = ["teacher.resolution=64", "train.batch_size=2", "lora.rank=4", "train.progress=false"]
    assert main(["distill", *common, "--dry-run", *small]) == 0
    out = capsys.readouterr().out
    assert "at most 8 network calls" in out and "copies_of_base=1" in out

    run = tmp_path / "run"
    assert main(["distill", *common, "--output", str(run), *small, "train.iterations=1"]) == 0
    trainer = Trainer(resolve("sd15", [f"teacher.path={path}", f"data.prompts={prompts}", *small]), tmp_path / "x")
    est = memory_estimate(trainer.cfg, family_class("sd15"))
    assert est["lora_params"] == sum(p.numel() for p in trainer.student_net.trainable_parameters())

    assert main(["export", str(run)]) == 0
    png = tmp_path / "s.png"
    assert main(["sample", "--teacher", str(path), "--lora", str(run / "export_diffusers"), "--prompt",
                 "a cat", "--out", str(png)]) == 0
    img = Image.open(png)
    assert img.size == (64, 64)


def test_gradient_checkpointing_gives_the_same_lora(teacher, tmp_path, one_thread):
    """LoRA roles share one base, and checkpointing recomputes forwards during backward after other roles
    ran: the trainer re-selects the role first, so the trained adapters equal those without checkpointing."""
    runs = {}
    for gc in ("false", "true"):
        trainer, _ = _train(tmp_path / gc, _overrides(teacher, "train.iterations=2", f"train.gradient_checkpointing={gc}"))
        runs[gc] = {role: net.state_dict() for role, net in (("s", trainer.student_net), ("f", trainer.fake_net))}
    for role in ("s", "f"):
        for k, v in runs["false"][role].items():
            assert torch.allclose(v, runs["true"][role][k], atol=1e-6), k
