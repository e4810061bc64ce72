"""scikit-learn's 8x8 handwritten digits (1,797 images, ships with scikit-learn), split per class."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits


@dataclass
class DigitsSplit:
    """Images (N, 1, 8, 8) float32 in [-1, 1] and their labels (N,) int64."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_digits_split(held_out: float = 0.25, seed: int = 0) -> DigitsSplit:
    """Hold out the share `held_out` of every class (about 450 images at 0.25), the same for a seed."""
    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32)).unsqueeze(1) / 8 - 1  # pixels 0..16 -> [-1, 1]
    y = torch.from_numpy(digits.target.astype(np.int64))
    rng = np.random.RandomState(seed)
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(digits.target):
        members = rng.permutation(np.flatnonzero(digits.target == c))
        test[members[:round(held_out * len(members))]] = True
    test = torch.from_numpy(test)
    return DigitsSplit(x[~test], y[~test], x[test], y[test])


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped, for plotting."""
    return ((x + 1) / 2).clamp(0, 1)
