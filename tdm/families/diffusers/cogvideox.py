"""CogVideoX (2B, 5B): CogVideoXTransformer3DModel, one T5, v-prediction on a zero-SNR VP schedule (TDM-METHOD §1).

Latents are 5-D, `(B, F_lat, C, H/8, W/8)` with frames BEFORE channels (the pipeline's layout). TDM's
schedules, samplers and losses act per sample (`_bcast`, `flatten(1)`), so they need nothing video-specific.
The teacher's schedule is CogVideoX's SNR-shifted (`snr_shift_scale`) zero-terminal-SNR one, which
`vp_schedule` rebuilds exactly as diffusers does; the video LoRA's grid [999, 856, 665, 399]
is the 'shifted' grid with s = 2 (§2, preset `cogvideox-2b`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ...files import read_json
from .base import DiffusersFamily, vae_shape
from .sd3 import t5_prompt_embeds


def rotary_embedding(config, frames: int, height: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D RoPE of CogVideoX 1.0 (5B) for a latent grid, as `CogVideoXPipeline._prepare_rotary_positional_embeddings`
    computes it (`height`, `width` in latent units, i.e. pixels / vae factor)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import (
        get_resize_crop_region_for_grid,
    )

    p = config.patch_size
    grid = (height // p, width // p)
    crops = get_resize_crop_region_for_grid(grid, config.sample_width // p, config.sample_height // p)
    return get_3d_rotary_pos_embed(embed_dim=config.attention_head_dim, crops_coords=crops, grid_size=grid,
                                   temporal_size=frames, device=device)


class CogVideoXFamily(DiffusersFamily):
    pipeline_class = "CogVideoXPipeline"
    network_folder = "transformer"
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' CogVideoX LoRA recipe
    time_embedding_path = "time_embedding"  # TDM-unify adds K to its output (§6)
    # diffusers' CogVideoX loader reads its own keys only, and ComfyUI core has no CogVideoX.
    diffusers_reads = ("diffusers",)
    comfyui_reads = ()
    prediction_type = "v_prediction"  # CogVideoX schedulers' default; the config's value wins
    max_sequence_length = 226  # the pipeline pads T5 tokens to exactly this; the transformer expects it

    @classmethod
    def check_inputs(cls, cfg, dry: bool = False) -> None:
        """The diffusers checks, and a frame count the VAE maps to whole latent frames (4k + 1)."""
        super().check_inputs(cfg, dry)
        if not cfg.teacher.path:
            return
        temporal = read_json(Path(cfg.teacher.path) / "vae" / "config.json").get("temporal_compression_ratio", 4)
        if (cfg.teacher.frames - 1) % temporal:
            raise ValueError(f"teacher.frames={cfg.teacher.frames}: CogVideoX takes {temporal}k + 1 frames "
                             f"(e.g. 9, 49)")

    def __init__(self, *args, **kwargs):
        self._rope: dict = {}
        super().__init__(*args, **kwargs)
        c = self.base.config
        # CogVideoX 1.5 pads latent frames to patch_size_t and uses another RoPE grid; I2V models take an
        # image latent in extra channels. Neither is wired here.
        if c.patch_size_t is not None or c.ofs_embed_dim or c.in_channels != c.out_channels:
            raise ValueError("CogVideoX family: only CogVideoX 1.0 text-to-video (2B, 5B) is supported")

    @torch.no_grad()
    def encode_prompts(self, path: Path, prompts: list[str], batch_size: int = 32) -> dict[str, torch.Tensor]:
        # CogVideoXPipeline.encode_prompt: T5 last hidden state, padded to 226 tokens, no attention mask.
        return t5_prompt_embeds(self, path, prompts, batch_size)

    def _rotary(self, net: nn.Module, x_t: torch.Tensor):
        if not net.config.use_rotary_positional_embeddings:  # 2B: sin-cos positions inside the patch embed
            return None
        key = (*x_t.shape[1:2], *x_t.shape[3:], x_t.device)
        if key not in self._rope:
            self._rope[key] = rotary_embedding(net.config, x_t.shape[1], x_t.shape[3], x_t.shape[4], x_t.device)
        return self._rope[key]

    def call(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        # The pipeline passes integer timesteps; the time embedding casts to float32, so integer-valued
        # float32 t gives the identical embedding (and never bf16, which cannot hold 999).
        return net(hidden_states=x_t, encoder_hidden_states=cond["prompt_embeds"].to(x_t.dtype),
                   timestep=t.to(torch.float32), image_rotary_emb=self._rotary(net, x_t)).sample

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, F_lat, C, h, w) latents -> (B, 3, H, W) in [0, 1]: the video's FIRST frame, exactly as the full decode
        gives it. The VAE decodes latent frames in chunks (causal convs carry a cache forward; GroupNorm spans a
        chunk), so decoding the first chunk alone is exact, at a fraction of the cost of the whole clip."""
        vae = self.vae
        F, chunk = latents.shape[1], vae.num_latent_frames_batch_size
        first = F if F < chunk else chunk + F % chunk  # AutoencoderKLCogVideoX._decode's first chunk
        z = latents[:, :first].to(self.device, self.dtype).permute(0, 2, 1, 3, 4) / vae.config.scaling_factor
        return torch.cat([(vae.decode(zi[None]).sample[:, :, 0] / 2 + 0.5).clamp(0, 1).float().cpu() for zi in z])

    @torch.no_grad()
    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, F_lat, C, h, w) latents -> (B, F, 3, H, W): every frame in [0, 1], one video at a time, as float32 on
        the CPU (`tdm eval`'s frame strips)."""
        vae, out = self.vae, []
        for z in latents:
            z = z[None].to(self.device, self.dtype).permute(0, 2, 1, 3, 4) / vae.config.scaling_factor
            out.append((vae.decode(z).sample[0].transpose(0, 1) / 2 + 0.5).clamp(0, 1).float().cpu())
        return torch.stack(out)

    def latent_shape(self) -> tuple[int, ...]:
        # teacher.resolution is the HEIGHT; the width keeps the teacher's native aspect ratio (CogVideoX-2B/5B:
        # sample 60 x 90 latents, i.e. 480 x 720 px), since the config has a single resolution.
        c, h = vae_shape(self.path, self.cfg.teacher.resolution)
        net = self.base.config
        p = net.patch_size
        w = max(p, round(h * net.sample_width / net.sample_height / p) * p)
        if h % p:
            raise ValueError(f"teacher.resolution={self.cfg.teacher.resolution}: latent height {h} is not a "
                             f"multiple of the transformer's patch size {p}")
        temporal = json.loads((self.path / "vae" / "config.json").read_text()).get("temporal_compression_ratio", 4)
        frames = (self.cfg.teacher.frames - 1) // temporal + 1  # the pipeline's latent_frames
        return (frames, c, h, w)

    @classmethod
    def probe_cond(cls, net_config, n: int) -> dict[str, torch.Tensor]:
        """Meta tensors shaped like `call`'s conditions for n rows (tdm.estimate's memory probe)."""
        return {"prompt_embeds": torch.empty(n, cls.max_sequence_length, net_config.text_embed_dim, device="meta")}
