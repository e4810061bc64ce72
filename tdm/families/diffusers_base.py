"""What every diffusers teacher family shares: local loading, cached prompts, LoRA or full students.

A family subclass says only what is its own: which pipeline components encode prompts, how the
network is called (`call`), its latent shape, its default LoRA targets (TDM-METHOD §1 for the
parameterisations). In LoRA mode one frozen base carries two adapters, 'student' and 'fake'; the
teacher is the same base with adapters disabled, so the big network is held once.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from ..config import Config
from ..denoiser import Denoiser
from ..prompts import cached_embeddings, read_prompts
from ..schedules import Schedule, VPSchedule

ROLES = ("student", "fake")


def scheduler_config(path: Path) -> dict:
    return json.loads((path / "scheduler" / "scheduler_config.json").read_text())


def vae_shape(path: Path, resolution: int) -> tuple[int, int]:
    """Latent channels and side from the VAE config (one 2x downsampling per block after the first)."""
    vae = json.loads((path / "vae" / "config.json").read_text())
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    if resolution % factor:
        raise ValueError(f"teacher.resolution={resolution} is not a multiple of the VAE factor {factor}")
    return vae["latent_channels"], resolution // factor


def select_adapter(base: nn.Module, adapter: str | None) -> None:
    """Route the base through one adapter, or none (the teacher), keeping every LoRA weight trainable.

    peft toggles `requires_grad` when switching adapters; the graph of a role that was switched away
    from must still receive its gradients, so the flags are restored.
    """
    if adapter is None:
        base.disable_adapters()
    else:
        base.enable_adapters()
        base.set_adapter(adapter)
    for name, p in base.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)


class RoleNet(nn.Module):
    """`net(x_t, t, cond)` of one role: the base through `adapter` (None = teacher) via `family.call`."""

    def __init__(self, family: "DiffusersFamily", base: nn.Module, adapter: str | None):
        super().__init__()
        self.base = base
        self.adapter = adapter
        self._call = family.call

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict, **extra) -> torch.Tensor:
        if extra:
            raise ValueError(f"diffusers teachers take no extra conditioning yet, got {sorted(extra)}")
        self.activate()
        return self._call(self.base, x_t, t, cond)

    def activate(self) -> None:
        """Route the shared base through this role. The trainer calls it again before this role's
        backward: gradient checkpointing recomputes the forward then, after other roles ran."""
        if getattr(self.base, "_hf_peft_config_loaded", False):
            select_adapter(self.base, self.adapter)

    def trainable_parameters(self) -> list[nn.Parameter]:
        if self.adapter is None:
            return [p for p in self.base.parameters() if p.requires_grad]
        return list(self._adapter_params().values())

    def _adapter_params(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.base.named_parameters() if f".{self.adapter}." in n}

    # A LoRA role's weights are its adapter alone: checkpoints and `student.safetensors` then hold
    # megabytes, not a copy of the base per role.
    def state_dict(self, *args, **kwargs):
        if self.adapter is None:
            return super().state_dict(*args, **kwargs)
        return {n: p.detach() for n, p in self._adapter_params().items()}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self.adapter is None:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        params = self._adapter_params()
        missing, unexpected = sorted(set(params) - set(state_dict)), sorted(set(state_dict) - set(params))
        if missing or unexpected:  # a LoRA role restores all of its adapter or nothing
            raise KeyError(f"adapter '{self.adapter}' weights do not match: {len(missing)} missing, "
                           f"{len(unexpected)} unexpected (different lora.rank or lora.targets?)")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state_dict[n])
        return nn.modules.module._IncompatibleKeys([], [])


class DiffusersFamily:
    """Base class; subclasses set the class attributes and implement the four hooks below."""

    conditional = True
    teacher_steps = (4, 8, 25, 50)
    student_eval_Ks = ()
    network_folder = "unet"              # subfolder of the denoising network
    prediction_type = "epsilon"          # default when the scheduler config does not say
    learned_sigma = False                # PixArt-alpha: extra variance channels, dropped by Denoiser (§1)
    vp_scheduler = "dpm"                 # exported stock scheduler (tdm.export_scheduler); PixArt: 'euler'
    lora_targets: tuple[str, ...] = ()   # default LoRA target modules

    # -- hooks ---------------------------------------------------------------------------
    @property
    def network_class(self) -> type:
        """The diffusers class the teacher folder names (a family overrides it only to add behaviour)."""
        import diffusers

        return getattr(diffusers, json.loads((self.path / self.network_folder / "config.json").read_text())["_class_name"])

    def load_schedule(self, path: Path) -> Schedule:
        """VP teachers: betas and prediction type from the folder's scheduler config (§1)."""
        config = scheduler_config(path)
        self.prediction_type = config.get("prediction_type", self.prediction_type)
        return VPSchedule.from_config(config)

    def encode_prompts(self, path: Path, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Load the text encoders, encode all prompts (the empty prompt last), free the encoders."""
        raise NotImplementedError

    def call(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        raise NotImplementedError

    def latent_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    # -- shared machinery -----------------------------------------------------------------
    def __init__(self, cfg: Config, device: torch.device | str = "cpu", run_dir: str | Path | None = None):
        if cfg.student.unify:
            raise ValueError("TDM-unify's K embedding is not wired into diffusers networks yet")
        if cfg.optim.ema > 0 and cfg.lora.enabled:
            raise ValueError("optim.ema would copy the whole base in LoRA mode; not supported yet")
        if cfg.train.teacher_offload and cfg.lora.enabled:
            raise ValueError("train.teacher_offload is for full mode: in LoRA mode the teacher is the shared base")
        if not cfg.teacher.path:
            raise ValueError("set teacher.path (or --teacher PATH) to a local diffusers folder")
        self.cfg = cfg
        self.device = torch.device(device)
        self.path = Path(cfg.teacher.path)
        if not (self.path / "model_index.json").exists():
            raise FileNotFoundError(f"{self.path} is not a diffusers pipeline folder (no model_index.json)")
        self.schedule = self.load_schedule(self.path)
        self.base = self.network_class.from_pretrained(self.path, subfolder=self.network_folder,
                                                       local_files_only=True).to(self.device)
        self.base.requires_grad_(False)
        if cfg.train.gradient_checkpointing:
            self.base.enable_gradient_checkpointing()
        if cfg.lora.enabled:
            self._add_lora_adapters()
        self.teacher = self.wrap(RoleNet(self, self.base, None))
        prompts = read_prompts(cfg.data.prompts, cfg.data.max_prompt_chars)
        cache = Path(run_dir) if run_dir is not None else self.path
        emb = cached_embeddings(prompts, lambda p: self.encode_prompts(self.path, p), cache,
                                key=f"{self.path.resolve()}:{type(self).__name__}")
        self.embeddings = {k: v.to(self.device) for k, v in emb.items()}
        self.prompts = prompts

    def _add_lora_adapters(self) -> None:
        from peft import LoraConfig

        lc = self.cfg.lora
        targets = lc.targets or list(self.lora_targets)
        for role in ROLES:
            self.base.add_adapter(LoraConfig(r=lc.rank, lora_alpha=lc.alpha, target_modules=targets,
                                             init_lora_weights="gaussian"), adapter_name=role)

    def sample_shape(self, n: int) -> tuple[int, ...]:
        return (n, *self.latent_shape())

    def _cond(self, idx: torch.Tensor) -> dict:
        return {k: v[idx] for k, v in self.embeddings.items()}

    def sample_cond(self, n: int, generator: torch.Generator):
        """Prompt embeddings of `n` random prompts, and the empty prompt's for CFG."""
        idx = torch.randint(0, len(self.prompts), (n,), generator=generator).to(self.device)
        return self._cond(idx), self._cond(torch.full_like(idx, len(self.prompts)))

    eval_cond = sample_cond

    # -- networks -----------------------------------------------------------------------
    def pretrained_net(self, path=None, generator=None) -> nn.Module:
        return self.base

    def student_and_fake(self, base: nn.Module) -> tuple[RoleNet, RoleNet]:
        """LoRA: two views of the one base. Full: two trainable copies (the teacher stays frozen)."""
        if self.cfg.lora.enabled:
            return RoleNet(self, base, "student"), RoleNet(self, base, "fake")
        nets = tuple(RoleNet(self, copy.deepcopy(base).requires_grad_(True), None) for _ in ROLES)
        if self.cfg.train.teacher_offload:
            from accelerate import cpu_offload

            cpu_offload(base, execution_device=self.device)  # weights to the device per forward, then back
        return nets

    def new_net(self) -> nn.Module:
        return self.base

    def wrap(self, net: RoleNet) -> Denoiser:
        return Denoiser(net, self.schedule, self.prediction_type, learned_sigma=self.learned_sigma)

    # -- previews -------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1] with the teacher's VAE (loaded on first use, kept on the CPU)."""
        if not hasattr(self, "_vae"):
            from diffusers import AutoencoderKL

            self._vae = AutoencoderKL.from_pretrained(self.path, subfolder="vae", local_files_only=True).eval()
        vae = self._vae
        z = latents.float().cpu() / vae.config.scaling_factor + (vae.config.get("shift_factor") or 0.0)
        with torch.no_grad():
            return (vae.decode(z).sample / 2 + 0.5).clamp(0, 1)

    def preview(self, student: Denoiser, grid_of, path: Path, n_prompts: int = 4, Ks=(1, 2, 4)) -> torch.Tensor:
        """Fixed prompts and noise, the student at each K, decoded: one row per K; returns the image (3, H, W)."""
        from ..samplers import sample_student

        g = torch.Generator().manual_seed(0)
        n = min(n_prompts, len(self.prompts))
        x_T = torch.randn(self.sample_shape(n), generator=g).to(self.device)
        cond = self._cond(torch.arange(n, device=self.device))
        rows = [self.decode(sample_student(student, x_T, grid_of(K), cond)) for K in Ks]
        image = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)   # K rows x n prompts
        from PIL import Image

        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(path)
        return image
