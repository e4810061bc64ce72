"""`tdm sample` like a user expects: the stock pipeline with the LoRA fused, a prompt file, several images per prompt,
size, device and dtype; a run sampled on the device it names."""

import pytest
import torch
from family_harness import lora_run, teacher_folder
from PIL import Image
from tiny_pipelines import make_sd15

from tdm.cli import main
from tdm.export.pipeline import export_run, load_pipeline


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    teacher = teacher_folder(tmp_path_factory, "sd15", make_sd15)
    run = lora_run("sd15", teacher, tmp_path_factory.mktemp("sd15_run"))
    return teacher[0], export_run(run, "diffusers")


def test_the_fused_lora_gives_the_adapter_s_images(exported, one_thread):
    """Fusing folds the LoRA into the weights at the recorded scale: the same images as the adapter, which differ
    from the teacher's."""
    teacher, lora = exported
    images = {}
    for name, kw in (("adapter", {"lora": lora}), ("fused", {"lora": lora, "fuse": True}), ("teacher", {})):
        pipe, kwargs = load_pipeline(teacher, inference=lora / "tdm_inference.json", **kw)
        pipe.set_progress_bar_config(disable=True)
        images[name] = pipe(["a red cube on a table"], generator=torch.Generator().manual_seed(0), output_type="pt",
                            **kwargs).images
    assert (images["fused"] - images["adapter"]).abs().max() < 1e-5
    assert (images["teacher"] - images["adapter"]).abs().max() > 1e-3


def test_a_prompt_file_gives_n_images_per_prompt(exported, tmp_path, one_thread, capsys):
    teacher, lora = exported
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue ball\n")
    out = tmp_path / "out" / "img.png"
    assert main(["sample", "--teacher", str(teacher), "--lora", str(lora), "--prompt-file", str(prompts), "--n", "2",
                 "--batch", "3", "--out", str(out), "--device", "cpu", "--dtype", "fp32"]) == 0
    written = sorted(p.name for p in out.parent.iterdir())
    assert written == [f"img_{i:04d}.png" for i in range(4)]
    first, second = (Image.open(out.parent / name) for name in written[:2])
    assert first.size == second.size and first.tobytes() != second.tobytes()  # seeds 0 and 1 of one prompt
    # the size the user asks for; one the pipeline cannot make is one line naming the options
    assert main(["sample", "--teacher", str(teacher), "--lora", str(lora), "--prompt", "a cube", "--height", "48",
                 "--width", "32", "--out", str(tmp_path / "small.png")]) == 0
    assert Image.open(tmp_path / "small.png").size == (32, 48)
    capsys.readouterr()
    assert main(["sample", "--teacher", str(teacher), "--lora", str(lora), "--prompt", "a cube", "--height", "31",
                 "--out", str(tmp_path / "bad.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--height 31" in err[0] and "multiples of 8" in err[0], err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without CUDA")
def test_device_and_dtype_refusals(exported, capsys):
    teacher, lora = exported
    for args, words in ((["--device", "cuda"], "no CUDA device"), (["--dtype", "fp16"], "--dtype fp16 needs a GPU"),
                        (["--prompt", "x", "--prompt-file", "p.txt"], "give one of them"),
                        (["--steps", "2"], "serves only the K it was trained for")):
        base = ["sample", "--teacher", str(teacher), "--lora", str(lora)]
        assert main([*base, *(["--prompt", "x"] if "--prompt" not in args else []), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
