"""Stable Diffusion 1.x / 2.x: UNet2DConditionModel, one CLIP text encoder, eps or v prediction."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .base import DiffusersFamily, vae_shape


class SD15Family(DiffusersFamily):
    pipeline_class = "StableDiffusionPipeline"
    network_folder = "unet"
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")

    @torch.no_grad()
    def encode_prompts(self, path: Path, prompts: list[str], batch_size: int = 32) -> dict[str, torch.Tensor]:
        from transformers import CLIPTextModel, CLIPTokenizer

        tok = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
        enc = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True,
                                            dtype=self.dtype).to(self.device).eval()
        out = []
        for i in range(0, len(prompts), batch_size):
            ids = tok(prompts[i : i + batch_size], padding="max_length", max_length=tok.model_max_length,
                      truncation=True, return_tensors="pt").input_ids
            out.append(enc(ids.to(self.device))[0].float().cpu())
        return {"prompt_embeds": torch.cat(out)}

    def call(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        return net(x_t, t, encoder_hidden_states=cond["prompt_embeds"].to(x_t.dtype)).sample

    def latent_shape(self) -> tuple[int, ...]:
        c, side = vae_shape(self.path, self.cfg.teacher.resolution)
        return (c, side, side)

    @staticmethod
    def probe_cond(net_config, n: int) -> dict[str, torch.Tensor]:
        """Meta tensors shaped like `call`'s conditions for n rows (tdm.estimate's memory probe)."""
        return {"prompt_embeds": torch.empty(n, 77, net_config.cross_attention_dim, device="meta")}
