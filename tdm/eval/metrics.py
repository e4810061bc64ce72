"""Distances between sample sets, and mode statistics against a known mixture."""

from __future__ import annotations

import torch

from ..families.toy.gmm import GaussianMixture


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Energy distance `2 E|X-Y| - E|X-X'| - E|Y-Y'|` (Szekely & Rizzo), V-statistic form."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    return (2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()).item()


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, n_proj: int = 256,
                       generator: torch.Generator | None = None) -> float:
    """Sliced 1-Wasserstein distance over `n_proj` random directions (equal sample counts).

    W1 rather than W2: with well separated modes a few samples crossing a gap dominate W2.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError("sliced_wasserstein needs equal sample counts")
    x, y = x.flatten(1).double(), y.flatten(1).double()
    theta = torch.randn(x.shape[1], n_proj, generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, _ = (x @ theta).sort(0)
    py, _ = (y @ theta).sort(0)
    return (px - py).abs().mean().item()


def assign_components(mixture: GaussianMixture, x: torch.Tensor, max_std: float = 3.0) -> torch.Tensor:
    """Most likely component of each sample, or -1 when the sample is off every mode.

    A sample is on component j when its RMS standardised distance `sqrt(mean_d ((x - mu_j) / s_j)^2)`
    is at most `max_std`.
    """
    j = mixture.log_responsibilities(x, 1.0, 0.0).argmax(-1)
    z = (x.double().cpu() - mixture.means[j]) / mixture.stds[j]
    return torch.where(z.pow(2).mean(-1).sqrt() <= max_std, j, torch.full_like(j, -1))


def mode_stats(mixture: GaussianMixture, x: torch.Tensor, labels: torch.Tensor | None = None,
               min_share: float = 0.1) -> dict[str, float]:
    """Mode coverage, off-mode share and (for conditional mixtures) class accuracy.

    coverage: share of components holding at least `min_share` of their expected sample count
    (their weight times the number of samples); mode_std_ratio: per-dimension std of the samples on
    each component over that component's std, averaged over components (with 2 samples or more) and
    dimensions: 1 for the true law, below 1 where a sampler narrows the modes (energy distance barely
    sees that); class_accuracy: share of samples on a component of their own class.
    """
    comp = assign_components(mixture, x)
    n = x.shape[0]
    counts = torch.bincount(comp[comp >= 0], minlength=len(mixture.weights)).double()
    if labels is not None and mixture.labels is not None:
        lab = labels.cpu()
        expected = torch.zeros(len(mixture.weights), dtype=torch.float64)
        for c in range(mixture.num_classes):  # expected count: class frequency times weight within the class
            members = mixture.labels == c
            expected[members] = (lab == c).sum() * mixture.weights[members] / mixture.weights[members].sum()
    else:
        expected = mixture.weights * n
    xd = x.double().cpu()
    ratios = [xd[comp == j].std(0) / mixture.stds[j] for j in range(len(mixture.weights)) if counts[j] >= 2]
    out = {
        "mode_coverage": (counts >= min_share * expected).double().mean().item(),
        "off_mode": (comp < 0).double().mean().item(),
        "mode_std_ratio": torch.stack(ratios).mean().item() if ratios else float("nan"),
    }
    if labels is not None and mixture.labels is not None:
        own = (comp >= 0) & (mixture.labels[comp.clamp_min(0)] == labels.cpu())
        out["class_accuracy"] = own.double().mean().item()
    return out
