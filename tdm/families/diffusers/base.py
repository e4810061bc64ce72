"""What every diffusers teacher family shares: local loading, cached prompts, LoRA or full students.

A family subclass says only what is its own: which pipeline components encode prompts, how the
network is called (`call`), its latent shape, its default LoRA targets (TDM-METHOD §1 for the
parameterisations). In LoRA mode one frozen base carries an adapter per role of the method (`lora.py`); the
teacher is the same base with adapters disabled, so the big network is held once.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from ...config import Config
from ...core.denoiser import Denoiser
from ...core.schedules import Schedule
from ...files import atomic_write, read_json
from ...methods.base import role_names
from ...scheduler_config import vp_schedule
from .. import check_grids
from ..base import Family
from .lora import LoRARoles, RoleNet
from .prompts import cached_embeddings, read_prompts
from .quiet import quiet_loading


def scheduler_config(path: Path) -> dict:
    return read_json(path / "scheduler" / "scheduler_config.json")


def vae_factor(path: Path) -> tuple[int, int]:
    """Latent channels and spatial downsampling from the VAE config (one 2x downsampling per block after the first;
    Wan's VAE: one per `temperal_downsample` entry)."""
    vae = read_json(path / "vae" / "config.json")
    if "z_dim" in vae:  # AutoencoderKLWan
        return vae["z_dim"], 2 ** len(vae["temperal_downsample"])
    return vae["latent_channels"], 2 ** (len(vae["block_out_channels"]) - 1)


def vae_shape(path: Path, resolution: int, key: str = "teacher.resolution") -> tuple[int, int]:
    """Latent channels and side (`vae_factor`); `key` names the field `resolution` came from."""
    channels, factor = vae_factor(path)
    if resolution % factor:
        raise ValueError(f"{key}={resolution} is not a multiple of the VAE factor {factor}; use e.g. "
                         f"{max(factor, resolution // factor * factor)}")
    return channels, resolution // factor


class DiffusersFamily(Family):
    """Base class; subclasses set the class attributes and implement the four hooks below."""

    conditional = True
    network_folder = "unet"              # subfolder of the denoising network
    prediction_type = "epsilon"          # default when the scheduler config does not say
    learned_sigma = False                # PixArt-alpha: extra variance channels, dropped by Denoiser (§1)
    vp_scheduler = "dpm"                 # exported stock scheduler (tdm.export.scheduler); PixArt: 'euler'
    lora_targets: tuple[str, ...] = ()   # default LoRA target modules
    time_embedding_path = "time_embedding"  # the network's TimestepEmbedding, whose output TDM-unify adds K to (§6)
    # Which `tdm export` LoRA files the stock tools read (the model card says so, tests/test_export_formats.py
    # checks it): the pipeline's LoRA loader (PixArt: peft's), and ComfyUI core's LoRA key map (() = no such model).
    diffusers_reads: tuple[str, ...] = ("diffusers", "kohya")
    comfyui_reads: tuple[str, ...] = ("kohya",)
    inference_guidance = 1.0             # the exported pipeline's guidance_scale: CFG is distilled in (FLUX.1-dev:
                                         # the student's guidance embedding)

    # -- hooks ---------------------------------------------------------------------------
    @property
    def network_class(self) -> type:
        """The diffusers class the teacher folder names (a family overrides it only to add behaviour)."""
        import diffusers

        config = json.loads((self.path / self.network_folder / "config.json").read_text())
        return getattr(diffusers, config["_class_name"])

    def load_schedule(self, path: Path) -> Schedule:
        """VP teachers: betas and prediction type from the folder's scheduler config (§1)."""
        config = scheduler_config(path)
        self.prediction_type = config.get("prediction_type", self.prediction_type)
        return vp_schedule(config)

    def encode_prompts(self, path: Path, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Load the text encoders, encode all prompts (the empty prompt last), free the encoders."""
        raise NotImplementedError

    def call(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        raise NotImplementedError

    def latent_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @classmethod
    def kohya_state_dict(cls, lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The student's LoRA (peft keys of the network, alpha / rank folded into lora_B) in the kohya layout: UNets
        keep diffusers' module names (`lora_unet_down_blocks_0_..._to_q`), as diffusers' own converter writes them,
        with `alpha` = rank, so every loader applies it at scale 1."""
        from diffusers.utils import convert_state_dict_to_kohya

        prefixed = {f"{cls.network_folder}.{k}": v for k, v in lora.items()}
        return {k: v.contiguous() for k, v in convert_state_dict_to_kohya(prefixed).items()}

    @classmethod
    def guided_rows(cls, path: str) -> int:
        """Network rows per sample of a guided teacher call: cond and uncond (FLUX.1-dev: one, the embedding)."""
        return 2

    # -- shared machinery -----------------------------------------------------------------
    @classmethod
    def check_inputs(cls, cfg: Config, dry: bool = False) -> None:
        """The teacher folder holds this family's pipeline with readable configs, the resolution fits its VAE, the
        prompts read, and no switch of the other training mode is set. Reads configs and text only; `dry`: teacher
        and prompts are not required (a dry run estimates without them)."""
        if cfg.optim.ema > 0 and cfg.lora.enabled:
            raise ValueError("optim.ema would copy the whole base in LoRA mode; not supported yet (set optim.ema=0, "
                             "or lora.enabled=false)")
        if cfg.train.teacher_offload and cfg.lora.enabled:
            raise ValueError("train.teacher_offload is for full mode (lora.enabled=false): in LoRA mode the teacher "
                             "is the shared base")
        if not cfg.teacher.path and dry:
            return
        if not cfg.teacher.path:
            raise ValueError("no teacher: give --teacher PATH (teacher.path), a local diffusers pipeline folder")
        path = Path(cfg.teacher.path)
        if not (path / "model_index.json").is_file():
            what = "does not exist" if not path.exists() else "is not a diffusers pipeline folder (no model_index.json)"
            raise FileNotFoundError(f"teacher.path={path} {what}; give a folder saved by a diffusers pipeline's "
                                    "save_pretrained")
        kind = read_json(path / "model_index.json").get("_class_name")
        if kind != cls.pipeline_class:
            from ...config import PRESETS
            from .. import DIFFUSERS, family_class

            fits = [name for name, p in PRESETS.items() if p["teacher"].get("family") in DIFFUSERS
                    and family_class(p["teacher"]["family"]).pipeline_class == kind]
            hint = f"use --preset {' or '.join(fits)}" if fits else "no preset takes it"
            raise ValueError(f"teacher.path={path} holds a {kind}, but the {cfg.teacher.family} family takes a "
                             f"{cls.pipeline_class}; {hint}")
        for name in (f"{cls.network_folder}/config.json", "scheduler/scheduler_config.json", "vae/config.json"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"teacher.path={path}: {name} is missing; the pipeline folder is incomplete")
            read_json(path / name)
        vae_shape(path, cfg.teacher.resolution)
        if not cfg.data.prompts and dry:
            return
        if not cfg.data.prompts:
            raise ValueError("no prompts: give --prompts FILE (data.prompts), a text file (one prompt a line), JSONL "
                             "with a 'prompt' field, or a `datasets` folder with a 'prompt' column")
        with warnings.catch_warnings():  # the family reads them again, and warns then
            warnings.simplefilter("ignore")
            read_prompts(cfg.data.prompts, cfg.data.max_prompt_chars)

    def __init__(self, cfg: Config, device: torch.device | str = "cpu", run_dir: str | Path | None = None,
                 dtype: torch.dtype = torch.float32):
        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = dtype                  # frozen networks: base, teacher, text encoders, VAE
        self.path = Path(cfg.teacher.path)
        self.schedule = self.load_schedule(self.path)
        check_grids(cfg, self.schedule)
        # Prompts first: the text encoders (T5-XXL alone holds 9 GiB in bf16) are gone before the network loads.
        prompts = read_prompts(cfg.data.prompts, cfg.data.max_prompt_chars)
        validation = [" ".join(p.split()) for p in cfg.train.validation_prompts]
        cache = Path(run_dir) if run_dir is not None else self.path

        def encode(texts: list[str]) -> dict[str, torch.Tensor]:
            with quiet_loading():
                return self.encode_prompts(self.path, texts)

        # rows: the training prompts, the empty prompt (index len(prompts)), then the validation prompts
        emb = cached_embeddings(prompts, encode, cache, key=f"{self.path.resolve()}:{type(self).__name__}:{dtype}",
                                extra=validation)
        self.embeddings = {k: v.to(self.device) for k, v in emb.items()}
        self.prompts = prompts
        self.validation_prompts = validation
        self.base = self._load_network(dtype)
        self.roles = None
        if cfg.lora.enabled:
            self._add_lora_adapters()
        if not cfg.train.teacher_offload:
            self.base.to(self.device)
        self.teacher = self.wrap(RoleNet(self, self.base, None))

    def _load_network(self, dtype: torch.dtype) -> nn.Module:
        """The teacher's network from its folder, frozen, in `dtype`, on the CPU, with the run's switches."""
        with quiet_loading():
            net = self.network_class.from_pretrained(self.path, subfolder=self.network_folder, local_files_only=True,
                                                     dtype=dtype).requires_grad_(False)
        if self.cfg.train.gradient_checkpointing:
            net.enable_gradient_checkpointing()
        if self.cfg.train.channels_last and self.network_folder == "unet":
            net.to(memory_format=torch.channels_last)  # NHWC convolutions: cuDNN's fast path for UNets
        return net

    def _add_lora_adapters(self) -> None:
        """An adapter per role of the method on the frozen base. Their weights stay fp32 whatever the base's dtype
        (peft casts them to it): the optimiser updates fp32 weights, autocast computes in the low precision."""
        from peft import LoraConfig

        lc = self.cfg.lora
        targets = lc.targets or list(self.lora_targets)
        with warnings.catch_warnings():
            # peft warns from the second adapter on that the model holds several: here that is the design
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
            for role in role_names(self.cfg):
                self.base.add_adapter(LoraConfig(r=lc.rank, lora_alpha=lc.alpha, target_modules=targets,
                                                 init_lora_weights="gaussian"), adapter_name=role)
        for name, p in self.base.named_parameters():
            if "lora_" in name:  # trainable now: data-parallel wrappers register what requires grad
                p.data = p.data.float()
                p.requires_grad_(True)
        self.roles = LoRARoles(self.base)

    def sample_shape(self, n: int) -> tuple[int, ...]:
        return (n, *self.latent_shape())

    def _cond(self, idx: torch.Tensor) -> dict:
        return {k: v[idx] for k, v in self.embeddings.items()}

    def sample_cond(self, n: int, generator: torch.Generator):
        """Prompt embeddings of `n` random prompts, and the empty prompt's for CFG."""
        idx = torch.randint(0, len(self.prompts), (n,), generator=generator).to(self.device)
        return self._cond(idx), self._cond(torch.full_like(idx, len(self.prompts)))

    # -- networks -----------------------------------------------------------------------
    def pretrained_net(self, path=None, generator=None) -> nn.Module:
        return self.base

    def role_nets(self, base: nn.Module, roles: list[str]) -> dict[str, RoleNet]:
        """LoRA: a view of the one base per role, each data-parallel over its own adapter only. Full: a trainable
        fp32 network per role, loaded afresh (a copy of a low-precision teacher would be rounded); the teacher stays
        frozen."""
        max_K = max(self.cfg.student.unify, default=0)  # TDM-unify: each role its own K embedding (§6)
        if self.cfg.lora.enabled:
            nets = {role: RoleNet(self, base, role, max_K) for role in roles}
            for net in nets.values():
                own = {n if n == "k_embed.weight" else f"base.{n}" for n in net._adapter_params()}
                net._ddp_params_and_buffers_to_ignore = [n for n, _ in net.named_parameters() if n not in own] + [
                    n for n, _ in net.named_buffers()]
            return nets
        nets = {role: RoleNet(self, self._load_network(torch.float32).requires_grad_(True).to(self.device), None,
                              max_K) for role in roles}
        if self.cfg.train.teacher_offload:
            from accelerate import cpu_offload

            cpu_offload(self.base, execution_device=self.device)  # weights to the device per forward, then back
        return nets

    def new_net(self) -> nn.Module:
        return self.base

    def wrap(self, net: RoleNet) -> Denoiser:
        return Denoiser(net, self.schedule, self.prediction_type, learned_sigma=self.learned_sigma)

    # -- previews -------------------------------------------------------------------------
    @property
    def vae(self) -> nn.Module:
        """The teacher's VAE on the device in the frozen networks' dtype, loaded on first use."""
        if not hasattr(self, "_vae"):
            import diffusers

            folder = self.path / "vae"
            cls = getattr(diffusers, json.loads((folder / "config.json").read_text())["_class_name"])
            with quiet_loading():
                self._vae = cls.from_pretrained(folder, local_files_only=True, dtype=self.dtype).to(self.device).eval()
        return self._vae

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1], one at a time (a 1024 px decode holds gigabytes), as float32 on the CPU."""
        c = self.vae.config
        z = latents.to(self.device, self.dtype) / c.scaling_factor + (c.get("shift_factor") or 0.0)
        return torch.cat([(self.vae.decode(zi[None]).sample / 2 + 0.5).clamp(0, 1).float().cpu() for zi in z])

    def preview(self, student: Denoiser, grid_of, path: Path, n_prompts: int = 4, Ks=(1, 2, 4)) -> torch.Tensor:
        """Fixed prompts and noise, the student at each K, decoded: one row per K; returns the image (3, H, W). The
        prompts are `train.validation_prompts` when given (all of them), else the first `n_prompts` training ones."""
        from ...core.samplers import sample_student

        g = torch.Generator().manual_seed(0)
        first, n = (len(self.prompts) + 1, len(self.validation_prompts)) if self.validation_prompts else (
            0, min(n_prompts, len(self.prompts)))
        x_T = torch.randn(self.sample_shape(n), generator=g).to(self.device)
        cond = self._cond(torch.arange(first, first + n, device=self.device))
        unify = bool(self.cfg.student.unify)  # a K-conditioned student is told K (§6)
        rows = [self.decode(sample_student(student, x_T, grid_of(K), cond,
                                           **({"k_steps": torch.tensor(K)} if unify else {}))) for K in Ks]
        image = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)   # K rows x n prompts
        _save_image(image, path)
        return image

    def save_samples(self, x: torch.Tensor, cond: dict, path: Path) -> None:
        """`tdm sample`: the decoded samples side by side (a video: its first frame)."""
        _save_image(torch.cat(list(self.decode(x)), dim=2), path)


def _save_image(image: torch.Tensor, path: Path) -> None:
    """(3, H, W) in [0, 1] -> a PNG, written whole or not at all."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
    atomic_write(path, lambda p: pixels.save(p, format="PNG"))
