"""FLUX.1 (dev, schnell): FluxTransformer2DModel (MMDiT + single-stream blocks), CLIP pooled + T5, rectified flow
(TDM-METHOD §1, §5).

Latents are the pipeline's own: 2x2 patches packed into tokens, `(n, (h/2)(w/2), 4c)`, with their image ids; the
network predicts the velocity and sees `timestep = sigma` (the pipeline's `t / 1000`). The resolution-dependent
shift (`use_dynamic_shifting`) is the schedule's (`FlowSchedule.from_config`). FLUX.1-dev is guidance-distilled:
the scale is an input embedding, so its teacher is guided in one call (`EmbeddedGuidance`), and the student and the
fake run at a fixed embedding (`student.guidance_embedding`, default the teacher's scale), which the export records
as the pipeline's `guidance_scale`. schnell has no embedding: two-pass CFG, if any, as for every other family.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ...config import Config
from ...core.denoiser import Denoiser
from ...core.schedules import FlowSchedule
from ...files import read_json
from .base import DiffusersFamily, scheduler_config, vae_shape
from .sd3 import text_only_pipeline


class EmbeddedGuidance(Denoiser):
    """A teacher that takes the guidance scale as an input: the prediction at scale `w` is one call with the
    embedding `w` (the CFG that FLUX.1-dev distilled into it), with no unconditional pass."""

    def guided(self, x_t, t, cond, uncond, w: float, **extra):
        return self(x_t, t, {**cond, "guidance": torch.full((x_t.shape[0],), float(w))}, **extra)


def unpack(latents: torch.Tensor) -> torch.Tensor:
    """Packed tokens `(n, (h/2)(w/2), 4c)` of a square latent -> `(n, c, h, w)` (the pipeline's `_unpack_latents`)."""
    n, seq, ch = latents.shape
    side = math.isqrt(seq)
    z = latents.view(n, side, side, ch // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return z.reshape(n, ch // 4, 2 * side, 2 * side)


def image_ids(side: int, device, dtype) -> torch.Tensor:
    """The pipeline's `_prepare_latent_image_ids`: (0, row, column) of each packed token."""
    i, j = torch.meshgrid(torch.arange(side, device=device), torch.arange(side, device=device), indexing="ij")
    return torch.stack([torch.zeros_like(i), i, j], -1).reshape(-1, 3).to(dtype)


class FluxFamily(DiffusersFamily):
    pipeline_class = "FluxPipeline"
    network_folder = "transformer"
    prediction_type = "flow"
    # Attention projections of both streams (the single-stream blocks' q, k, v included), as for SD3.
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    time_embedding_path = "time_text_embed.timestep_embedder"  # TDM-unify adds K to its output (§6)
    # FluxPipeline reads diffusers' layout; ComfyUI maps it (`transformer.` keys) onto its fused FLUX weights.
    diffusers_reads = ("diffusers",)
    comfyui_reads = ("diffusers",)

    @classmethod
    def check_inputs(cls, cfg: Config, dry: bool = False) -> None:
        super().check_inputs(cfg, dry)
        if not cfg.teacher.path:
            return
        path = Path(cfg.teacher.path)
        _, side = vae_shape(path, cfg.teacher.resolution)
        if side % 2:
            raise ValueError(f"teacher.resolution={cfg.teacher.resolution}: FLUX packs 2x2 latent patches, so the "
                             f"resolution must be a multiple of {2 * cfg.teacher.resolution // side}")
        embeds = read_json(path / cls.network_folder / "config.json").get("guidance_embeds", False)
        if cfg.student.guidance_embedding and not embeds:
            raise ValueError(f"student.guidance_embedding={cfg.student.guidance_embedding}: the transformer in "
                             f"{path} has no guidance embedding (FLUX.1-schnell); remove it")

    @classmethod
    def guided_rows(cls, path: str) -> int:
        return 1 if read_json(Path(path) / cls.network_folder / "config.json").get("guidance_embeds") else 2

    @property
    def guidance_embedding(self) -> float:
        """The student's and the fake's guidance input (the teacher's is each guided call's scale)."""
        return self.cfg.student.guidance_embedding or self.cfg.teacher.guidance

    @property
    def inference_guidance(self) -> float:
        """The exported pipeline's `guidance_scale`: the student's embedding (dev); schnell's pipeline ignores it."""
        return self.guidance_embedding if self.base.config.guidance_embeds else 1.0

    def load_schedule(self, path: Path) -> FlowSchedule:
        return FlowSchedule.from_config(scheduler_config(path), image_seq_len=self.latent_shape()[0])

    @torch.no_grad()
    def encode_prompts(self, path: Path, prompts: list[str], batch_size: int = 32) -> dict[str, torch.Tensor]:
        # FluxPipeline.encode_prompt: T5 at the pipeline's default 512 tokens, CLIP's pooled output. The empty
        # prompt (last) is the unconditional row of two-pass CFG (schnell-like teachers).
        pipe = text_only_pipeline(path, self.pipeline_class, self.dtype).to(self.device)
        emb, pooled = [], []
        for i in range(0, len(prompts), batch_size):
            e, p, _ = pipe.encode_prompt(prompts[i : i + batch_size], None, device=self.device)
            emb.append(e.float().cpu())
            pooled.append(p.float().cpu())
        return {"prompt_embeds": torch.cat(emb), "pooled": torch.cat(pooled)}

    def call(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        n, seq = x_t.shape[:2]
        emb = cond["prompt_embeds"].to(x_t.dtype)
        guidance = None
        if net.config.guidance_embeds:  # float32, as the pipeline passes it
            guidance = cond.get("guidance")
            guidance = torch.full((n,), self.guidance_embedding) if guidance is None else guidance
            guidance = guidance.to(x_t.device, torch.float32)
        # the pipeline passes `scheduler.timesteps / 1000` (float32; never bf16, which would round 999 to 1000)
        return net(hidden_states=x_t, timestep=t.to(torch.float32) / 1000, guidance=guidance,
                   encoder_hidden_states=emb, pooled_projections=cond["pooled"].to(x_t.dtype),
                   txt_ids=emb.new_zeros(emb.shape[1], 3), img_ids=image_ids(math.isqrt(seq), x_t.device, emb.dtype),
                   ).sample

    def latent_shape(self) -> tuple[int, ...]:
        c, side = vae_shape(self.path, self.cfg.teacher.resolution)
        return ((side // 2) ** 2, 4 * c)

    def wrap(self, net) -> Denoiser:
        if net.adapter is None and net.base is self.base and self.base.config.guidance_embeds:
            return EmbeddedGuidance(net, self.schedule, self.prediction_type)
        return super().wrap(net)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return super().decode(unpack(latents))

    @staticmethod
    def probe_cond(net_config, n: int) -> dict[str, torch.Tensor]:
        """Meta tensors shaped like `call`'s conditions for n rows (tdm.estimate's memory probe): 512 T5 tokens."""
        return {"prompt_embeds": torch.empty(n, 512, net_config.joint_attention_dim, device="meta"),
                "pooled": torch.empty(n, net_config.pooled_projection_dim, device="meta")}
