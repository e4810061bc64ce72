"""Distances between image feature sets (Fréchet distance, KID) and the CLIP score, as functions of features.

The features come from whatever encoder the caller names (the digit classifier, a local CLIP or DINOv2): values
are comparable only between sets measured with the same encoder, at the same sample count for FD.
"""

from __future__ import annotations

import torch


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(m)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(f_a: torch.Tensor, f_b: torch.Tensor) -> float:
    """`|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2})` between Gaussians fitted to two feature sets.

    `tr (S_a S_b)^{1/2} = tr (S_a^{1/2} S_b S_a^{1/2})^{1/2}`: the right side is symmetric, so two
    eigendecompositions give it without the complex round-off of a general matrix square root.
    """
    f_a, f_b = f_a.double().flatten(1), f_b.double().flatten(1)
    mu_a, mu_b = f_a.mean(0), f_b.mean(0)
    S_a, S_b = torch.cov(f_a.T), torch.cov(f_b.T)
    r_a = _sqrt_psd(S_a)
    m = r_a @ S_b @ r_a
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    return ((mu_a - mu_b).pow(2).sum() + S_a.trace() + S_b.trace() - 2 * tr_sqrt).item()


def mmd2_unbiased(f_a: torch.Tensor, f_b: torch.Tensor) -> torch.Tensor:
    """The unbiased squared MMD of two equal-size sets with the cubic kernel `k(x, y) = (x.y / d + 1)^3`."""
    m, d = f_a.shape[0], f_a.shape[1]
    k_aa, k_bb, k_ab = ((x @ y.T / d + 1) ** 3 for x, y in ((f_a, f_a), (f_b, f_b), (f_a, f_b)))
    off = lambda k: (k.sum() - k.diagonal().sum()) / (m * (m - 1))  # noqa: E731
    return off(k_aa) + off(k_bb) - 2 * k_ab.mean()


def kid(f_a: torch.Tensor, f_b: torch.Tensor, generator: torch.Generator, subsets: int = 100,
        subset_size: int = 1000) -> float:
    """Kernel Inception Distance (Bińkowski et al. 2018) in any features: the unbiased squared MMD with the cubic
    kernel, averaged over `subsets` random subsets of `min(subset_size, len(f_a), len(f_b))` rows of each set.
    Unbiased, so it can dip below 0 for two draws of one law, and unlike FD it does not grow as the sets shrink."""
    f_a, f_b = f_a.double().flatten(1), f_b.double().flatten(1)
    m = min(subset_size, len(f_a), len(f_b))
    if m < 2:
        raise ValueError(f"kid needs at least 2 samples in each set, got {len(f_a)} and {len(f_b)}")
    draws = [mmd2_unbiased(f_a[torch.randperm(len(f_a), generator=generator)[:m]],
                           f_b[torch.randperm(len(f_b), generator=generator)[:m]]) for _ in range(subsets)]
    return torch.stack(draws).mean().item()


def clip_score(image_emb: torch.Tensor, text_emb: torch.Tensor) -> float:
    """CLIP score (Hessel et al. 2021, as torchmetrics computes it): `100 max(cos(image, text), 0)` of each
    image with its own caption, averaged over the set."""
    cos = torch.nn.functional.cosine_similarity(image_emb.double(), text_emb.double(), dim=-1)
    return (100 * cos.clamp_min(0)).mean().item()
