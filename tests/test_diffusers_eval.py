"""`tdm eval` for diffusers runs: the CLIP score, FID and KID in local encoders' features (tiny CLIP and DINOv2 built
in code), checked on known cases, and end to end on a tiny SD1.5 run."""

import json

import numpy as np
import pytest
import torch
from family_harness import eval_models, teacher_folder
from PIL import Image
from tiny_pipelines import PROMPTS, make_sd15

from tdm.cli import main
from tdm.eval.encoders import Encoder, Preprocess
from tdm.eval.image_metrics import clip_score, frechet_distance, kid, mmd2_unbiased

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return eval_models(tmp_path_factory)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return teacher_folder(tmp_path_factory, "sd15", make_sd15)


# -- metrics on known cases -----------------------------------------------------------------------
def test_frechet_distance_of_a_shifted_copy_is_the_squared_shift():
    """Equal covariances: FD = |mu_a - mu_b|^2 exactly (the trace terms cancel); identical sets give 0."""
    a = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    assert abs(frechet_distance(a, a)) < 1e-8
    assert frechet_distance(a, a + 0.5) == pytest.approx(0.25 * 8, rel=1e-6)


def test_mmd_matches_its_definition():
    """The unbiased MMD^2 with the cubic kernel, written out as sums over pairs."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    k = lambda x, y: (x @ y / 3 + 1) ** 3  # noqa: E731
    pairs = lambda s: sum(k(s[i], s[j]) for i in range(5) for j in range(5) if i != j) / 20  # noqa: E731
    ref = pairs(a) + pairs(b) - 2 * sum(k(x, y) for x in a for y in b) / 25
    assert mmd2_unbiased(a, b).item() == pytest.approx(ref.item(), rel=1e-12)


def test_kid_is_near_zero_for_one_law_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(600, 8, generator=g), torch.randn(600, 8, generator=g)
    shifted = [kid(a, b + s, g, subsets=3) for s in (0.25, 0.5, 1.0)]
    assert shifted[0] < shifted[1] < shifted[2]
    assert abs(kid(a, b, g, subsets=3)) < 0.05 * shifted[0]  # two draws of one law
    # a set with itself: the unbiased estimator assumes independent sets; its bias, -2 (mean k(x, x) - mean
    # k(x, y)) / n, is small at this n
    assert abs(kid(a, a, g, subsets=3)) < 0.05 * shifted[1]
    with pytest.raises(ValueError, match="at least 2"):
        kid(a[:1], b, g)


def test_clip_score_is_100_times_the_clamped_cosine():
    """Golden values: the same direction 100, 60 degrees apart 50, opposite 0 (clamped); scale does not matter."""
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    text = torch.tensor([[2.0, 0.0], [0.5, 0.75**0.5], [-1.0, 0.0]])
    assert clip_score(image, text) == pytest.approx((100 + 50 + 0) / 3)
    assert clip_score(3 * image, text) == pytest.approx(50)


# -- the local encoders ---------------------------------------------------------------------------
def test_preprocessing_resizes_the_shortest_edge_crops_and_normalises(models):
    """A 50 x 70 image: shortest edge to 36 (DINOv2's processor here), centre crop 32, ImageNet normalisation
    (a constant image stays constant through the antialiased resize)."""
    from pathlib import Path

    from tiny_pipelines import IMAGENET_MEAN, IMAGENET_STD

    pre = Preprocess(Path(models["dinov2"]))
    x = pre(torch.full((2, 3, 50, 70), 0.25))
    assert x.shape == (2, 3, 32, 32)
    expected = (0.25 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(x, expected.view(1, 3, 1, 1).expand_as(x), atol=1e-5)


def test_clip_score_of_the_local_clip_equals_clip_models_own_logits(models):
    """Our image and text embeddings (pooled, projected) give the cosines CLIPModel's forward puts in its logits."""
    from transformers import AutoTokenizer, CLIPModel

    enc = Encoder("eval.clip", models["clip"], text=True)
    images = torch.rand(3, 3, 48, 40, generator=torch.Generator().manual_seed(0))
    prompts = [*PROMPTS, "a red cube on a table"]
    ours = clip_score(enc.images(images), enc.texts(prompts))
    model = CLIPModel.from_pretrained(models["clip"], local_files_only=True).eval()
    tokens = AutoTokenizer.from_pretrained(models["clip"], local_files_only=True)(
        prompts, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                       pixel_values=enc.preprocess(images)).logits_per_image
    cos = logits.diagonal() / model.logit_scale.exp()
    assert ours == pytest.approx((100 * cos.clamp_min(0)).mean().item(), rel=1e-5)
    assert 0 < ours < 100


# -- config and command line ----------------------------------------------------------------------
def _one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and match in err, err


def test_eval_section_is_checked_before_anything_loads(models, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    dry = ["distill", "--preset", "sd15", "--dry-run"]
    _one_line_error(capsys, [*dry, f"eval.clip={tmp_path / 'nope'}"], "eval.clip=")
    _one_line_error(capsys, [*dry, "eval.features=inception"], "needs torchvision")
    _one_line_error(capsys, [*dry, f"eval.clip={models['dinov2']}"], "holds a 'dinov2' model; it takes clip")
    _one_line_error(capsys, [*dry, f"eval.features={tmp_path / 'empty'}"], "holds no config.json")
    _one_line_error(capsys, [*dry, f"eval.real_images={tmp_path / 'empty'}"], "needs eval.features=PATH")
    _one_line_error(capsys, [*dry, f"eval.features={models['dinov2']}", f"eval.real_images={tmp_path / 'empty'}"],
                    "holds 0 image files")
    _one_line_error(capsys, [*dry, "eval.teacher_steps=[]"], "eval.teacher_steps=[] must list distinct")
    _one_line_error(capsys, [*dry, "train.eval_samples=8"], "is measured with local models")
    _one_line_error(capsys, ["distill", "--preset", "digits", "--dry-run", f"eval.clip={models['clip']}"],
                    "is not used by the digits family")
    assert main([*dry, "train.eval_samples=8", f"eval.clip={models['clip']}"]) == 0  # evaluation after training


def test_distill_then_eval_a_tiny_sd15_run(teacher, models, tmp_path, capsys):
    """CLIP score and FID / KID to the teacher (DDIM at 4 steps, CFG) and to real images, after training and again
    with other eval settings; grid.png and report.md."""
    real = tmp_path / "real"
    real.mkdir()
    g = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(g.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)).save(real / f"{i}.png")
    run, (path, prompts) = tmp_path / "run", teacher
    assert main(["distill", "--preset", "sd15", "--teacher", str(path), "--prompts", str(prompts), "--output",
                 str(run), "teacher.resolution=64", "train.batch_size=2", "lora.rank=4", "train.progress=false",
                 "train.iterations=1", "train.eval_samples=4", f"eval.clip={models['clip']}",
                 f"eval.features={models['dinov2']}", f"eval.real_images={real}", "eval.teacher_steps=[2,4]"]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["eval"]["features_kind"] == "dinov2" and m["eval"]["n_real_images"] == 5
    keys = {"clip_score", "fid_vs_teacher", "kid_vs_teacher", "fid_real", "kid_real"}
    assert set(m["student"]) == {"K=1", "K=2", "K=4"} and m["student"]["K=4"]["trained"]
    assert all(set(e) - {"nfe", "trained"} == keys for e in m["student"].values())
    ddim = m["teacher"]["ddim"]
    assert [e["nfe"] for e in ddim.values()] == [4, 8] and set(m["teacher"]) == {"ddim"}
    assert abs(ddim["steps=4"]["fid_vs_teacher"]) < 1e-6  # the yardstick against itself
    assert m["student"]["K=1"]["fid_vs_teacher"] > 1e-4 and m["teacher_law"]["fid_vs_teacher"] > 1e-4
    assert all(0 < e["clip_score"] < 100 for e in [*m["student"].values(), *ddim.values()])
    grid = Image.open(run / "grid.png")
    assert grid.size[0] > 300 and np.asarray(grid.convert("L")).std() > 10
    report = (run / "report.md").read_text()
    assert "| student K=4 | 4 |" in report and "(the yardstick)" in report and "FID to the teacher" in report

    capsys.readouterr()
    assert main(["eval", str(run), "--n", "3", f"eval.features={models['clip']}", "eval.real_images="]) == 0
    assert "teacher law (reference)" in capsys.readouterr().out
    m = json.loads((run / "metrics.json").read_text())
    assert m["n_samples"] == 3 and m["eval"]["features_kind"] == "clip"
    assert set(m["student"]["K=4"]) == {"clip_score", "fid_vs_teacher", "kid_vs_teacher", "nfe", "trained"}
    _one_line_error(capsys, ["eval", str(run), "eval.clip=", "eval.features=", "eval.real_images="],
                    "is measured with local models; name them: tdm eval")
    _one_line_error(capsys, ["eval", str(run), "train.iterations=5"], "takes eval.* settings")
