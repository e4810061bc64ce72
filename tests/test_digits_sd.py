"""digits-sd: a trained text-to-image Stable Diffusion teacher, distilled through the sd15 code path (prompt
cache, CFG in one call, LoRA roles on one base, export) and measured by the digit classifier."""

import json

import matplotlib.image
import pytest
import torch
from diffusers import StableDiffusionPipeline

from tdm.cli import main
from tdm.config import resolve
from tdm.core.samplers import sample_student
from tdm.eval.digits import DigitsSDEvaluator
from tdm.eval.digits import sd_teacher_check as teacher_check
from tdm.export.pipeline import export_run, load_pipeline
from tdm.families.digits.sd import DigitsSDFamily, teacher_dir
from tdm.families.digits.sd_teacher import digit_prompts, to_digit
from tdm.run import load_run
from tdm.trainer import Trainer

FAST = ["train.progress=false", "train.checkpoint_every=1000"]
N_EVAL = 450


def test_teacher_training_writes_a_stock_pipeline(tmp_path, one_thread):
    """`tdm teacher train --preset digits-sd` at a few steps: both losses fall, the folder loads in a stock
    StableDiffusionPipeline, and the DDIM check is recorded."""
    out = tmp_path / "t"
    assert main(["teacher", "train", "--preset", "digits-sd", "--output", str(out), "--steps", "30"]) == 0
    log = json.loads((out / "teacher.json").read_text())
    for net in ("vae", "unet"):
        curve = [loss for _, loss in log[net]["loss_curve"]]
        assert curve[-1] < 0.8 * curve[0], (net, curve)
    assert set(log["check"]) >= {"fd", "accuracy", "precision", "recall"}
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert pipe("the digit 3", num_inference_steps=2, output_type="pt").images.shape == (1, 3, 16, 16)


def test_committed_teacher_reproduces_its_check_and_draws_digits_in_a_stock_pipeline(one_thread):
    path = teacher_dir("digits-sd")
    recorded = json.loads((path / "teacher.json").read_text())["check"]
    now = teacher_check(path, recorded["steps"], recorded["guidance"], recorded["seed"], recorded["n"])
    assert now["accuracy"] == pytest.approx(recorded["accuracy"], abs=0.01)
    assert now["fd"] == pytest.approx(recorded["fd"], rel=0.05)
    assert now["accuracy"] >= 0.9

    # the stock pipeline, with its own tokenizer, text encoder, PNDM scheduler and CFG, draws the digit asked for
    pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(10).repeat(3)
    prompts = [digit_prompts(int(d))[i % 4] for i, d in enumerate(labels)]
    images = pipe(prompts, num_inference_steps=25, guidance_scale=recorded["guidance"], output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    from tdm.eval.classifier import load_classifier

    predicted = load_classifier()(to_digit(images * 2 - 1)).argmax(-1)
    assert (predicted == labels).double().mean() >= 0.8


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A short LoRA distillation of digits-sd with the preset's CFG, and its 4-step student's quality before
    and after on the evaluation's prompts and noise. One thread (the `one_thread` fixture is per function)."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = tmp_path_factory.mktemp("digits_sd") / "run"
        cfg = resolve("digits-sd", [*FAST, "train.iterations=150", "optim.lr_student=3e-4", "optim.lr_fake=3e-3"])
        trainer = Trainer(cfg, run)
        fam = trainer.family
        judge = DigitsSDEvaluator(fam)
        g = torch.Generator().manual_seed(0)
        x_T = torch.randn(fam.sample_shape(N_EVAL), generator=g)
        cond, _ = judge.cond(N_EVAL, g)
        start = judge.quality(sample_student(trainer.method.student, x_T, trainer.method.grids[4], cond), cond, g)
        trainer.train()
        end = judge.quality(load_run(run).sample(4, x_T, cond), cond, g)
    finally:
        torch.set_num_threads(n_threads)
    return run, start, end


def test_short_lora_distillation_improves_fd_over_the_start(short_run):
    """The student starts as the teacher without CFG at 4 steps (FD 127, accuracy 0.971); 150 LoRA iterations
    at 3x the preset's lrs must lower its FD (measured 117 with seed 0, 98 with seed 1: short runs are noisy)
    and reach the CFG teacher's accuracy (measured 1.000). Without CFG the teacher's own accuracy is 0.953,
    so a student that lost CFG fails the second check even where its FD falls (w = 1 has the lower FD, 86
    at 25 steps)."""
    _, start, end = short_run
    assert end["fd"] < 0.95 * start["fd"], (start, end)
    assert end["accuracy"] >= 0.99, (start, end)


def test_exported_lora_in_a_stock_pipeline_gives_the_same_images_and_metrics(short_run, one_thread):
    """`tdm export`, then a stock StableDiffusionPipeline with the LoRA and the recorded scheduler, fed the
    evaluation's prompts as text and its start noise: the library's images within 1e-4, the same metrics."""
    run_dir = short_run[0]
    run = load_run(run_dir)
    fam = run.family
    judge = DigitsSDEvaluator(fam)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(fam.sample_shape(N_EVAL), generator=g)
    idx = fam.prompts_for(judge.held_out(N_EVAL), g)  # the draws of `tdm eval`
    cond = fam._cond(idx)
    x_student = run.sample(4, x_T, cond)
    assert (x_student - sample_student(fam.teacher, x_T, run.grid(4), cond)).abs().max() > 1e-2  # it moved
    ours = fam.decode(x_student)

    pipe, kwargs = load_pipeline(fam.path, lora=export_run(run_dir, "diffusers"))
    pipe.set_progress_bar_config(disable=True)
    stock = pipe([fam.prompts[i] for i in idx], latents=x_T.clone(), output_type="pt", **kwargs).images
    assert (stock - ours).abs().max() < 1e-4
    m_stock = judge.metrics.evaluate(to_digit(stock * 2 - 1), cond["labels"])
    m_ours = judge.quality(x_student, cond, g)
    assert m_stock == pytest.approx(m_ours, rel=1e-3, abs=1e-3)


def test_cli_distill_writes_the_digits_report(tmp_path, one_thread, capsys):
    run = tmp_path / "run"
    assert main(["distill", "--preset", "digits-sd", "--dry-run"]) == 0
    assert "copies_of_base=1" in capsys.readouterr().out
    assert main(["distill", "--preset", "digits-sd", "--output", str(run), *FAST, "train.iterations=2",
                 "train.batch_size=8", "train.eval_samples=60"]) == 0
    for name in ("grid.png", "quality.png"):
        img = matplotlib.image.imread(run / name)
        assert img.ndim == 3 and min(img.shape[:2]) > 100 and img.std() > 0.01
    report = (run / "report.md").read_text()
    assert "| student K=4 | 4 |" in report and "teacher ddim steps=50 | 100 |" in report
    m = json.loads((run / "metrics.json").read_text())
    assert set(m["student"]) == {"K=1", "K=2", "K=4"} and m["student"]["K=4"]["trained"]
    assert [e["nfe"] for e in m["teacher"]["ddim"].values()] == [8, 16, 50, 100]  # CFG: 2 per step
    assert main(["sample", str(run), "--labels", "3,7", "--n", "2", "--out", str(tmp_path / "s.npy")]) == 0
    assert matplotlib.image.imread(tmp_path / "s.png").std() > 0.01


def test_prompts_must_name_one_digit(tmp_path):
    (tmp_path / "p.txt").write_text("a handwritten digit seven\na red cube\n")
    with pytest.raises(ValueError, match="must name exactly one digit"):
        DigitsSDFamily(resolve("digits-sd", [f"data.prompts={tmp_path / 'p.txt'}"]), run_dir=tmp_path)
