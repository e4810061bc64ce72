"""A small CNN digit classifier whose penultimate features define the image metrics' feature space."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..families.digits.data import DigitsSplit

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "digits"  # the committed classifier


class DigitClassifier(nn.Module):
    """Two convolutions (8x8 -> 4x4), a linear layer to the features, a linear layer to the logits."""

    def __init__(self, channels: tuple[int, int] = (32, 64), features: int = 64, num_classes: int = 10):
        super().__init__()
        self.config = {"channels": list(channels), "features": features, "num_classes": num_classes}
        c1, c2 = channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.SiLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.SiLU(),
            nn.Flatten(), nn.Linear(c2 * 4 * 4, features))
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(features, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (before the last non-linearity), shape (N, features)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def random_shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to one pixel in each direction, filling with background (-1).

    Generated digits are rarely centred exactly like the scans; shifts keep the features stable.
    """
    n, h, w = x.shape[0], x.shape[2], x.shape[3]
    padded = nn.functional.pad(x, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2, n, 1), generator=generator)
    rows, cols = dy + torch.arange(h), dx + torch.arange(w)
    return padded[:, 0][torch.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]].unsqueeze(1)


def train_classifier(split: DigitsSplit, steps: int = 3000, batch_size: int = 128, lr: float = 2e-3,
                     seed: int = 0, progress: bool = True) -> DigitClassifier:
    """AdamW with cosine decay on shifted training images; the same seed gives the same weights."""
    with torch.random.fork_rng():  # module init draws from the global RNG: seed it without leaking
        torch.manual_seed(seed)
        model = DigitClassifier()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    x, y = split.train_x, split.train_y
    model.train()
    for _ in tqdm(range(steps), desc="digit classifier", disable=not progress):
        idx = torch.randint(0, len(y), (batch_size,), generator=g)
        loss = nn.functional.cross_entropy(model(random_shift(x[idx], g)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def save_classifier(model: DigitClassifier, dir: str | Path, metrics: dict | None = None) -> None:
    """`classifier.safetensors` (weights) and `classifier.json` (config and recorded metrics)."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(dir / "classifier.safetensors"))
    meta = {"config": model.config, "metrics": metrics or {}}
    (dir / "classifier.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_classifier(dir: str | Path = ASSET_DIR) -> DigitClassifier:
    """The classifier saved in `dir` (by default the committed one), in eval mode."""
    dir = Path(dir)
    meta = json.loads((dir / "classifier.json").read_text())
    model = DigitClassifier(**meta["config"])
    model.load_state_dict(load_file(str(dir / "classifier.safetensors")))
    return model.eval()
