"""The digits teacher: a class-conditional diffusers UNet2DModel trained as an eps-prediction model."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel
from torch import nn
from tqdm.auto import tqdm

from ...core.schedules import VPSchedule
from ...scheduler_config import vp_schedule
from .data import DigitsSplit

NUM_CLASSES = 10                 # digits 0..9; label 10 is the null label for CFG

# The committed teacher's recipe (`tdm teacher train --preset digits`).
UNET_CONFIG = dict(
    sample_size=8, in_channels=1, out_channels=1,
    block_out_channels=(32, 64, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    num_class_embeds=NUM_CLASSES + 1, norm_num_groups=16, attention_head_dim=32,
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                        prediction_type="epsilon")
RECIPE = dict(steps=4000, batch_size=128, lr=1e-3, ema=0.999, p_uncond=0.1, seed=0)


class LabelUNet(nn.Module):
    """`net(x_t, t, labels) -> eps` over a class-conditional UNet2DModel, for `Denoiser`."""

    def __init__(self, unet: UNet2DModel):
        super().__init__()
        self.unet = unet

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, **extra) -> torch.Tensor:
        if extra:
            raise ValueError(f"the digits UNet takes no extra conditioning, got {sorted(extra)}")
        return self.unet(x_t, t.to(x_t.dtype), class_labels=labels).sample


def load_teacher(path: str | Path) -> tuple[LabelUNet, VPSchedule, dict]:
    """A teacher folder: `unet/` (diffusers), `scheduler/scheduler_config.json`, `teacher.json`."""
    path = Path(path)
    if not (path / "unet" / "config.json").exists():
        raise FileNotFoundError(f"{path} holds no teacher (expected unet/config.json); "
                                "train one with `tdm teacher train --preset digits --output DIR`")
    unet = UNet2DModel.from_pretrained(path / "unet", local_files_only=True)
    schedule = vp_schedule(DDPMScheduler.load_config(path / "scheduler", local_files_only=True))
    info = json.loads((path / "teacher.json").read_text()) if (path / "teacher.json").exists() else {}
    return LabelUNet(unet), schedule, info


def denoising_loss(net: LabelUNet, schedule: VPSchedule, x0: torch.Tensor, labels: torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:
    """Ordinary eps-prediction loss `|eps_hat(x_t, t, c) - eps|^2` at uniform integer t (DDPM)."""
    t = torch.randint(0, schedule.T, (x0.shape[0],), generator=generator).float()
    eps = torch.randn(x0.shape, generator=generator)
    return ((net(schedule.add_noise(x0, eps, t), t, labels) - eps) ** 2).mean()


def train_teacher(split: DigitsSplit, output: str | Path, steps: int = RECIPE["steps"],
                  batch_size: int = RECIPE["batch_size"], lr: float = RECIPE["lr"], ema: float = RECIPE["ema"],
                  p_uncond: float = RECIPE["p_uncond"], seed: int = RECIPE["seed"], progress: bool = True) -> dict:
    """Train on the training split only, save the EMA weights as a diffusers folder; returns the log."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = LabelUNet(UNet2DModel(**UNET_CONFIG))
    schedule = vp_schedule(SCHEDULER_CONFIG)
    net_ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    losses = []
    bar = tqdm(range(steps), desc="train digits teacher", disable=not progress)
    for step in bar:
        idx = torch.randint(0, len(split.train_x), (batch_size,), generator=g)
        x0, labels = split.train_x[idx], split.train_y[idx].clone()
        labels[torch.rand(batch_size, generator=g) < p_uncond] = NUM_CLASSES  # learn the unconditional score
        loss = denoising_loss(net, schedule, x0, labels, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for p_ema, p in zip(net_ema.parameters(), net.parameters()):
                p_ema.lerp_(p, 1 - ema)
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    output = Path(output)
    net_ema.unet.save_pretrained(output / "unet")
    DDPMScheduler(**SCHEDULER_CONFIG).save_pretrained(output / "scheduler")
    window = max(1, steps // 20)
    log = {"recipe": dict(steps=steps, batch_size=batch_size, lr=lr, ema=ema, p_uncond=p_uncond, seed=seed),
           "loss_first": sum(losses[:window]) / window, "loss_last": sum(losses[-window:]) / window}
    (output / "teacher.json").write_text(json.dumps(log, indent=2))
    return log
