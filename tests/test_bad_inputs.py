"""Every bad input a user can give the CLI ends in exactly one line on stderr that names what is wrong and the fix,
exit code 2, and no traceback; `--debug` adds the traceback. Cases run `tdm.cli.main` in-process (fast); the
real `tdm` executable is run once at the end.

Templates: {d} a folder of prepared files, {toy} a finished unconditional toy run (train.eval_samples=0),
{cond} a finished class-conditional toy run, {sd} a tiny SD1.5 pipeline folder, {sdrun} a finished sd15 LoRA run.
"""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from family_harness import lora_run, teacher_folder
from tiny_pipelines import make_sd15

from tdm.cli import main
from tdm.config import resolve
from tdm.trainer import Trainer

TINY = ["train.progress=false", "net.hidden=32", "net.depth=1", "net.pretrain_steps=20", "net.pretrain_batch=128",
        "train.batch_size=32", "train.iterations=3"]
DRY = ["distill", "--preset", "toy-gmm", "--dry-run"]


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """The files and runs the cases point at."""
    import torch

    d = tmp_path_factory.mktemp("inputs")
    files = {
        "mix_bad.yaml": "weights: [1, 2\nmeans: [[0, 0]]\n",
        "mix_empty.yaml": "",
        "mix_bad.json": '{"weights": [1],\n "means": }',
        "mix_ragged.yaml": "weights: [1, 1]\nmeans: [[0, 0], [1]]\nstds: [1, 1]\n",
        "mix_keys.yaml": "weights: [1]\nmeans: [[0, 0]]\n",
        "mix_neg.yaml": "weights: [1]\nmeans: [[0, 0]]\nstds: [-1]\n",
        "p_empty.txt": "\n  \n",
        "p_bad.jsonl": '{"prompt": "a cat"}\n{"prompt": "a dog"\n',
        "p_field.jsonl": '{"text": "a cat"}\n',
        "p_nodigit.txt": "a handwritten digit seven\na picture of a cat\n",
        "p_ok.txt": "a cat\na dog\n",
        "a_file": "not a folder",
        "cfg_unknown.yaml": "train:\n  iterations: 5\nstudent:\n  stepz: 2\n",
        "cfg_bad.yaml": "train:\n  iterations: [5\n",
        "cfg_list.yaml": "- train.iterations=5\n",
        "cfg_section.yaml": "student: 2\n",
        "cfg_range.yaml": "train:\n  keep_checkpoints: 0\n",
        "cfg_preset.yaml": "preset: sd15\n",
        "cfg_type.yaml": "student:\n  steps: four\n",
    }
    for name, text in files.items():
        (d / name).write_text(text)
    (d / "mix_binary.yaml").write_bytes(b"\xff\xfe\x00weights")
    (d / "p_binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    (d / "empty_dir").mkdir()
    (d / "notdataset").mkdir()
    (d / "notdataset" / "x.txt").write_text("a cat\n")
    # a pipeline folder with a broken model_index.json, and one missing its network config
    for name in ("pipe_badjson", "pipe_nounet"):
        (d / name / "scheduler").mkdir(parents=True)
    (d / "pipe_badjson" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline",\n')
    (d / "pipe_nounet" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    sd, prompts = teacher_folder(tmp_path_factory, "sd15_bad_inputs", make_sd15)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(resolve("toy-gmm", TINY + ["train.eval_samples=0"]), d / "toy").train()
        assert main(["distill", "--preset", "toy-gmm-cond", "--output", str(d / "cond"), *TINY,
                     "train.eval_samples=100"]) == 0
    finally:
        torch.set_num_threads(n)
    sdrun = lora_run("sd15", (sd, prompts), tmp_path_factory.mktemp("sdrun"), "train.mixed_precision=no")
    # a finished run whose student file is damaged, and a folder holding a run with an unreadable config
    broken = d / "broken"
    broken.mkdir()
    for name in ("config.yaml", "student.safetensors"):
        (broken / name).write_bytes((d / "toy" / name).read_bytes())
    (broken / "student.safetensors").write_bytes(b"\x00" * 64)
    (d / "badcfg").mkdir()
    (d / "badcfg" / "config.yaml").write_text("teacher: [unclosed\n")
    return {"d": d, "toy": d / "toy", "cond": d / "cond", "sd": sd, "sdrun": sdrun, "prompts": prompts}


SD = ["distill", "--preset", "sd15", "--teacher", "{sd}", "--prompts", "{d}/p_ok.txt", "--output", "{d}/o_sd"]

# (id, argv, fragments every message must hold)
CASES = [
    # -- config fields: types, ranges, choices --------------------------------------------
    ("keep_checkpoints_negative", [*DRY, "train.keep_checkpoints=-1"], ["train.keep_checkpoints=-1", ">= 1"]),
    ("keep_checkpoints_zero", [*DRY, "train.keep_checkpoints=0"], ["train.keep_checkpoints=0", ">= 1"]),
    ("checkpoint_every_zero", [*DRY, "train.checkpoint_every=0"], ["train.checkpoint_every=0", ">= 1"]),
    ("log_every_zero", [*DRY, "train.log_every=0"], ["train.log_every=0", ">= 1"]),
    ("betas_one", [*DRY, "optim.betas=[0.9]"], ["optim.betas", "two numbers"]),
    ("betas_above_one", [*DRY, "optim.betas=[0.9, 1.5]"], ["optim.betas", "[0, 1)"]),
    ("hidden_zero", [*DRY, "net.hidden=0"], ["net.hidden=0", ">= 2"]),
    ("hidden_odd", [*DRY, "net.hidden=33"], ["net.hidden=33", "even"]),
    ("eval_samples_negative", [*DRY, "train.eval_samples=-5"], ["train.eval_samples=-5", ">= 0"]),
    ("steps_zero", [*DRY, "student.steps=0"], ["student.steps=0", ">= 1"]),
    ("unify_duplicates", [*DRY, "student.unify=[1,1]"], ["student.unify", "distinct"]),
    ("lr_negative", [*DRY, "optim.lr_fake=-1e-3"], ["optim.lr_fake", "> 0"]),
    ("lr_nan", [*DRY, "optim.lr_student=.nan"], ["optim.lr_student", "finite"]),
    ("ema_one", [*DRY, "optim.ema=1.0"], ["optim.ema", "[0, 1)"]),
    ("guidance_below_one", [*DRY, "teacher.guidance=0.5"], ["teacher.guidance=0.5", "CFG scale"]),
    ("seed_negative", [*DRY, "train.seed=-1"], ["train.seed=-1"]),
    ("batch_zero", [*DRY, "train.batch_size=0"], ["train.batch_size=0", ">= 1"]),
    ("iterations_negative", [*DRY, "train.iterations=-1"], ["train.iterations=-1", ">= 0"]),
    ("warmup_negative", [*DRY, "optim.warmup=-3"], ["optim.warmup=-3"]),
    ("interval_choice", [*DRY, "tdm.interval=foo"], ["tdm.interval='foo'", "separate"]),
    ("precision_choice", [*DRY, "train.mixed_precision=fp8"], ["train.mixed_precision='fp8'", "bf16"]),
    ("steps_text", [*DRY, "student.steps=abc"], ["student.steps", "int"]),
    ("steps_fraction", [*DRY, "student.steps=2.5"], ["student.steps", "int"]),
    ("unify_not_list", [*DRY, "student.unify=4"], ["student.unify", "list"]),
    ("unknown_field", [*DRY, "student.stepz=2"], ["student.stepz", "tdm presets --show"]),
    ("unknown_section", [*DRY, "nosection.steps=2"], ["nosection"]),
    ("override_no_equals", [*DRY, "student.steps"], ["student.steps", "key=value"]),
    ("override_bad_yaml", [*DRY, "student.unify=[1,2"], ["student.unify=[1,2", "not valid YAML"]),
    ("teacher_twice", [*SD, "teacher.path={d}"], ["--teacher and teacher.path=", "keep one"]),
    ("betas_order", [*DRY, "teacher.beta_start=0.5", "teacher.beta_end=0.1"], ["teacher.beta_start", "beta_end"]),
    ("huber_zero", [*DRY, "tdm.huber_c=0"], ["tdm.huber_c=0", "> 0"]),
    ("grid_too_fine", [*DRY, "student.grid_N=2"], ["student.grid=demo", "K=4", "grid_N=2"]),
    ("tau_min_beyond_T", [*DRY, "tdm.tau_min=5000"], ["tdm.tau_min=5000", "1000 timesteps"]),
    ("unknown_preset", ["distill", "--preset", "nope", "--dry-run"], ["unknown preset 'nope'", "toy-gmm"]),
    ("report_to_choice", [*DRY, "train.report_to=mlflow"], ["train.report_to='mlflow'", "tensorboard, wandb, none"]),
    ("validation_prompts_empty", [*SD, "--dry-run", 'train.validation_prompts=["a cat", " "]'],
     ["train.validation_prompts", "empty prompt"]),
    ("validation_prompts_text", [*SD, "--dry-run", "train.validation_prompts=[1, 2]"],
     ["train.validation_prompts expects str"]),
    ("validation_prompts_no_previews", [*SD, "--dry-run", "train.validation_prompts=[a cat]", "train.preview_every=0"],
     ["train.validation_prompts", "train.preview_every=N"]),
    # -- --config FILE ----------------------------------------------------------------------
    ("config_unknown_key", [*DRY, "--config", "{d}/cfg_unknown.yaml"], ["cfg_unknown.yaml:4", "'student.stepz'"]),
    ("config_bad_yaml", [*DRY, "--config", "{d}/cfg_bad.yaml"], ["cfg_bad.yaml:", "not valid YAML"]),
    ("config_not_mapping", [*DRY, "--config", "{d}/cfg_list.yaml"], ["cfg_list.yaml", "no mapping of config sections"]),
    ("config_section_value", [*DRY, "--config", "{d}/cfg_section.yaml"], ["cfg_section.yaml:1", "student", "section"]),
    ("config_value_type", [*DRY, "--config", "{d}/cfg_type.yaml"], ["cfg_type.yaml:2", "student.steps", "int"]),
    ("config_value_range", [*DRY, "--config", "{d}/cfg_range.yaml"],
     ["cfg_range.yaml:2", "train.keep_checkpoints=0", ">= 1"]),
    ("config_preset_conflict", [*DRY, "--config", "{d}/cfg_preset.yaml"], ["cfg_preset.yaml:1", "--preset toy-gmm"]),
    ("config_missing", [*DRY, "--config", "{d}/nope.yaml"], ["--config", "nope.yaml", "does not exist"]),
    ("config_folder", [*DRY, "--config", "{d}/empty_dir"], ["--config", "empty_dir", "folder"]),
    # -- fields the family would ignore ---------------------------------------------------
    ("toy_lora", [*DRY, "lora.rank=8"], ["lora.rank=8", "not used by the toy family", "remove it"]),
    ("toy_prompts", [*DRY, "--prompts", "{d}/p_ok.txt"], ["data.prompts", "not used by the toy family"]),
    ("toy_teacher", [*DRY, "--teacher", "{sd}"], ["teacher.path", "not used by the toy family"]),
    ("toy_preview", [*DRY, "train.preview_every=5"], ["train.preview_every=5", "toy"]),
    ("toy_validation_prompts", [*DRY, 'train.validation_prompts=["a cat"]'],
     ["train.validation_prompts", "not used by the toy family"]),
    ("digits_net", ["distill", "--preset", "digits", "--dry-run", "net.hidden=64"], ["net.hidden=64", "digits"]),
    ("digits_unify", ["distill", "--preset", "digits", "--dry-run", "student.unify=[1,2]"],
     ["student.unify", "digits family"]),
    ("sd15_mixture", [*SD, "--dry-run", "teacher.mixture=cond4d"], ["teacher.mixture", "sd15 family"]),
    ("sd15_eval_samples", [*SD, "train.eval_samples=100"], ["train.eval_samples=100", "measured with local models",
                                                            "eval.clip=PATH"]),
    ("sd15_eval_folder", [*SD, "eval.features={d}/empty_dir"], ["eval.features=", "holds no config.json"]),
    ("toy_eval_clip", [*DRY, "eval.clip={d}"], ["eval.clip=", "not used by the toy family"]),
    ("sd15_ema_lora", [*SD, "optim.ema=0.99"], ["optim.ema", "LoRA"]),
    ("cfg_without_classes", [*DRY, "teacher.guidance=2"], ["teacher.guidance=2", "class-conditional"]),
    # -- files: mixtures, teacher folders, prompts ----------------------------------------
    ("mixture_missing", [*DRY, "teacher.mixture={d}/nope.yaml"], ["teacher.mixture", "nope.yaml", "not a file"]),
    ("mixture_name", [*DRY, "teacher.mixture=ring9"], ["teacher.mixture='ring9'", "ring8"]),
    ("mixture_bad_yaml", [*DRY, "teacher.mixture={d}/mix_bad.yaml"], ["mix_bad.yaml:", "not valid YAML"]),
    ("mixture_empty", [*DRY, "teacher.mixture={d}/mix_empty.yaml"], ["mix_empty.yaml", "weights, means, stds"]),
    ("mixture_bad_json", [*DRY, "teacher.mixture={d}/mix_bad.json"], ["mix_bad.json:2", "not valid JSON"]),
    ("mixture_binary", [*DRY, "teacher.mixture={d}/mix_binary.yaml"], ["mix_binary.yaml", "UTF-8"]),
    ("mixture_ragged", [*DRY, "teacher.mixture={d}/mix_ragged.yaml"], ["mix_ragged.yaml", "means"]),
    ("mixture_keys", [*DRY, "teacher.mixture={d}/mix_keys.yaml"], ["mix_keys.yaml", "missing keys", "stds"]),
    ("mixture_negative_std", [*DRY, "teacher.mixture={d}/mix_neg.yaml"], ["mix_neg.yaml", "stds", "positive"]),
    ("no_teacher", ["distill", "--preset", "sd15", "--output", "{d}/o1"], ["--teacher PATH", "teacher.path"]),
    ("teacher_missing", [*SD[:3], "--teacher", "{d}/nope", "--prompts", "{d}/p_ok.txt"],
     ["teacher.path=", "nope", "does not exist"]),
    ("teacher_not_pipeline", [*SD[:3], "--teacher", "{d}/empty_dir", "--prompts", "{d}/p_ok.txt"],
     ["empty_dir", "no model_index.json"]),
    ("teacher_wrong_family", ["distill", "--preset", "sdxl", "--teacher", "{sd}", "--prompts", "{d}/p_ok.txt"],
     ["StableDiffusionPipeline", "sdxl family", "--preset sd15"]),
    ("digits_given_pipeline", ["distill", "--preset", "digits", "--teacher", "{sd}"],
     ["diffusers pipeline folder", "tdm teacher train --preset digits"]),
    ("digits_empty_folder", ["distill", "--preset", "digits", "--teacher", "{d}/empty_dir"],
     ["empty_dir", "unet/config.json is missing", "tdm teacher train"]),
    ("model_index_bad_json", [*SD[:3], "--teacher", "{d}/pipe_badjson", "--prompts", "{d}/p_ok.txt"],
     ["model_index.json:2", "not valid JSON"]),
    ("pipeline_incomplete", [*SD[:3], "--teacher", "{d}/pipe_nounet", "--prompts", "{d}/p_ok.txt"],
     ["unet/config.json is missing"]),
    ("no_prompts", ["distill", "--preset", "sd15", "--teacher", "{sd}"], ["--prompts FILE", "data.prompts"]),
    ("prompts_missing", [*SD[:5], "--prompts", "{d}/nope.txt"], ["data.prompts", "nope.txt", "does not exist"]),
    ("prompts_binary", [*SD[:5], "--prompts", "{d}/p_binary.txt"], ["p_binary.txt", "not UTF-8"]),
    ("prompts_jsonl_line", [*SD[:5], "--prompts", "{d}/p_bad.jsonl"], ["p_bad.jsonl:2", "not valid JSON"]),
    ("prompts_jsonl_field", [*SD[:5], "--prompts", "{d}/p_field.jsonl"], ["p_field.jsonl:1", "'prompt'"]),
    ("prompts_empty", [*SD[:5], "--prompts", "{d}/p_empty.txt"], ["p_empty.txt", "no usable prompt"]),
    ("prompts_not_dataset", [*SD[:5], "--prompts", "{d}/notdataset"], ["notdataset", "not a `datasets` folder"]),
    ("resolution_vae", [*SD, "teacher.resolution=65"], ["teacher.resolution=65", "VAE factor"]),
    ("digits_sd_prompts", ["distill", "--preset", "digits-sd", "--prompts", "{d}/p_nodigit.txt"],
     ["a picture of a cat", "exactly one digit", "data.prompts"]),
    # -- the run folder ---------------------------------------------------------------------
    ("output_is_file", ["distill", "--preset", "toy-gmm", "--output", "{d}/a_file", *TINY],
     ["a_file", "is a file", "--output"]),
    ("output_config_unreadable", ["distill", "--preset", "toy-gmm", "--output", "{d}/badcfg", *TINY],
     ["config.yaml", "not readable YAML"]),
    ("output_other_config", ["distill", "--preset", "toy-gmm", "--output", "{toy}", *TINY, "student.steps=2"],
     ["another config", "student.steps: 4 -> 2", "--output"]),
    ("iterations_go_back", ["distill", "--preset", "toy-gmm", "--output", "{toy}", *TINY, "train.eval_samples=0",
                            "train.iterations=2"], ["train.iterations=2", "cannot go back"]),
    # -- the other commands ------------------------------------------------------------------
    ("sample_steps_zero", ["sample", "{toy}", "--steps", "0"], ["--steps", ">= 1", "default"]),
    ("sample_n_zero", ["sample", "{toy}", "--n", "0"], ["--n", ">= 1"]),
    ("sample_nfe_zero", ["sample", "{toy}", "--sampler", "ddim", "--nfe", "0"], ["--nfe", ">= 1"]),
    ("eval_n_zero", ["eval", "{toy}", "--n", "0"], ["--n", ">= 1"]),
    ("teacher_train_steps_zero", ["teacher", "train", "--preset", "digits", "--steps", "0"], ["--steps", ">= 1"]),
    ("teacher_train_preset", ["teacher", "train", "--preset", "toy-gmm"], ["'digits' and 'digits-sd'"]),
    ("labels_text", ["sample", "{cond}", "--labels", "0,x"], ["--labels", "comma-separated"]),
    ("labels_out_of_range", ["sample", "{cond}", "--labels", "0,7", "--n", "2"], ["--labels", "0..2"]),
    ("labels_unconditional", ["sample", "{toy}", "--labels", "0"], ["--labels", "class-conditional"]),
    ("labels_prompt_run", ["sample", "{sdrun}", "--labels", "0", "--n", "1"], ["--labels", "sd15"]),
    ("sample_steps_beyond_grid", ["sample", "{toy}", "--steps", "2000", "--n", "2"],
     ["--steps 2000", "(2001 entries)"]),
    ("sample_missing_run", ["sample", "{d}/nope"], ["nope", "not a run folder"]),
    ("sample_unfinished_run", ["sample", "{d}/badcfg"], ["student.safetensors is missing"]),
    ("sample_prompt_with_run", ["sample", "{toy}", "--prompt", "a cat"], ["--prompt: only for --teacher"]),
    ("sample_nfe_without_sampler", ["sample", "{toy}", "--nfe", "5"], ["--nfe", "--sampler"]),
    ("sample_out_suffix", ["sample", "{toy}", "--out", "{d}/s.txt"], ["s.txt", ".npy"]),
    ("sample_nothing", ["sample"], ["RUN_DIR", "--teacher"]),
    ("sample_teacher_missing", ["sample", "--teacher", "{d}/nope", "--prompt", "a cat"],
     ["nope", "no model_index.json"]),
    ("sample_teacher_no_prompt", ["sample", "--teacher", "{sd}"], ["--prompt"]),
    ("sample_teacher_with_steps", ["sample", "--teacher", "{sd}", "--steps", "2", "--prompt", "x"],
     ["--steps 2", "only the K it was trained for"]),
    ("sample_broken_student", ["sample", "{d}/broken"], ["student.safetensors", "does not load"]),
    ("export_toy", ["export", "{toy}"], ["toy run", "tdm sample"]),
    ("export_output_file", ["export", "{sdrun}", "--output", "{d}/a_file"], ["a_file", "is a file"]),
    ("eval_no_metric", ["eval", "{sdrun}"], ["sd15 run is measured with local models", "eval.clip=CLIP_FOLDER"]),
    ("eval_inception", ["eval", "{sdrun}", "--n", "4", "eval.features=inception"], ["torchvision", "DINOv2"]),
    ("eval_not_an_eval_field", ["eval", "{sdrun}", "train.iterations=9"], ["train.iterations=9", "eval.* settings"]),
    ("eval_toy_clip", ["eval", "{toy}", "--n", "5", "eval.clip={d}"], ["eval.clip=", "not used by the toy family"]),
    ("eval_no_samples", ["eval", "{toy}"], ["train.eval_samples is 0", "--n N"]),
    ("eval_missing_run", ["eval", "{d}/nope"], ["nope", "not a run folder"]),
    ("gpu_memory_without_dry_run", ["distill", "--preset", "toy-gmm", "--gpu-memory", "24GB"],
     ["--gpu-memory goes with --dry-run"]),
    ("gpu_memory_size", [*DRY, "--gpu-memory", "lots"], ["--gpu-memory 'lots'", "24GB"]),
    ("presets_unknown", ["presets", "--show", "nope"], ["unknown preset 'nope'"]),
    ("no_command", [], ["required"]),
    ("missing_preset", ["distill"], ["--preset"]),
    ("unknown_option", ["distill", "--preset", "toy-gmm", "--dry-run", "--frobnicate"], ["--frobnicate"]),
]


def _argv(template: list[str], places: dict) -> list[str]:
    return [a.format(**places) for a in template]


@pytest.mark.parametrize("argv,fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(argv, fragments, places, capsys, one_thread):
    code = main(_argv(argv, places))
    out, err = capsys.readouterr()
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tdm"), err
    assert "Traceback" not in out + err
    for fragment in fragments:
        assert fragment.format(**places) in lines[0], (fragment, lines[0])


def test_suite_covers_the_categories():
    """At least 60 cases (the issue's floor), ids unique."""
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


def test_read_only_folder_is_one_line(places, capsys, monkeypatch):
    """A folder the process may not write to (root may write anywhere, so the refusal is injected where the run
    creates its first file, the lock)."""
    real = os.open

    def refuse(path, *args, **kwargs):
        if str(path).endswith("tdm.lock"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    code = main(["distill", "--preset", "toy-gmm", "--output", str(places["d"] / "ro"), *TINY])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "tdm.lock: permission denied" in err and "another path" in err


def test_a_tracker_not_installed_is_refused_before_training(places, capsys, monkeypatch):
    """`train.report_to=wandb` without wandb (hidden here if installed): one line naming the install, no run folder."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` finds where it is not installed
    out = places["d"] / "o_wandb"
    assert main(["distill", "--preset", "toy-gmm", "--output", str(out), *TINY, "train.report_to=wandb"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "train.report_to=wandb" in err and "pip install wandb" in err
    assert not out.exists()


def test_debug_shows_the_traceback(places, capsys):
    assert main(["distill", "--preset", "toy-gmm", "--dry-run", "--debug", "train.log_every=0"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("tdm distill: error: train.log_every=0")


def test_the_executable_exits_2_with_one_line(places):
    """The installed entry point, not only `main`: exit status and stderr as a shell sees them."""
    done = subprocess.run([sys.executable, "-m", "tdm.cli", "sample", str(places["toy"]), "--n", "0"],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr


def test_metrics_and_logs_are_strict_json(places):
    """Every JSON file a run writes parses without NaN or Infinity (json.loads accepts them unless told not to)."""
    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))

    run = places["cond"]
    for line in (run / "train_log.jsonl").read_text().splitlines():
        strict(line)
    strict((run / "metrics.json").read_text())
    for manifest in Path(run, "checkpoints").glob("*/manifest.json"):
        strict(manifest.read_text())


def test_sample_works_on_a_diffusers_run(places, tmp_path, one_thread):
    """`tdm sample` on a diffusers run: the student's latents and their decoded images (eval and export of the
    families are refused or run above and in the family tests)."""
    import numpy as np

    out = tmp_path / "s.npy"
    assert main(["sample", str(places["sdrun"]), "--n", "2", "--steps", "2", "--out", str(out)]) == 0
    assert np.load(out).shape == (2, 4, 8, 8) and out.with_suffix(".png").stat().st_size > 100
