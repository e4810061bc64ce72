"""Tiny but structurally faithful diffusers pipeline folders, built offline for tests.

Each ``make_*(path)`` writes a complete pipeline folder with ``pipe.save_pretrained(path)`` and returns
``Path(path)``. The folders load exactly like real local model folders::

    DiffusionPipeline.from_pretrained(path, local_files_only=True)
    UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)

Nothing is downloaded: every config lives in this file, the CLIP tokenizers are byte-level BPE
tokenizers whose merges are learned here from an in-code corpus, and the T5 tokenizers are
SentencePiece unigram models trained here on the same corpus. Weights are random but deterministic
(``torch.manual_seed`` inside ``torch.random.fork_rng``, so the caller's RNG state is untouched), and a
rebuild is byte-identical. Building needs diffusers, transformers, sentencepiece and protobuf.

Layout and shapes at a glance (B = batch before CFG doubling; every latent grid is H/8 x W/8 and the
models' sample sizes make 64 x 64 px the default resolution):

- ``sd15``: StableDiffusionPipeline; unet, vae (4 latent channels), text_encoder (CLIPTextModel,
  hidden 32), tokenizer (CLIP, 77 tokens), scheduler (PNDM for epsilon, DDIM for v_prediction);
  safety_checker / feature_extractor / image_encoder are None. prompt_embeds (B, 77, 32) =
  last_hidden_state; latents (B, 4, 8, 8).
- ``sdxl``: StableDiffusionXLPipeline; text_encoder (CLIPTextModel, hidden 32) + text_encoder_2
  (CLIPTextModelWithProjection, hidden 48, projection 40), tokenizer + tokenizer_2 (pads with "!");
  prompt_embeds (B, 77, 80) = cat of both encoders' hidden_states[-2]; pooled (B, 40) =
  text_encoder_2 text_embeds; add_time_ids (B, 6); unet add_embedding input 40 + 6 * 8 = 88;
  EulerDiscreteScheduler; latents (B, 4, 8, 8).
- ``pixart``: PixArtAlphaPipeline; text_encoder (T5EncoderModel, d_model 32), tokenizer (T5);
  prompt_embeds (B, 120, 32) with prompt_attention_mask (B, 120); transformer out_channels 8
  (learned sigma: the first 4 channels are epsilon); no micro-conditions (sample_size != 128), and
  sample_size 8 has no aspect-ratio bin, so call the pipeline with ``use_resolution_binning=False``;
  DPMSolverMultistepScheduler with linear betas; latents (B, 4, 8, 8).
- ``sd3``: StableDiffusion3Pipeline; text_encoder / text_encoder_2 (CLIPTextModelWithProjection,
  hidden 32 / 48, projection 32 / 40), text_encoder_3 (T5EncoderModel, d_model 96); prompt_embeds
  (B, 77 + 256, 96) = cat(zero-pad(cat(CLIP hidden_states[-2]), 96), T5); pooled (B, 72);
  FlowMatchEulerDiscreteScheduler(shift=3.0); vae with 16 latent channels, scaling 1.5305, shift
  0.0609; latents (B, 16, 8, 8).
- ``cogvideox``: CogVideoXPipeline; text_encoder (T5EncoderModel, d_model 32); prompt_embeds
  (B, 226, 32); AutoencoderKLCogVideoX (16 latent channels, x4 temporal); CogVideoXDDIMScheduler
  (v_prediction, zero-terminal-SNR, snr_shift_scale 3); latents (B, F_lat, 16, 8, 8) -- frames
  BEFORE channels -- with F_lat = (F - 1) // 4 + 1, e.g. 9 frames -> 3.
- ``wan``: WanPipeline (Wan 2.1 T2V); text_encoder (UMT5EncoderModel, d_model 32); prompt_embeds
  (B, 512, 32), zero past each prompt's tokens; AutoencoderKLWan (16 latent channels, x4 temporal,
  latents_mean / latents_std); UniPCMultistepScheduler (flow_prediction, flow_shift 3, as Wan 2.1 ships);
  latents (B, 16, F_lat, 8, 8) -- channels BEFORE frames -- e.g. 9 frames -> 3.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections import Counter
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__all__ = [
    "FAMILIES",
    "PROMPTS",
    "make_clip_tokenizer",
    "make_t5_tokenizer",
    "make_sd15",
    "make_sdxl",
    "make_pixart",
    "make_sd3",
    "make_cogvideox",
    "make_wan",
]

SEED = 0

# Two prompts that must tokenize differently (used by the tests; handy for adapters' tests too).
PROMPTS = ("a photo of a cat sitting on a red chair", "An astronaut riding a horse on the moon, 4k")

# ---------------------------------------------------------------------------------------------
# In-code corpus shared by both tokenizers: prompt-like English, upper and lower case, digits and
# punctuation, so that ordinary prompts encode to real pieces rather than <unk>.
# ---------------------------------------------------------------------------------------------
_SUBJECTS = (
    "cat dog horse bird fish astronaut robot woman man child girl boy dragon castle house city "
    "tree flower forest mountain lake river ocean beach car train ship bicycle chair table cup "
    "apple banana cake pizza teapot clock book lamp window door street bridge tower moon sun "
    "star sky cloud rain snow fire portrait landscape painting photo picture drawing sketch"
).split()
_ADJECTIVES = (
    "red blue green yellow black white orange purple pink brown golden silver small big tiny huge "
    "old young happy sad beautiful ugly bright dark cute scary fluffy shiny wooden glass metal "
    "ancient modern futuristic cozy quiet busy foggy sunny rainy snowy colorful detailed realistic"
).split()
_VERBS = (
    "sitting standing running jumping flying swimming riding eating drinking reading sleeping "
    "walking playing looking holding wearing dancing singing painting floating glowing"
).split()
_PLACES = (
    "on a chair|in a garden|on the moon|at the beach|in the city|under a tree|in the snow|"
    "on a table|in space|by the lake|in a forest|on a mountain|at night|at sunset|in the rain|"
    "inside a house|next to a window|on the street|over the ocean|in a field of flowers"
).split("|")
_STYLES = (
    "digital art|oil painting|watercolor|pencil sketch|studio lighting|highly detailed|4k|8k|"
    "trending on artstation|cinematic|photorealistic|anime style|unreal engine|35mm film|"
    "by Greg Rutkowski|in the style of Van Gogh|HDR|octane render|award winning|soft focus"
).split("|")
_EXTRA = (
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG! "
    "0 1 2 3 4 5 6 7 8 9 10 100 2024 3.5 1/2 50% #1 @home & (a) [b] {c} <d> \"e\" 'f' g? h; i: j- "
    "k_ l+ m= n* o~ p| q\\ r^ s` t$ Zebra Quiz Jazz Xylophone Yak Vortex Kite"
)
_CORPUS_CACHE: list[str] | None = None


def _corpus() -> list[str]:
    global _CORPUS_CACHE
    if _CORPUS_CACHE is None:
        rng = random.Random(SEED)
        lines = [_EXTRA]  # PROMPTS deliberately left out: they must tokenize without being seen
        for _ in range(600):
            a, s = rng.choice(_ADJECTIVES), rng.choice(_SUBJECTS)
            art = "an" if a[0] in "aeiou" else "a"
            line = f"{art} {a} {s} {rng.choice(_VERBS)} {rng.choice(_PLACES)}, {rng.choice(_STYLES)}"
            if rng.random() < 0.3:
                line = line[0].upper() + line[1:]
            lines.append(line)
        _CORPUS_CACHE = lines
    return _CORPUS_CACHE


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (same order as CLIP's vocab)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _learn_clip_merges(n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE on the lowercase corpus, CLIP-style (words end in '</w>'); deterministic."""
    import regex

    b2u = _bytes_to_unicode()
    pat = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
    words: Counter = Counter()
    for line in _corpus():
        for w in pat.findall(line.lower()):
            sym = [b2u[b] for b in w.encode("utf-8")]
            sym[-1] += "</w>"
            words[tuple(sym)] += 1
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for w, f in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += f
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))  # most frequent, ties broken lexically
        merges.append(best)
        merged: Counter = Counter()
        for w, f in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += f
        words = merged
    return merges


_CLIP_FILES: dict[str, str] | None = None


def _clip_vocab_files() -> dict[str, str]:
    """vocab.json / merges.txt contents in CLIP's layout: 256 bytes, 256 bytes+'</w>', merges,
    then <|startoftext|>, <|endoftext|> (so eos is the largest id, as in real CLIP)."""
    global _CLIP_FILES
    if _CLIP_FILES is None:
        merges = _learn_clip_merges(300)
        vocab = list(_bytes_to_unicode().values())
        vocab += [v + "</w>" for v in vocab]
        vocab += ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        assert len(set(vocab)) == len(vocab)
        _CLIP_FILES = {
            "vocab.json": json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
            "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        }
    return _CLIP_FILES


def make_clip_tokenizer(pad_token: str = "<|endoftext|>", model_max_length: int = 77):
    """A CLIPTokenizer loaded from vocab.json + merges.txt written to a temp dir (as a real SD
    ``tokenizer/`` folder has them). ``pad_token="!"`` mimics SDXL/SD3's second tokenizer."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as d:
        for name, text in _clip_vocab_files().items():
            Path(d, name).write_text(text, encoding="utf-8")
        tok = CLIPTokenizer.from_pretrained(
            d, local_files_only=True, model_max_length=model_max_length, pad_token=pad_token
        )
    _check_tokenizer(tok)
    return tok


def _train_spiece() -> bytes:
    """A SentencePiece unigram model (serialized proto) trained on the corpus. Written through
    model_writer, not model_prefix, so no temp path is recorded in the model's trainer_spec."""
    import io

    import sentencepiece as spm

    spm.set_random_generator_seed(SEED)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_writer=buf,
        model_type="unigram",
        vocab_size=400,
        hard_vocab_limit=False,
        character_coverage=1.0,
        pad_id=0,  # T5 layout: <pad>=0, </s>=1, <unk>=2
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return buf.getvalue()


def make_t5_tokenizer(model_max_length: int = 512):
    """A T5Tokenizer (tokenizers backend) converted from a SentencePiece unigram model trained here;
    like real T5 it has 100 <extra_id_*> sentinels appended after the SentencePiece pieces, and it
    encodes exactly as the SentencePiece model does. Covers ASCII text; other characters are <unk>.
    The ``spiece.model`` bytes are kept on ``tok._tiny_spiece`` so the saved folder can carry them.
    Building needs ``sentencepiece`` and ``protobuf`` (transformers 5 converts the proto); loading a
    saved folder needs neither (it reads tokenizer.json)."""
    from transformers import T5Tokenizer

    model = _train_spiece()
    with tempfile.TemporaryDirectory() as d:
        Path(d, "spiece.model").write_bytes(model)
        tok = T5Tokenizer.from_pretrained(d, local_files_only=True, model_max_length=model_max_length)
    tok._tiny_spiece = model
    _check_tokenizer(tok)
    return tok


def _check_tokenizer(tok) -> None:
    """Guards against the silent trap of a near-empty vocabulary where every prompt maps to unk."""
    n = len(tok)
    if n <= 256:
        raise RuntimeError(f"tiny tokenizer {type(tok).__name__} has only {n} tokens")
    a, b = (tok(p, add_special_tokens=False).input_ids for p in PROMPTS)
    if a == b or tok.unk_token_id in a + b:
        raise RuntimeError(f"tiny tokenizer {type(tok).__name__} does not encode prompts distinctly: {a} {b}")


def _save_tokenizer_sources(path: Path, subfolder: str, tok) -> None:
    """Tidy the saved tokenizer_config.json and add the 'slow' vocabulary files that real model
    folders carry (vocab.json + merges.txt for CLIP, spiece.model for T5); tokenizer.json is what
    transformers 5 actually loads."""
    d = path / subfolder
    cfg_file = d / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only"):  # from_pretrained kwargs echoed back by transformers 5
        cfg.pop(key, None)
    cfg_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if hasattr(tok, "_tiny_spiece"):
        (d / "spiece.model").write_bytes(tok._tiny_spiece)
    else:
        for name, text in _clip_vocab_files().items():
            (d / name).write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Model components
# ---------------------------------------------------------------------------------------------
def _round8(n: int) -> int:
    return (n + 7) // 8 * 8


def _clip_text(tok, hidden: int, projection: int | None = None, act: str = "quick_gelu"):
    """CLIPTextModel (projection=None) or CLIPTextModelWithProjection."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection or hidden,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)
    return model.eval()


def _t5_encoder(tok, d_model: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=_round8(len(tok)),  # embedding rows > len(tokenizer), as in real T5 (32128 vs 32100)
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=d_model // 8,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",  # T5 v1.1 / flan / xxl, as the real teachers use
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )
    return T5EncoderModel(cfg).eval()


def _vae(latent_channels: int = 4, **extra):
    """AutoencoderKL with 4 blocks, i.e. the real x8 spatial factor, at tiny width."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=latent_channels,
        sample_size=64,
        **extra,
    ).eval()


def _sd_scheduler(prediction_type: str):
    from diffusers import DDIMScheduler, PNDMScheduler

    common = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    if prediction_type == "epsilon":  # runwayml/stable-diffusion-v1-5
        return PNDMScheduler(skip_prk_steps=True, **common)
    return DDIMScheduler(clip_sample=False, **common)  # stabilityai/stable-diffusion-2 (768, v-pred)


class _seeded:
    """Deterministic weights without disturbing the caller's global RNG."""

    def __enter__(self):
        self._ctx = torch.random.fork_rng(devices=[])
        self._ctx.__enter__()
        torch.manual_seed(SEED)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _prepare(path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _finish(pipe, path: Path, tokenizers: dict) -> Path:
    pipe.save_pretrained(path)
    for sub, tok in tokenizers.items():
        _save_tokenizer_sources(path, sub, tok)
    return path


# ---------------------------------------------------------------------------------------------
# Families
# ---------------------------------------------------------------------------------------------
def make_sd15(path, prediction_type: str = "epsilon") -> Path:
    """SD1.5-like (``prediction_type="v_prediction"``: SD2-like) StableDiffusionPipeline."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    path = _prepare(path)
    with _seeded():
        tok = make_clip_tokenizer()
        text_encoder = _clip_text(tok, 32)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(16, 32),
            layers_per_block=1,
            attention_head_dim=2,  # diffusers' legacy name: number of heads
            cross_attention_dim=32,
            norm_num_groups=8,
        ).eval()
        vae = _vae(4, scaling_factor=0.18215)
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tok,
            unet=unet,
            scheduler=_sd_scheduler(prediction_type),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return _finish(pipe, path, {"tokenizer": tok})


def make_sdxl(path) -> Path:
    """SDXL-base-like StableDiffusionXLPipeline (two CLIP encoders, text_time conditioning)."""
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    path = _prepare(path)
    with _seeded():
        tok = make_clip_tokenizer()
        tok_2 = make_clip_tokenizer(pad_token="!")  # as SDXL's tokenizer_2 (OpenCLIP pads with '!')
        text_encoder = _clip_text(tok, 32)  # CLIP ViT-L-like: CLIPTextModel
        text_encoder_2 = _clip_text(tok_2, 48, projection=40, act="gelu")  # OpenCLIP bigG-like
        time_dim = 8
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(16, 32),
            layers_per_block=1,
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            cross_attention_dim=32 + 48,  # cat of both encoders' penultimate hidden states
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=40 + 6 * time_dim,  # pooled proj + 6 time ids
            norm_num_groups=8,
        ).eval()
        vae = _vae(4, scaling_factor=0.13025, force_upcast=True)
        scheduler = EulerDiscreteScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            interpolation_type="linear",
            timestep_spacing="leading",
            steps_offset=1,
            prediction_type="epsilon",
        )
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tok,
            tokenizer_2=tok_2,
            unet=unet,
            scheduler=scheduler,
            image_encoder=None,
            feature_extractor=None,
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    return _finish(pipe, path, {"tokenizer": tok, "tokenizer_2": tok_2})


def make_pixart(path) -> Path:
    """PixArt-alpha-like PixArtAlphaPipeline (T5 + DiT with adaLN-single, learned sigma)."""
    from diffusers import (
        DPMSolverMultistepScheduler,
        PixArtAlphaPipeline,
        PixArtTransformer2DModel,
    )

    path = _prepare(path)
    with _seeded():
        tok = make_t5_tokenizer()
        text_encoder = _t5_encoder(tok, 32)
        transformer = PixArtTransformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            out_channels=8,  # learned sigma: [eps, var-interp]
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            cross_attention_dim=16,  # = heads * head_dim
            caption_channels=32,  # = T5 d_model
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
            num_embeds_ada_norm=1000,
            activation_fn="gelu-approximate",
            attention_bias=True,
        ).eval()
        vae = _vae(4, scaling_factor=0.18215)
        scheduler = DPMSolverMultistepScheduler(
            num_train_timesteps=1000,
            beta_start=0.0001,
            beta_end=0.02,
            beta_schedule="linear",
            prediction_type="epsilon",
            algorithm_type="dpmsolver++",
            solver_order=2,
            lower_order_final=True,
        )
        pipe = PixArtAlphaPipeline(
            tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
        )
    return _finish(pipe, path, {"tokenizer": tok})


def make_sd3(path) -> Path:
    """SD3-medium-like StableDiffusion3Pipeline (2x CLIP with projection + T5, MMDiT, flow matching)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    path = _prepare(path)
    with _seeded():
        tok = make_clip_tokenizer()
        tok_2 = make_clip_tokenizer(pad_token="!")
        tok_3 = make_t5_tokenizer()
        text_encoder = _clip_text(tok, 32, projection=32)
        text_encoder_2 = _clip_text(tok_2, 48, projection=40, act="gelu")
        text_encoder_3 = _t5_encoder(tok_3, 96)  # d_model >= 32 + 48: CLIP features are zero-padded to it
        transformer = SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=96,  # = T5 d_model
            caption_projection_dim=16,  # = heads * head_dim
            pooled_projection_dim=32 + 40,  # cat of both CLIP text_embeds
            pos_embed_max_size=16,
        ).eval()
        vae = _vae(16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        pipe = StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tok,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tok_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tok_3,
        )
    return _finish(pipe, path, {"tokenizer": tok, "tokenizer_2": tok_2, "tokenizer_3": tok_3})


def make_cogvideox(path) -> Path:
    """CogVideoX-2B-like CogVideoXPipeline (T5 + 3D full-attention DiT, causal 3D VAE, v-pred DDIM)."""
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    path = _prepare(path)
    with _seeded():
        tok = make_t5_tokenizer(model_max_length=226)
        text_encoder = _t5_encoder(tok, 32)
        transformer = CogVideoXTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=16,
            out_channels=16,
            time_embed_dim=32,
            text_embed_dim=32,  # = T5 d_model
            num_layers=2,
            sample_width=8,  # latent units: 64 px / 8
            sample_height=8,
            sample_frames=9,  # pixel frames: (9 - 1) / 4 + 1 = 3 latent frames
            patch_size=2,
            temporal_compression_ratio=4,
            max_text_seq_length=226,
            spatial_interpolation_scale=1.875,
            temporal_interpolation_scale=1.0,
            use_rotary_positional_embeddings=False,  # 2B uses sincos; 5B uses RoPE
        ).eval()
        vae = AutoencoderKLCogVideoX(
            in_channels=3,
            out_channels=3,
            down_block_types=("CogVideoXDownBlock3D",) * 4,
            up_block_types=("CogVideoXUpBlock3D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            latent_channels=16,
            layers_per_block=1,
            norm_num_groups=8,
            temporal_compression_ratio=4,
            sample_height=64,
            sample_width=64,
            scaling_factor=1.15258426,
        ).eval()
        scheduler = CogVideoXDDIMScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=True,
            steps_offset=0,
            prediction_type="v_prediction",
            timestep_spacing="trailing",
            rescale_betas_zero_snr=True,
            snr_shift_scale=3.0,
        )
        pipe = CogVideoXPipeline(
            tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
        )
    return _finish(pipe, path, {"tokenizer": tok})


def make_flux(path, guidance_embeds: bool = True) -> Path:
    """FLUX.1-dev-like FluxPipeline (CLIP pooled + T5, double- and single-stream blocks, packed latents, flow with
    dynamic shifting); `guidance_embeds=False`: FLUX.1-schnell-like (no guidance embedding, no shifting)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    path = _prepare(path)
    with _seeded():
        tok = make_clip_tokenizer()
        tok_2 = make_t5_tokenizer()
        text_encoder = _clip_text(tok, 32)
        text_encoder_2 = _t5_encoder(tok_2, 48)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,  # 16 latent channels x a 2x2 patch
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=48,  # = T5 d_model
            pooled_projection_dim=32,  # = CLIP's pooled output
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(2, 2, 4),  # sums to attention_head_dim
        ).eval()
        vae = _vae(16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
        dynamic = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                       max_image_seq_len=4096)  # FLUX.1-dev's scheduler config
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0 if guidance_embeds else 1.0,
                                                    **(dynamic if guidance_embeds else {}))
        pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                            text_encoder_2=text_encoder_2, tokenizer_2=tok_2, transformer=transformer)
    return _finish(pipe, path, {"tokenizer": tok, "tokenizer_2": tok_2})


def make_wan(path) -> Path:
    """Wan-2.1-T2V-1.3B-like WanPipeline (UMT5 + 3D DiT with RoPE, causal 3D VAE, flow matching)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    path = _prepare(path)
    with _seeded():
        tok = make_t5_tokenizer(model_max_length=512)
        text_encoder = UMT5EncoderModel(UMT5Config(
            vocab_size=_round8(len(tok)), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
            feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)).eval()
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,  # RoPE splits it into frames 4, height 4, width 4
            in_channels=16,
            out_channels=16,
            text_dim=32,  # = UMT5 d_model
            freq_dim=16,
            ffn_dim=32,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=64,
        ).eval()
        vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                               temperal_downsample=[False, True, True]).eval()
        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                            num_train_timesteps=1000, flow_shift=3.0)
        pipe = WanPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer,
                           scheduler=scheduler)
    return _finish(pipe, path, {"tokenizer": tok})


# name -> (builder, pipeline class name as recorded in model_index.json)
FAMILIES = {
    "sd15": (make_sd15, "StableDiffusionPipeline"),
    "sdxl": (make_sdxl, "StableDiffusionXLPipeline"),
    "pixart": (make_pixart, "PixArtAlphaPipeline"),
    "sd3": (make_sd3, "StableDiffusion3Pipeline"),
    "cogvideox": (make_cogvideox, "CogVideoXPipeline"),
    "wan": (make_wan, "WanPipeline"),
}


# ---------------------------------------------------------------------------------------------
# Tiny image encoders for `tdm eval` (a CLIPModel with its tokenizer, a DINOv2), saved as local folders
# ---------------------------------------------------------------------------------------------
CLIP_MEAN, CLIP_STD = [0.4815, 0.4578, 0.4082], [0.2686, 0.2613, 0.2758]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _processor(path: Path, shortest_edge: int, crop: int, mean, std) -> None:
    """preprocessor_config.json as transformers writes it for CLIP and DINOv2 (resize, centre crop, normalise)."""
    spec = {"do_resize": True, "size": {"shortest_edge": shortest_edge}, "do_center_crop": True,
            "crop_size": {"height": crop, "width": crop}, "do_normalize": True, "image_mean": mean, "image_std": std}
    (path / "preprocessor_config.json").write_text(json.dumps(spec, indent=2))


def make_clip(path) -> Path:
    """A CLIPModel (text hidden 32, vision 32 px in 8 px patches, projection 16) with its tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    path = _prepare(path)
    with _seeded():
        tok = make_clip_tokenizer()
        text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      image_size=32, patch_size=8)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    _processor(path, 32, 32, CLIP_MEAN, CLIP_STD)
    return path


def make_dinov2(path) -> Path:
    """A Dinov2Model (hidden 32, 32 px in 8 px patches), preprocessed as DINOv2's processor does (resize, crop)."""
    from transformers import Dinov2Config, Dinov2Model

    path = _prepare(path)
    with _seeded():
        model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, image_size=32, patch_size=8)).eval()
    model.save_pretrained(path)
    _processor(path, 36, 32, IMAGENET_MEAN, IMAGENET_STD)
    return path
