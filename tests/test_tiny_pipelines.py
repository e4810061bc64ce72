"""The tiny offline pipeline folders of tests/tiny_pipelines.py load and run like real ones."""

import importlib
import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")  # building the T5 tokenizers trains a SentencePiece model...
pytest.importorskip("google.protobuf")  # ...and transformers 5 needs protobuf to convert it

from diffusers import DiffusionPipeline  # noqa: E402
from tiny_pipelines import FAMILIES, PROMPTS, make_sd15  # noqa: E402

# Pipeline call arguments at 64 x 64 px (latent grid 8 x 8) and the latent shape each returns.
CALLS = {
    "sd15": (dict(height=64, width=64), (1, 4, 8, 8)),
    "sdxl": (dict(height=64, width=64), (1, 4, 8, 8)),
    "pixart": (dict(height=64, width=64, use_resolution_binning=False), (1, 4, 8, 8)),
    "sd3": (dict(height=64, width=64), (1, 16, 8, 8)),
    "cogvideox": (dict(height=64, width=64, num_frames=9), (1, 3, 16, 8, 8)),  # (B, F_lat, C, h, w)
    "wan": (dict(height=64, width=64, num_frames=9), (1, 16, 3, 8, 8)),  # (B, C, F_lat, h, w)
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=list(FAMILIES))
def built(request, tmp_path_factory):
    """(family name, folder, pipeline loaded back from the folder), one build per family."""
    name = request.param
    builder, _ = FAMILIES[name]
    path = builder(tmp_path_factory.mktemp(name))
    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return name, path, pipe


def _tokenizers(pipe):
    return [(s, getattr(pipe, "tokenizer" + s)) for s in ("", "_2", "_3") if getattr(pipe, "tokenizer" + s, None)]


def test_folder_loads_as_pipeline_and_components(built):
    name, path, pipe = built
    assert type(pipe).__name__ == FAMILIES[name][1]
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == FAMILIES[name][1]
    loaded = 0
    for sub, spec in index.items():
        if sub.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        cls = getattr(importlib.import_module(spec[0]), spec[1])
        comp = cls.from_pretrained(path, subfolder=sub, local_files_only=True)
        assert type(comp).__name__ == type(getattr(pipe, sub)).__name__ == spec[1]
        loaded += 1
    assert loaded >= 5
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 5 * 2**20, f"{name} folder is {size / 2**20:.1f} MiB"


def test_tokenizers_are_real_vocabularies(built):
    name, _, pipe = built
    toks = _tokenizers(pipe)
    assert toks
    for suffix, tok in toks:
        assert len(tok) > 256, (suffix, len(tok))
        a, b = (tok(p).input_ids for p in PROMPTS)
        assert a != b
        assert tok.unk_token_id not in tok(PROMPTS[0], add_special_tokens=False).input_ids
        enc = getattr(pipe, "text_encoder" + suffix)
        assert enc.config.vocab_size >= len(tok)
        ids = tok(list(PROMPTS), padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = enc(ids)[0]
        assert torch.isfinite(hidden).all()
        assert not torch.allclose(hidden[0], hidden[1])  # different prompts, different conditioning


def test_encode_prompt_shapes(built):
    """The text conditioning shapes the teacher adapters rely on (B = 1, with CFG negatives)."""
    name, _, pipe = built
    p = PROMPTS[0]
    with torch.no_grad():
        if name == "sd15":
            emb, neg = pipe.encode_prompt(p, "cpu", 1, True)
            assert emb.shape == neg.shape == (1, 77, 32)
        elif name == "sdxl":
            emb, neg, pooled, neg_pooled = pipe.encode_prompt(p, device="cpu")
            assert emb.shape == neg.shape == (1, 77, 32 + 48)
            assert pooled.shape == neg_pooled.shape == (1, 40)
            time_ids = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), emb.dtype, text_encoder_projection_dim=40)
            assert time_ids.shape == (1, 6)
            assert pipe.unet.add_embedding.linear_1.in_features == 40 + 6 * pipe.unet.config.addition_time_embed_dim
        elif name == "pixart":
            emb, mask, neg, neg_mask = pipe.encode_prompt(p, device="cpu", clean_caption=False)
            assert emb.shape == neg.shape == (1, 120, 32)
            assert mask.shape == neg_mask.shape == (1, 120)
            n_tokens = len(pipe.tokenizer(p).input_ids)  # incl. </s>
            assert mask.sum().item() == n_tokens and mask[0, :n_tokens].all()
        elif name == "sd3":
            emb, neg, pooled, neg_pooled = pipe.encode_prompt(p, p, p, device="cpu")
            assert emb.shape == neg.shape == (1, 77 + 256, 96)
            assert pooled.shape == neg_pooled.shape == (1, 32 + 40)
            assert torch.all(emb[:, :77, 32 + 48 :] == 0)  # CLIP features zero-padded to T5's width
        elif name == "cogvideox":
            emb, neg = pipe.encode_prompt(p, device="cpu")
            assert emb.shape == neg.shape == (1, 226, 32)
        elif name == "wan":
            emb, neg = pipe.encode_prompt(p, device="cpu")  # UMT5 at WanPipeline's default 226 tokens
            assert emb.shape == neg.shape == (1, 226, 32)
        assert torch.isfinite(emb).all()


def test_two_step_sampling(built):
    name, _, pipe = built
    kwargs, shape = CALLS[name]
    out = pipe(PROMPTS[1], num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0),
               **kwargs)
    latents = out[0]
    assert tuple(latents.shape) == shape
    assert torch.isfinite(latents).all()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_builds_are_byte_identical_and_leave_rng_alone(name, tmp_path):
    builder, _ = FAMILIES[name]
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = builder(tmp_path / "a")
    assert torch.equal(torch.rand(3), expected)
    b = builder(tmp_path / "b")  # another temp dir: no build path may leak into the files
    files = sorted(f.relative_to(a) for f in a.rglob("*") if f.is_file())
    assert files == sorted(f.relative_to(b) for f in b.rglob("*") if f.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_sd2_like_v_prediction(tmp_path):
    path = make_sd15(tmp_path / "sd2", prediction_type="v_prediction")
    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    latents = pipe(PROMPTS[0], num_inference_steps=2, output_type="latent", height=64, width=64).images
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()
