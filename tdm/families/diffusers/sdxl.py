"""Stable Diffusion XL: UNet2DConditionModel with two CLIP text encoders and text_time micro-conditioning."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .base import DiffusersFamily, vae_shape


class SDXLFamily(DiffusersFamily):
    pipeline_class = "StableDiffusionXLPipeline"
    network_folder = "unet"
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # SDXL's micro-conditioning (orig_h, orig_w, crop_top, crop_left, target_h, target_w), what the
        # stock pipeline builds for an un-cropped square image at its height/width (original = target =
        # size, crop 0). Built here rather than cached with the prompts: it depends on the resolution.
        r = float(self.cfg.teacher.resolution)
        n = next(iter(self.embeddings.values())).shape[0]
        self.embeddings["time_ids"] = torch.tensor([r, r, 0.0, 0.0, r, r], device=self.device).expand(n, 6)

    @torch.no_grad()
    def encode_prompts(self, path: Path, prompts: list[str], batch_size: int = 32) -> dict[str, torch.Tensor]:
        """The stock `StableDiffusionXLPipeline.encode_prompt`, run on a text-only pipeline (no unet, no vae):
        the cat of both encoders' `hidden_states[-2]` (B, 77, d1 + d2) and text_encoder_2's projected
        `text_embeds` (B, d_proj) -- identical to what `pipe(prompt)` feeds the UNet, by construction."""
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(path, unet=None, vae=None, local_files_only=True,
                                                         dtype=self.dtype).to(self.device)
        embeds, pooled = [], []
        for i in range(0, len(prompts), batch_size):
            e, _, p, _ = pipe.encode_prompt(prompts[i : i + batch_size], device=self.device,
                                            do_classifier_free_guidance=False)
            embeds.append(e.float().cpu())
            pooled.append(p.float().cpu())
        out = {"prompt_embeds": torch.cat(embeds), "pooled": torch.cat(pooled)}
        # The empty prompt (last row) is the teacher's unconditional branch (TDM-METHOD §1, CFG). With
        # `force_zeros_for_empty_prompt` (true for SDXL base 1.0) the stock pipeline does not encode "" for
        # CFG: it uses all-zero prompt AND pooled embeddings (SDXL's conditioner dropped text by zeroing it).
        # We match the stock pipeline: "the teacher at CFG w" is what `pipe(prompt, guidance_scale=w)` does.
        force_zeros = json.loads((path / "model_index.json").read_text()).get("force_zeros_for_empty_prompt", True)
        if force_zeros:
            empty = torch.tensor([p == "" for p in prompts])
            for v in out.values():
                v[empty] = 0
        return out

    def call(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        added = {"text_embeds": cond["pooled"].to(x_t.dtype), "time_ids": cond["time_ids"].to(x_t.dtype)}
        return net(x_t, t, encoder_hidden_states=cond["prompt_embeds"].to(x_t.dtype), added_cond_kwargs=added).sample

    def latent_shape(self) -> tuple[int, ...]:
        c, side = vae_shape(self.path, self.cfg.teacher.resolution)
        return (c, side, side)

    @staticmethod
    def probe_cond(net_config, n: int) -> dict[str, torch.Tensor]:
        """Meta tensors shaped like `call`'s conditions for n rows (tdm.estimate's memory probe)."""
        pooled = net_config.projection_class_embeddings_input_dim - 6 * net_config.addition_time_embed_dim
        return {"prompt_embeds": torch.empty(n, 77, net_config.cross_attention_dim, device="meta"),
                "pooled": torch.empty(n, pooled, device="meta"), "time_ids": torch.empty(n, 6, device="meta")}
