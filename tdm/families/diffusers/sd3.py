"""Stable Diffusion 3 / 3.5: SD3Transformer2DModel (MMDiT), CLIP x2 + T5, rectified flow (TDM-METHOD §1, §5).

The network predicts the velocity `v = eps - x0` and sees `timestep = 1000 * sigma` (diffusers' axis, which
is also our `t`, see tdm.core.schedules); `Schedule.to_x0_eps(..., "flow")` converts it (§1).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ...core.schedules import FlowSchedule
from .base import DiffusersFamily, scheduler_config, vae_shape

# A diffusers SD3 block's linears by their names in the original MMDiT (`joint_blocks.{i}.` + name), the names of
# sd-scripts' SD3 LoRAs and of ComfyUI's model; q, k and v are one fused linear there (slot 0, 1, 2 of `qkv`).
MMDIT_NAMES = {
    "attn.to_q": ("x_block.attn.qkv", 0), "attn.to_k": ("x_block.attn.qkv", 1), "attn.to_v": ("x_block.attn.qkv", 2),
    "attn.add_q_proj": ("context_block.attn.qkv", 0), "attn.add_k_proj": ("context_block.attn.qkv", 1),
    "attn.add_v_proj": ("context_block.attn.qkv", 2),
    "attn2.to_q": ("x_block.attn2.qkv", 0), "attn2.to_k": ("x_block.attn2.qkv", 1),
    "attn2.to_v": ("x_block.attn2.qkv", 2),  # SD3.5's second attention
    "attn.to_out.0": ("x_block.attn.proj", None), "attn.to_add_out": ("context_block.attn.proj", None),
    "attn2.to_out.0": ("x_block.attn2.proj", None),
    "ff.net.0.proj": ("x_block.mlp.fc1", None), "ff.net.2": ("x_block.mlp.fc2", None),
    "ff_context.net.0.proj": ("context_block.mlp.fc1", None), "ff_context.net.2": ("context_block.mlp.fc2", None),
}


def text_only_pipeline(path: Path, pipeline_class: str, dtype: torch.dtype, skip=("transformer", "vae")):
    """The teacher's own pipeline without its big network and VAE, so prompts are encoded by the
    pipeline's `encode_prompt` itself, bit for bit as inference will encode them."""
    import diffusers

    cls = getattr(diffusers, pipeline_class)
    return cls.from_pretrained(path, local_files_only=True, dtype=dtype, **{name: None for name in skip})


@torch.no_grad()
def t5_prompt_embeds(family, path: Path, prompts: list[str], batch_size: int) -> dict[str, torch.Tensor]:
    """`prompt_embeds` from the pipeline's own `encode_prompt` for pipelines with one T5-like encoder and no mask
    (CogVideoX, Wan), padded to the family's `max_sequence_length`."""
    pipe = text_only_pipeline(path, family.pipeline_class, family.dtype).to(family.device)
    out = []
    for i in range(0, len(prompts), batch_size):
        e, _ = pipe.encode_prompt(prompts[i : i + batch_size], do_classifier_free_guidance=False,
                                  max_sequence_length=family.max_sequence_length, device=family.device)
        out.append(e.float().cpu())
    return {"prompt_embeds": torch.cat(out)}


class SD3Family(DiffusersFamily):
    pipeline_class = "StableDiffusion3Pipeline"
    network_folder = "transformer"
    prediction_type = "flow"
    # Attention projections of the image and text streams (diffusers' SD3 DreamBooth-LoRA targets).
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    time_embedding_path = "time_text_embed.timestep_embedder"  # TDM-unify adds K to its output (§6)

    # diffusers 0.42 loads no kohya-layout SD3 LoRA; ComfyUI maps diffusers' SD3 names and the MMDiT ones.
    diffusers_reads = ("diffusers",)
    comfyui_reads = ("diffusers", "kohya")

    @classmethod
    def kohya_state_dict(cls, lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """sd-scripts' SD3 layout, `lora_unet_joint_blocks_{i}_x_block_attn_qkv`, which ComfyUI and sd-scripts read.
        The MMDiT's q, k, v are one linear, so their LoRAs become one of rank r_q + r_k + r_v: `down`
        stacked, `up` block-diagonal, as sd-scripts saves its split-qkv LoRAs (exact). `alpha` = that rank: every
        loader applies it at scale 1, alpha / rank being folded into `up` already."""
        groups: dict[str, dict] = {}
        for key, w in lora.items():
            m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)\.lora_([AB])\.weight", key)
            if m is None or m.group(2) not in MMDIT_NAMES:
                raise ValueError(f"SD3 kohya export: the LoRA on {key.rsplit('.lora_', 1)[0]} (lora.targets) has no "
                                 "name in sd-scripts' MMDiT layout; export --format diffusers, which diffusers and "
                                 "ComfyUI read")
            name, slot = MMDIT_NAMES[m.group(2)]
            groups.setdefault(f"lora_unet_joint_blocks_{m.group(1)}_{name.replace('.', '_')}", {})[slot, m.group(3)] = w
        out = {}
        for name, parts in groups.items():
            slots = sorted({s for s, _ in parts}, key=lambda s: -1 if s is None else s)
            down = torch.cat([parts[s, "A"] for s in slots])
            if slots == [None]:
                up = parts[None, "B"]
            else:  # rows of q, k and v are equally many; a projection without a LoRA keeps zero rows
                rows = parts[slots[0], "B"].shape[0]
                up, col = down.new_zeros(3 * rows, down.shape[0]), 0
                for s in slots:
                    r = parts[s, "A"].shape[0]
                    up[s * rows : (s + 1) * rows, col : col + r] = parts[s, "B"]
                    col += r
            out |= {f"{name}.lora_down.weight": down.contiguous(), f"{name}.lora_up.weight": up.contiguous(),
                    f"{name}.alpha": torch.tensor(float(down.shape[0]))}
        return out

    def load_schedule(self, path: Path) -> FlowSchedule:
        config = scheduler_config(path)
        # Resolution-dependent shifting (FLUX-style `mu`) or a stretched terminal would make the teacher's
        # schedule differ from FlowSchedule(shift); SD3 and SD3.5 use neither.
        if config.get("use_dynamic_shifting") or config.get("shift_terminal") or config.get("invert_sigmas"):
            raise ValueError("SD3 family: dynamic shifting / shift_terminal / invert_sigmas are not supported")
        return FlowSchedule(shift=config.get("shift", 1.0), num_train_timesteps=config.get("num_train_timesteps", 1000))

    @torch.no_grad()
    def encode_prompts(self, path: Path, prompts: list[str], batch_size: int = 32) -> dict[str, torch.Tensor]:
        # StableDiffusion3Pipeline.encode_prompt: both CLIPs' hidden_states[-2] concatenated and zero-padded
        # to T5's width (77 tokens) + 256 T5 tokens; pooled = both CLIP projections concatenated. The empty
        # prompt (last) is encoded the same way, as the pipeline encodes its default negative prompt "".
        pipe = text_only_pipeline(path, self.pipeline_class, self.dtype).to(self.device)
        if pipe.text_encoder_3 is None:  # the pipeline would need the transformer's config to zero-fill T5
            raise ValueError(f"{path} has no text_encoder_3 (T5); SD3 without T5 is not supported")
        emb, pooled = [], []
        for i in range(0, len(prompts), batch_size):
            e, _, p, _ = pipe.encode_prompt(prompts[i : i + batch_size], None, None, device=self.device,
                                            do_classifier_free_guidance=False)
            emb.append(e.float().cpu())
            pooled.append(p.float().cpu())
        return {"prompt_embeds": torch.cat(emb), "pooled": torch.cat(pooled)}

    def call(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        # t is already 1000 * sigma, as the pipeline passes `scheduler.timesteps` (float32; never bf16,
        # which would round 999 to 1000).
        return net(hidden_states=x_t, timestep=t.to(torch.float32),
                   encoder_hidden_states=cond["prompt_embeds"].to(x_t.dtype),
                   pooled_projections=cond["pooled"].to(x_t.dtype)).sample

    def latent_shape(self) -> tuple[int, ...]:
        c, side = vae_shape(self.path, self.cfg.teacher.resolution)
        patch = self.base.config.patch_size
        if side % patch:  # the pipeline requires height % (vae factor * patch) == 0
            raise ValueError(f"teacher.resolution={self.cfg.teacher.resolution}: latent side {side} is not a "
                             f"multiple of the transformer's patch size {patch}")
        return (c, side, side)

    @staticmethod
    def probe_cond(net_config, n: int) -> dict[str, torch.Tensor]:
        """Meta tensors shaped like `call`'s conditions for n rows (tdm.estimate's memory probe): 77 CLIP
        tokens then the pipeline's 256 T5 tokens."""
        return {"prompt_embeds": torch.empty(n, 77 + 256, net_config.joint_attention_dim, device="meta"),
                "pooled": torch.empty(n, net_config.pooled_projection_dim, device="meta")}
