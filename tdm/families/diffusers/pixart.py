"""PixArt-alpha: a DiT (PixArtTransformer2DModel) on T5 embeddings with attention masks, learned sigma."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from .base import DiffusersFamily, vae_shape

MAX_SEQUENCE_LENGTH = 120  # PixArtAlphaPipeline's default max_sequence_length for T5


@functools.cache
def lora_capable_transformer() -> type:
    """PixArtTransformer2DModel with diffusers' PeftAdapterMixin (add_adapter, set_adapter, fuse_lora, ...).

    diffusers 0.42 gives PixArt's transformer no PEFT mixin (SD3's, Flux's have one), and the LoRA
    machinery of `DiffusersFamily` and `export` calls those methods. The subclass keeps the stock class
    name and module, so `save_pretrained` (config `_class_name`, model_index.json) still writes a stock
    PixArtTransformer2DModel folder.
    """
    from diffusers import PixArtTransformer2DModel
    from diffusers.loaders.peft import PeftAdapterMixin

    base = PixArtTransformer2DModel
    return type(base.__name__, (base, PeftAdapterMixin),
                {"__module__": base.__module__, "__qualname__": base.__qualname__})


class PixArtFamily(DiffusersFamily):
    pipeline_class = "PixArtAlphaPipeline"
    network_folder = "transformer"
    learned_sigma = True  # out_channels = 2 * latent channels: [eps, variance]; Denoiser keeps the first half (§1)
    # Attention (self and cross) and the feed-forward of every block; the adaLN-single / caption
    # projection stay frozen.
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
    time_embedding_path = "adaln_single.emb.timestep_embedder"  # TDM-unify adds K to its output (§6)
    # The 'diffusers' export is peft's adapter folder (no LoRA loader on the pipeline); ComfyUI's PixArt key map
    # reads its `base_model.model.*` keys. No stock loader reads a kohya PixArt file.
    diffusers_reads = ("diffusers",)
    comfyui_reads = ("diffusers",)
    # Stock scheduler for export (tdm/export/scheduler.py): PixArtAlphaPipeline takes `step(...)[1]` when it
    # runs ONE step, and DPM-Solver's step returns a 1-tuple; Euler's returns (prev_sample, x0) and is as exact
    # for PixArt's (non zero-SNR) schedule. Read by `inference_spec` once export.py consults it.
    vp_scheduler = "euler"

    @property
    def network_class(self):
        return lora_capable_transformer()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The 1024 px model (sample_size 128) takes micro-conditions; the stock pipeline passes the
        # (binned) pixel height/width and their ratio, i.e. for our square resolution r: (r, r) and 1.0.
        # The 256/512 px models take none (added_cond_kwargs values None).
        if self.base.use_additional_conditions:
            r = float(self.cfg.teacher.resolution)
            n = self.embeddings["prompt_embeds"].shape[0]
            self.embeddings["resolution"] = torch.tensor([r, r], device=self.device).expand(n, 2)
            self.embeddings["aspect_ratio"] = torch.ones(n, 1, device=self.device)

    @torch.no_grad()
    def encode_prompts(self, path: Path, prompts: list[str], batch_size: int = 32) -> dict[str, torch.Tensor]:
        """The stock `PixArtAlphaPipeline.encode_prompt` on a text-only pipeline: T5 at 120 tokens with the
        attention mask. Its caption preprocessing is the one `pipe(prompt)` applies by default (clean_caption
        when bs4 and ftfy are installed, else lower-casing), so training sees inference's conditioning. The
        empty prompt (last) is exactly the stock pipeline's CFG negative (negative_prompt="")."""
        from diffusers import PixArtAlphaPipeline
        from diffusers.utils import is_bs4_available, is_ftfy_available

        pipe = PixArtAlphaPipeline.from_pretrained(path, transformer=None, vae=None, local_files_only=True,
                                                   dtype=self.dtype).to(self.device)
        clean = is_bs4_available() and is_ftfy_available()  # what clean_caption=True falls back to, minus the warning
        embeds, masks = [], []
        for i in range(0, len(prompts), batch_size):
            e, m, _, _ = pipe.encode_prompt(prompts[i : i + batch_size], do_classifier_free_guidance=False,
                                            device=self.device, clean_caption=clean,
                                            max_sequence_length=MAX_SEQUENCE_LENGTH)
            embeds.append(e.float().cpu())
            masks.append(m.cpu())
        return {"prompt_embeds": torch.cat(embeds), "prompt_attention_mask": torch.cat(masks)}

    def call(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        added = {k: cond[k].to(x_t.dtype) if k in cond else None for k in ("resolution", "aspect_ratio")}
        return net(x_t, encoder_hidden_states=cond["prompt_embeds"].to(x_t.dtype),
                   encoder_attention_mask=cond["prompt_attention_mask"], timestep=t,
                   added_cond_kwargs=added, return_dict=False)[0]

    def latent_shape(self) -> tuple[int, ...]:
        c, side = vae_shape(self.path, self.cfg.teacher.resolution)
        return (c, side, side)

    @staticmethod
    def probe_cond(net_config, n: int) -> dict[str, torch.Tensor]:
        """Meta tensors shaped like `call`'s conditions for n rows (tdm.estimate's memory probe); the
        micro-conditions exist where the transformer uses them (the 1024 px model, as in __init__)."""
        cond = {"prompt_embeds": torch.empty(n, MAX_SEQUENCE_LENGTH, net_config.caption_channels, device="meta"),
                "prompt_attention_mask": torch.empty(n, MAX_SEQUENCE_LENGTH, dtype=torch.int64, device="meta")}
        extra = net_config.use_additional_conditions
        if extra or extra is None and net_config.sample_size == 128:  # diffusers' default
            cond.update(resolution=torch.empty(n, 2, device="meta"), aspect_ratio=torch.empty(n, 1, device="meta"))
        return cond
