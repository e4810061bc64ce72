"""Pictures of samples (2-D scatter panels)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def scatter_panels(samples: dict[str, torch.Tensor], labels: torch.Tensor | None, path: str | Path,
                   max_points: int = 4000) -> Path:
    """One scatter panel per sample set on shared axes (first two dimensions), coloured by class."""
    names = list(samples)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), sharex=True, sharey=True, squeeze=False)
    ref = samples[names[0]][:, :2].float()
    lim = ref.abs().max().item() * 1.4
    colour = None if labels is None else labels[:max_points].cpu().numpy()
    for ax, name in zip(axes[0], names):
        x = samples[name][:max_points, :2].float().cpu().numpy()
        style = {"c": colour, "cmap": "tab10"} if colour is not None and len(colour) == len(x) else {}
        ax.scatter(x[:, 0], x[:, 1], s=1.5, alpha=0.5, **style)
        ax.set_title(name, fontsize=9)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
    if samples[names[0]].shape[1] > 2:
        fig.suptitle("first two dimensions", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
