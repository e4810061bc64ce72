"""Shared set-up of the diffusers-family tests: a tiny teacher folder, a prompt file, short runs."""

from tiny_pipelines import PROMPTS

from tdm.config import resolve
from tdm.trainer import Trainer

# an empty line and a duplicate on purpose: 3 distinct prompts remain
PROMPT_LINES = [*PROMPTS, "", PROMPTS[0], "a red cube on a table"]


def teacher_folder(tmp_path_factory, name: str, build, **kwargs):
    root = tmp_path_factory.mktemp(name)
    (root / "prompts.txt").write_text("\n".join(PROMPT_LINES) + "\n")
    return build(root / "teacher", **kwargs), root / "prompts.txt"


def overrides(teacher, *more) -> list[str]:
    path, prompts = teacher
    return ["train.progress=false", f"teacher.path={path}", f"data.prompts={prompts}", "teacher.resolution=64",
            "train.batch_size=2", "lora.rank=4", "lora.alpha=8", "train.checkpoint_every=2", *more]


def train(preset: str, run, overrides: list[str]):
    trainer = Trainer(resolve(preset, overrides), run)
    return trainer, trainer.train()


def moved_student(run_dir, K: int = 4, n: int = 2):
    """A trained run's student on fixed noise and prompts, checked to differ from its teacher, so that an
    export comparison against it can fail. Returns `(x_T, cond, x_student)`."""
    import torch

    from tdm.core.samplers import sample_student
    from tdm.run import load_run

    run = load_run(run_dir)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(run.family.sample_shape(n), generator=g)
    cond, _ = run.family.sample_cond(n, g)
    x_student = sample_student(run.student, x_T, run.grid(K), cond)
    assert (x_student - sample_student(run.family.teacher, x_T, run.grid(K), cond)).abs().max() > 1e-3
    return x_T, cond, x_student


def lora_run(preset: str, teacher, root, *more):
    """A 2-iteration LoRA run with a large student lr at one thread, for module-scoped export fixtures
    (the `one_thread` fixture is function-scoped); returns its run directory."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(preset, root / "r", overrides(teacher, *more, "train.iterations=2", "optim.lr_student=1e-2"))
    finally:
        torch.set_num_threads(n)
    return root / "r"


def eval_models(tmp_path_factory) -> dict[str, str]:
    """Tiny local CLIP and DINOv2 folders for `tdm eval` (eval.clip, eval.features), and overrides naming them."""
    from tiny_pipelines import make_clip, make_dinov2

    root = tmp_path_factory.mktemp("eval_models")
    return {"clip": str(make_clip(root / "clip")), "dinov2": str(make_dinov2(root / "dinov2"))}
