"""digits-sd: the committed text-to-image Stable Diffusion pipeline on the digits, through the sd15 code
path (cached prompt embeddings, CFG in one call, LoRA roles on one base, export), measured like the
pixel digits job: decoded samples scored by the committed digit classifier."""

from __future__ import annotations

import copy
import warnings
from importlib import resources
from pathlib import Path

import torch

from ...config import Config
from ...eval.report import image_grid
from ..diffusers.prompts import read_prompts
from ..diffusers.sd15 import SD15Family
from .sd_teacher import MAX_TOKENS, prompt_label, to_digit

NULL_LABEL = 10                  # the empty prompt's label: no digit


def teacher_dir(path: str) -> Path:
    """`digits-sd` names the committed pipeline; anything else is a folder written by `tdm teacher train`."""
    if path in ("", "digits-sd"):
        return Path(str(resources.files("tdm") / "assets" / "digits_sd"))
    return Path(path)


class DigitsSDFamily(SD15Family):
    """SD15Family plus the digit labels of its prompts (a `labels` entry in every condition, which
    `SD15Family.call` ignores) and the 8x8 digits of its decoded samples (what `tdm.eval.digits` scores)."""

    num_classes = NULL_LABEL         # digits 0..9, each with its prompts

    @staticmethod
    def _resolved(cfg: Config) -> Config:
        """The named folder made a path, and its own prompts (what it was trained on) unless others are given."""
        cfg = copy.deepcopy(cfg)
        cfg.teacher.path = str(teacher_dir(cfg.teacher.path))
        cfg.data.prompts = cfg.data.prompts or str(Path(cfg.teacher.path) / "prompts.txt")
        return cfg

    @classmethod
    def check_inputs(cls, cfg: Config, dry: bool = False) -> None:
        """SD1.5's checks, and every prompt names one digit: the classifier's label of its samples."""
        cfg = cls._resolved(cfg)
        super().check_inputs(cfg, dry)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for prompt in read_prompts(cfg.data.prompts, cfg.data.max_prompt_chars):
                prompt_label(prompt)

    def __init__(self, cfg: Config, device: torch.device | str = "cpu", run_dir: str | Path | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__(self._resolved(cfg), device, run_dir, dtype)
        # rows as the embeddings': the training prompts, the empty prompt, the validation prompts (previews only)
        self.labels = torch.tensor([prompt_label(p) for p in self.prompts] + [NULL_LABEL] * (
            1 + len(self.validation_prompts)), device=self.device)

    @staticmethod
    def probe_cond(net_config, n: int) -> dict[str, torch.Tensor]:
        """Meta tensors shaped like `call`'s conditions for n rows (tdm.estimate's memory probe): 16 tokens."""
        return {"prompt_embeds": torch.empty(n, MAX_TOKENS, net_config.cross_attention_dim, device="meta")}

    def _cond(self, idx: torch.Tensor) -> dict:
        return {**super()._cond(idx), "labels": self.labels[idx]}

    def prompts_for(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Indices into `prompts`: for each label one of its prompts, drawn at random."""
        members = [(self.labels[:-1] == c).nonzero().squeeze(1).cpu() for c in range(NULL_LABEL)]
        missing = [c for c in labels.unique().tolist() if len(members[c]) == 0]
        if missing:
            raise ValueError(f"data.prompts has no prompt for digit(s) {missing}")
        pick = torch.randint(0, 2**31, (len(labels),), generator=generator)
        return torch.stack([members[c][r % len(members[c])] for c, r in zip(labels.tolist(), pick.tolist())])

    def label_cond(self, labels: torch.Tensor, generator: torch.Generator) -> dict:
        """`tdm sample RUN --labels`: a prompt of each requested digit."""
        return self._cond(self.prompts_for(labels.cpu(), generator).to(self.device))

    def digits(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> decoded 16x16 images -> the 8x8 digits the classifier reads, in [-1, 1]."""
        return to_digit(self.decode(latents) * 2 - 1)

    def save_samples(self, x: torch.Tensor, cond: dict, path: Path) -> None:
        image_grid({"samples": self.digits(x)}, cond["labels"].cpu(), path, columns=min(len(x), 40))
