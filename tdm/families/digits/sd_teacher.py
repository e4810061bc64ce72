"""The `digits-sd` teacher: a tiny text-to-image Stable Diffusion pipeline trained on the digits.

Images are the 8x8 digits repeated to 16x16 grey RGB (so 2x2 average pooling gives the digit back
exactly), a 2-block `AutoencoderKL` maps them to 4x8x8 latents, a frozen random `CLIPTextModel`
reads prompts such as "a handwritten digit seven" through a CLIP BPE tokenizer built here from the
prompt words, and a `UNet2DConditionModel` learns eps-prediction on the latents (10% empty prompts
for CFG). `train_sd_teacher` saves a `StableDiffusionPipeline` folder that stock diffusers loads.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ...scheduler_config import vp_schedule
from .data import DigitsSplit

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# A few phrasings per class; `{w}` is the number word, `{d}` the numeral.
PHRASINGS = ("a handwritten digit {w}", "the number {w}", "{w}, written by hand", "the digit {d}")
MAX_TOKENS = 16                  # prompts are short: 16 positions instead of CLIP's 77

VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 16,
    "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2,
    "block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 8,
}
TEXT_CONFIG = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
               "max_position_embeddings": MAX_TOKENS, "hidden_act": "quick_gelu"}
UNET_CONFIG = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),  # attention at 4x4, 2x2
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (32, 48, 48), "layers_per_block": 1, "norm_num_groups": 16,
    "attention_head_dim": 4, "cross_attention_dim": TEXT_CONFIG["hidden_size"],
}
# Stable Diffusion 1.5's own training scheduler.
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                    "beta_schedule": "scaled_linear", "set_alpha_to_one": False, "steps_offset": 1,
                    "skip_prk_steps": True, "prediction_type": "epsilon"}
RECIPE = {"vae_steps": 1500, "vae_lr": 2e-3, "kl_weight": 1e-4, "steps": 4000, "batch_size": 128, "lr": 1e-3,
          "ema": 0.999, "p_uncond": 0.1, "seed": 0}


def digit_prompts(label: int) -> list[str]:
    return [p.format(w=WORDS[label], d=label) for p in PHRASINGS]


def prompt_label(prompt: str) -> int:
    """The digit a prompt names (its number word or numeral); a clear error otherwise."""
    found = {d for d in range(10) for tok in prompt.lower().replace(",", " ").split() if tok in (WORDS[d], str(d))}
    if len(found) != 1:
        raise ValueError(f"prompt {prompt!r} must name exactly one digit (zero..nine or 0..9) for the digits-sd "
                         "classifier; fix the prompt file given as data.prompts")
    return found.pop()


def to_image(x: torch.Tensor) -> torch.Tensor:
    """8x8 digits in [-1, 1] -> 16x16 grey RGB in [-1, 1] (each pixel repeated 2x2)."""
    return x.repeat_interleave(2, -1).repeat_interleave(2, -2).expand(-1, 3, -1, -1)


def to_digit(image: torch.Tensor) -> torch.Tensor:
    """16x16 RGB in [-1, 1] -> 8x8 grey in [-1, 1] for the classifier: the inverse of `to_image`."""
    return nn.functional.avg_pool2d(image.float().mean(1, keepdim=True), 2).clamp(-1, 1)


# -- tokenizer and text encoder ------------------------------------------------------------
def build_tokenizer(output: str | Path):
    """A CLIP BPE tokenizer whose merges spell every word of the prompts (CLIP's layout: 256 byte
    tokens, the same with '</w>', the merges, then <|startoftext|>, <|endoftext|>); saved to `output`."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    b2u = bytes_to_unicode()
    words = sorted({w for d in range(10) for p in digit_prompts(d) for w in p.replace(",", " , ").split()})
    merges = []
    for word in words:  # left to right: ((w o) r) d</w>
        symbols = [b2u[b] for b in word.encode()]
        symbols[-1] += "</w>"
        for s in symbols[1:]:
            merge = (symbols[0], s)
            if merge not in merges:
                merges.append(merge)
            symbols[0] += s
    vocab = list(b2u.values()) + [u + "</w>" for u in b2u.values()] + ["".join(m) for m in merges]
    vocab = list(dict.fromkeys(vocab)) + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as d:
        Path(d, "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
        Path(d, "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        tok = CLIPTokenizer.from_pretrained(d, local_files_only=True, model_max_length=MAX_TOKENS)
    tok.save_pretrained(output)
    config = json.loads((Path(output) / "tokenizer_config.json").read_text())
    for key in ("is_local", "local_files_only"):  # from_pretrained's arguments, echoed back by transformers 5
        config.pop(key, None)
    (Path(output) / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return CLIPTokenizer.from_pretrained(output, local_files_only=True)


def build_text_encoder(tok, seed: int):
    """A frozen CLIP text encoder with random weights: prompts map to distinct embeddings, and the UNet
    learns to read them."""
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                            **TEXT_CONFIG)).eval().requires_grad_(False)


@torch.no_grad()
def encode(tok, text_encoder, prompts: list[str]) -> torch.Tensor:
    """`prompt_embeds` exactly as StableDiffusionPipeline computes them (last hidden state, padded)."""
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    return text_encoder(ids)[0]


# -- training ------------------------------------------------------------------------------
def _cosine(opt, steps: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))


def _curve(losses: list[float]) -> list[list[float]]:
    """[step, mean loss over the window ending there] every 100 steps (every tenth of a short run)."""
    every = min(100, max(1, len(losses) // 10))
    return [[i + every, round(sum(losses[i:i + every]) / len(losses[i:i + every]), 5)]
            for i in range(0, len(losses), every)]


def train_vae(images: torch.Tensor, steps: int, lr: float, kl_weight: float, batch_size: int,
              generator: torch.Generator, progress: bool = True):
    """L1 reconstruction plus a small KL to N(0, I); returns the VAE (with `scaling_factor` = 1 / the
    latents' std, as Stable Diffusion's) and its loss curve."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = _cosine(opt, steps)
    losses = []
    for _ in tqdm(range(steps), desc="digits-sd VAE", disable=not progress):
        x = images[torch.randint(0, len(images), (batch_size,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        loss = (vae.decode(z).sample - x).abs().mean() + kl_weight * posterior.kl().mean() / z[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = torch.cat([vae.encode(b).latent_dist.mean for b in images.split(256)])
    vae.register_to_config(scaling_factor=round(1.0 / z.std().item(), 5))
    return vae, _curve(losses)


def train_unet(latents: torch.Tensor, std: torch.Tensor, embeds: torch.Tensor, prompt_of: torch.Tensor,
               steps: int, batch_size: int, lr: float, ema: float, p_uncond: float,
               generator: torch.Generator, progress: bool = True):
    """Eps-prediction on scaled latents `z = mean + std * n` at uniform integer t (DDPM, §1), with the
    prompt dropped to the empty one (the last row of `embeds`) at rate `p_uncond`; returns the EMA UNet."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**UNET_CONFIG)
    unet_ema = copy.deepcopy(unet).requires_grad_(False)
    schedule = vp_schedule(SCHEDULER_CONFIG)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    sched = _cosine(opt, steps)
    losses = []
    bar = tqdm(range(steps), desc="digits-sd UNet", disable=not progress)
    for step in bar:
        idx = torch.randint(0, len(latents), (batch_size,), generator=generator)
        z0 = latents[idx] + std[idx] * torch.randn(latents[idx].shape, generator=generator)
        p = prompt_of[idx, torch.randint(0, prompt_of.shape[1], (batch_size,), generator=generator)]
        p[torch.rand(batch_size, generator=generator) < p_uncond] = len(embeds) - 1
        t = torch.randint(0, schedule.T, (batch_size,), generator=generator)
        eps = torch.randn(z0.shape, generator=generator)
        loss = ((unet(schedule.add_noise(z0, eps, t), t, encoder_hidden_states=embeds[p]).sample - eps) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for p_ema, p_net in zip(unet_ema.parameters(), unet.parameters()):
                p_ema.lerp_(p_net, 1 - ema)
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    return unet_ema.eval(), _curve(losses)


def train_sd_teacher(split: DigitsSplit, output: str | Path, progress: bool = True, **recipe) -> dict:
    """Tokenizer, text encoder, VAE, then UNet on the training split; saves the pipeline folder
    (with `prompts.txt`, the prompts it was trained on) and returns the log."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    r = {**RECIPE, **recipe}
    output = Path(output)
    g = torch.Generator().manual_seed(r["seed"])
    with torch.random.fork_rng(devices=[]):  # module init draws from the global RNG
        torch.manual_seed(r["seed"])
        tok = build_tokenizer(output / "tokenizer")
        text_encoder = build_text_encoder(tok, r["seed"])
        images = to_image(split.train_x)
        t0 = time.perf_counter()
        vae, vae_curve = train_vae(images, r["vae_steps"], r["vae_lr"], r["kl_weight"], r["batch_size"], g, progress)
        with torch.no_grad():
            posterior = [vae.encode(b).latent_dist for b in images.split(256)]
            recon_l1 = (vae.decode(torch.cat([q.mean for q in posterior])).sample - images).abs().mean().item()
        t1 = time.perf_counter()
        s = vae.config.scaling_factor
        mean, std = torch.cat([q.mean for q in posterior]) * s, torch.cat([q.std for q in posterior]) * s
        prompts = [p for d in range(10) for p in digit_prompts(d)]
        embeds = encode(tok, text_encoder, prompts + [""])
        prompt_of = torch.arange(len(prompts)).view(10, len(PHRASINGS))[split.train_y]  # each image's prompts
        unet, unet_curve = train_unet(mean, std, embeds, prompt_of, r["steps"], r["batch_size"], r["lr"], r["ema"],
                                      r["p_uncond"], g, progress)
        t2 = time.perf_counter()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet,
                                   scheduler=PNDMScheduler(**SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(output)
    (output / "prompts.txt").write_text("\n".join(prompts) + "\n")
    log = {"recipe": r, "vae": {"loss_curve": vae_curve, "recon_l1": round(recon_l1, 5), "scaling_factor": s,
                    "wall_s": round(t1 - t0, 1)},
           "unet": {"loss_curve": unet_curve, "loss_first": unet_curve[0][1], "loss_last": unet_curve[-1][1],
                     "wall_s": round(t2 - t1, 1)}, "threads": torch.get_num_threads()}
    (output / "teacher.json").write_text(json.dumps(log, indent=2))
    return log
