"""Network configs written in code, and a local diffusers pipeline folder around any of them.

    from networks import MEDIUM_UNET, write_pipeline
    write_pipeline("/tmp/medium", "sd15", MEDIUM_UNET)   # then: tdm distill --preset sd15 --teacher /tmp/medium

The network has random weights at its real size; the VAE (x8 downsampling, the network's latent
channels) and the text encoders (as wide as the network's cross-attention or caption input, one thin
layer) are tiny, so a folder is quick to write and the trainer runs on it unchanged. Nothing is downloaded;
the tokenizers come from tests/tiny_pipelines.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

# SD1.5's UNet at a fifth of its width: 37.5M parameters, 32x32 latents (256 px).
MEDIUM_UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [64, 128, 256, 256],
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
}

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json: 2.57B parameters, 128x128 latents (1024 px).
SDXL_UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # pooled 1280 + 6 time ids x 256
    "norm_num_groups": 32,
}

# PixArt-alpha/PixArt-XL-2-512x512, transformer (diffusers' scripts/convert_pixart_alpha_to_diffusers.py):
# DiT-XL/2, 28 blocks of width 1152 = 16 heads x 72, T5-XXL captions (4096), 64x64 latents (512 px); 0.61B.
PIXART_XL_2_512 = {
    "_class_name": "PixArtTransformer2DModel",
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 28,
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "cross_attention_dim": 1152,
    "caption_channels": 4096,
    "patch_size": 2,
    "attention_bias": True,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
}


def _clip(tok, hidden: int, projection: int | None = None):
    """One thin CLIP layer of the given width (the width is what the network sees)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=8, max_position_embeddings=77, projection_dim=projection or hidden,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _t5(tok, width: int):
    """One thin T5 encoder layer of the given width (two 8-wide heads, a 32-wide gated feed-forward)."""
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=(len(tok) + 7) // 8 * 8, d_model=width, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                   relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                   eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)
    return T5EncoderModel(cfg).eval()


def _vae(latent_channels: int):
    """AutoencoderKL with 4 blocks (x8 downsampling, as every SD-family VAE) at tiny width."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8,
                         latent_channels=latent_channels, scaling_factor=0.18215).eval()


def write_pipeline(path, family: str, network: dict, seed: int = 0, dtype: torch.dtype = torch.float32,
                   weights: bool = True) -> Path:
    """A complete local pipeline folder ('sd15', 'sdxl' or 'pixart') around `network` (a config dict);
    `weights=False` writes the configs and tokenizers only, enough for `tdm distill --dry-run`."""
    import contextlib

    from accelerate import init_empty_weights

    path = Path(path)
    torch.manual_seed(seed)
    with init_empty_weights() if not weights else contextlib.nullcontext():
        pipe = _pipeline(family, network, dtype)
    if weights:
        pipe.save_pretrained(path)
        return path
    pipe.save_config(path)
    for name, part in pipe.components.items():
        if hasattr(part, "save_config"):        # diffusers models and schedulers
            part.save_config(path / name)
        elif hasattr(part, "config"):           # transformers models
            part.config.save_pretrained(path / name)
        elif part is not None:                  # tokenizers
            part.save_pretrained(path / name)
    return path


def _pipeline(family: str, network: dict, dtype: torch.dtype):
    import diffusers
    from diffusers import DDIMScheduler, EulerDiscreteScheduler
    from tiny_pipelines import make_clip_tokenizer, make_t5_tokenizer

    config = {k: v for k, v in network.items() if k != "_class_name"}
    net = torch.nn.Module.to(getattr(diffusers, network["_class_name"])(**config), dtype).eval()  # no diffusers warning
    vae = _vae(network["in_channels"])
    betas = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    if family == "sd15":
        tok = make_clip_tokenizer()
        pipe = diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=_clip(tok, network["cross_attention_dim"]), tokenizer=tok, unet=net,
            scheduler=DDIMScheduler(**betas, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    elif family == "sdxl":
        pooled = network["projection_class_embeddings_input_dim"] - 6 * network["addition_time_embed_dim"]
        width_2 = network["cross_attention_dim"] - 768  # the two encoders' hidden states are concatenated
        tok, tok_2 = make_clip_tokenizer(), make_clip_tokenizer(pad_token="!")
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=vae, text_encoder=_clip(tok, 768), text_encoder_2=_clip(tok_2, width_2, projection=pooled),
            tokenizer=tok, tokenizer_2=tok_2, unet=net,
            scheduler=EulerDiscreteScheduler(**betas, timestep_spacing="leading", steps_offset=1),
            force_zeros_for_empty_prompt=True, add_watermarker=False)
    elif family == "pixart":
        tok = make_t5_tokenizer()
        pipe = diffusers.PixArtAlphaPipeline(
            tokenizer=tok, text_encoder=_t5(tok, network["caption_channels"]), vae=vae, transformer=net,
            scheduler=diffusers.DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear"))
    else:
        raise ValueError(f"write_pipeline knows 'sd15', 'sdxl' and 'pixart', not {family!r}")
    return pipe


def parameters(network: dict) -> int:
    """Parameter count of a network config, built on the meta device."""
    import diffusers
    from accelerate import init_empty_weights

    with init_empty_weights():
        net = getattr(diffusers, network["_class_name"])(**{k: v for k, v in network.items() if k != "_class_name"})
    return sum(p.numel() for p in net.parameters())


# name: (tdm preset, network config, resolution in pixels)
NETWORKS = {
    "medium": ("sd15", MEDIUM_UNET, 256),
    "sdxl": ("sdxl", SDXL_UNET, 1024),
    "pixart-xl": ("pixart-512", PIXART_XL_2_512, 512),
}
