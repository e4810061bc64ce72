"""Wan 2.1 text-to-video (1.3B, 14B): WanTransformer3DModel, one UMT5, rectified flow (TDM-METHOD §1, §5).

Latents are 5-D, `(B, C, F_lat, H/8, W/8)` with channels BEFORE frames (the pipeline's layout; TDM acts per
sample, so nothing else is video-specific). The network predicts the velocity `v = eps - x0` at
`timestep = 1000 * sigma`, as SD3's; the time shift is the teacher scheduler's `flow_shift` (UniPC, as Wan ships)
or `shift` (flow-match Euler). WanPipeline calls `scheduler.set_timesteps(num_inference_steps)` with no sigmas, so
the export's stock scheduler makes the student's grid from K alone: the 'linear' grid (tdm.export.scheduler).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ...core.schedules import FlowSchedule
from ...files import read_json
from .base import DiffusersFamily, scheduler_config, vae_shape
from .sd3 import t5_prompt_embeds


class WanFamily(DiffusersFamily):
    pipeline_class = "WanPipeline"
    network_folder = "transformer"
    prediction_type = "flow"
    # self- and cross-attention projections (diffusers' Wan LoRA training recipe)
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    time_embedding_path = "condition_embedder.time_embedder"  # TDM-unify adds K to its output (§6)
    # WanPipeline.load_lora_weights reads diffusers' keys; ComfyUI's Wan LoRA map is not checked here.
    diffusers_reads = ("diffusers",)
    comfyui_reads = ()
    comfyui_note = "ComfyUI's Wan LoRA key map is not checked against this export; load it with diffusers."
    max_sequence_length = 512  # WanPipeline's default: UMT5 states, zero past each prompt's tokens

    @classmethod
    def check_inputs(cls, cfg, dry: bool = False) -> None:
        """The diffusers checks, and a frame count the VAE maps to whole latent frames (4k + 1)."""
        super().check_inputs(cfg, dry)
        if not cfg.teacher.path:
            return
        temporal = 2 ** sum(read_json(Path(cfg.teacher.path) / "vae" / "config.json")["temperal_downsample"])
        if (cfg.teacher.frames - 1) % temporal:
            raise ValueError(f"teacher.frames={cfg.teacher.frames}: Wan takes {temporal}k + 1 frames (e.g. 9, 81)")
        vae_shape(Path(cfg.teacher.path), cfg.teacher.width or cfg.teacher.resolution, "teacher.width")

    def load_schedule(self, path: Path) -> FlowSchedule:
        config = scheduler_config(path)
        name = config.get("_class_name")
        if name == "UniPCMultistepScheduler" and config.get("use_flow_sigmas"):
            shift = config.get("flow_shift", 1.0)
        elif name == "FlowMatchEulerDiscreteScheduler":
            shift = config.get("shift", 1.0)
        else:
            raise ValueError(f"{path}/scheduler holds a {name} without flow sigmas; Wan 2.1 ships "
                             "UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=...)")
        if config.get("use_dynamic_shifting") or config.get("shift_terminal") or config.get("invert_sigmas"):
            raise ValueError("Wan family: dynamic shifting / shift_terminal / invert_sigmas are not supported")
        return FlowSchedule(shift=shift, num_train_timesteps=config.get("num_train_timesteps", 1000))

    @torch.no_grad()
    def encode_prompts(self, path: Path, prompts: list[str], batch_size: int = 32) -> dict[str, torch.Tensor]:
        # WanPipeline.encode_prompt itself (the empty prompt is its default negative prompt, encoded the same way)
        return t5_prompt_embeds(self, path, prompts, batch_size)

    def call(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        # t is 1000 * sigma, float32 as the flow-match scheduler's timesteps (never bf16, which rounds 999)
        return net(hidden_states=x_t, timestep=t.to(torch.float32),
                   encoder_hidden_states=cond["prompt_embeds"].to(x_t.dtype)).sample

    def _normalised(self, z: torch.Tensor) -> torch.Tensor:
        """Training latents -> the VAE's, as WanPipeline does before decoding (per-channel mean and std)."""
        c = self.vae.config
        mean = torch.tensor(c.latents_mean).view(1, c.z_dim, 1, 1, 1).to(z)
        std = torch.tensor(c.latents_std).view(1, c.z_dim, 1, 1, 1).to(z)
        return z * std + mean

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, F_lat, h, w) -> (B, 3, H, W) in [0, 1]: the video's FIRST frame. The causal VAE decodes latent
        frame by latent frame, the first to the first frame alone, so decoding it alone is exact."""
        z = self._normalised(latents[:, :, :1].to(self.device, self.dtype))
        return torch.cat([(self.vae.decode(zi[None]).sample[:, :, 0] / 2 + 0.5).clamp(0, 1).float().cpu() for zi in z])

    @torch.no_grad()
    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, F_lat, h, w) -> (B, F, 3, H, W): every frame in [0, 1], one video at a time, float32 on the CPU."""
        out = []
        for z in latents:
            video = self.vae.decode(self._normalised(z[None].to(self.device, self.dtype))).sample[0]
            out.append((video.transpose(0, 1) / 2 + 0.5).clamp(0, 1).float().cpu())
        return torch.stack(out)

    def latent_shape(self) -> tuple[int, ...]:
        # teacher.resolution is the height, teacher.width the width (0: square)
        t = self.cfg.teacher
        c, h = vae_shape(self.path, t.resolution)
        w = vae_shape(self.path, t.width or t.resolution, "teacher.width")[1]
        p = self.base.config.patch_size
        for key, side in (("teacher.resolution", h), ("teacher.width", w)):
            if side % p[1]:
                raise ValueError(f"{key}: latent side {side} is not a multiple of the transformer's patch {p[1]}; "
                                 f"use a multiple of {8 * p[1]} px")
        temporal = 2 ** sum(read_json(self.path / "vae" / "config.json")["temperal_downsample"])
        return (c, (t.frames - 1) // temporal + 1, h, w)  # the pipeline's num_latent_frames

    @classmethod
    def probe_cond(cls, net_config, n: int) -> dict[str, torch.Tensor]:
        """Meta tensors shaped like `call`'s conditions for n rows (tdm.estimate's memory probe)."""
        return {"prompt_embeds": torch.empty(n, cls.max_sequence_length, net_config.text_dim, device="meta")}

    @classmethod
    def inference_scheduler(cls, train_config: dict, grid) -> dict:
        """WanPipeline passes no sigmas: the stock scheduler must make the grid from K (tdm.export.scheduler)."""
        from ...export.scheduler import flow_steps_scheduler

        return flow_steps_scheduler(train_config, grid)
