"""Figures and the short report of an image run: sample grid, quality against NFE, report.md."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ..families.digits.data import to_pixels  # noqa: E402
from ..files import write_text  # noqa: E402


def image_grid(rows: dict[str, torch.Tensor], labels: torch.Tensor, path: str | Path, columns: int = 20) -> Path:
    """One row per sampler, the same `columns` samples (same labels and start noise) in each."""
    fig, axes = plt.subplots(len(rows), 1, figsize=(columns * 0.42 + 1.6, len(rows) * 0.62 + 0.3), squeeze=False)
    for ax, (name, x) in zip(axes[:, 0], rows.items()):
        x = to_pixels(x[:columns].float().cpu())[:, 0]                       # (n, 8, 8)
        strip = torch.cat([torch.nn.functional.pad(img, (1, 1, 1, 1), value=0.0) for img in x], dim=1)
        ax.imshow(strip.numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([10 * i + 5 for i in range(len(x))], [str(int(v)) for v in labels[: len(x)]], fontsize=6)
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def quality_plot(metrics: dict, path: str | Path) -> Path:
    """FD and conditional accuracy against NFE, teacher samplers vs student, with the real-data floor."""
    fig, (ax_fd, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.4))
    series = {f"teacher {name}": entries for name, entries in metrics["teacher"].items()}
    series["TDM student"] = metrics["student"]
    for name, entries in series.items():
        pts = sorted((e["nfe"], e["fd"], e["accuracy"]) for e in entries.values())
        style = dict(marker="o", lw=2) if "student" in name else dict(marker=".", ls="--")
        ax_fd.plot([p[0] for p in pts], [p[1] for p in pts], label=name, **style)
        ax_acc.plot([p[0] for p in pts], [p[2] for p in pts], label=name, **style)
    ax_fd.axhline(metrics["reference"]["fd"], color="gray", lw=1, label="real digits (floor)")
    ax_acc.axhline(metrics["reference"]["accuracy"], color="gray", lw=1)
    for ax, title in ((ax_fd, "FD (digit-classifier features), lower is better"), (ax_acc, "conditional accuracy")):
        ax.set_xscale("log")
        ax.set_xlabel("NFE (CFG counts 2 per step)")
        ax.set_title(title, fontsize=9)
    ax_fd.set_yscale("log")
    ax_fd.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(metrics: dict, path: str | Path, K: int) -> Path:
    """`report.md`: the student at K next to the teacher, in numbers."""
    s = metrics["student"][f"K={K}"]
    ddim = metrics["teacher"]["ddim"]
    ref = metrics["reference"]
    lines = [
        f"# TDM on the digits teacher: {K}-step student",
        "",
        f"{metrics['n_samples']} samples per entry, labels of the held-out set, CFG w = {metrics['guidance']}. "
        "FD is in the feature space of the committed digit classifier (not Inception); "
        "the floor is real training digits at the same count.",
        "",
        "| sampler | NFE | FD | accuracy | precision | recall |",
        "|---|---|---|---|---|---|",
        f"| real digits (floor) | - | {ref['fd']:.3f} | {ref['accuracy']:.3f} | {ref['precision']:.3f} | "
        f"{ref['recall']:.3f} |",
    ]
    for name, entries in metrics["teacher"].items():
        for key, e in entries.items():
            lines.append(f"| teacher {name} {key} | {e['nfe']} | {e['fd']:.3f} | {e['accuracy']:.3f} | "
                         f"{e['precision']:.3f} | {e['recall']:.3f} |")
    for key, e in metrics["student"].items():
        lines.append(f"| student {key}{'' if e['trained'] else ' (not trained at this K)'} | {e['nfe']} | "
                     f"{e['fd']:.3f} | {e['accuracy']:.3f} | {e['precision']:.3f} | {e['recall']:.3f} |")
    if not ddim:  # an evaluation of the student alone
        return _write(path, lines)
    best_steps = max(ddim, key=lambda k: ddim[k]["nfe"])
    t_best = ddim[best_steps]
    fd_ratio = s["fd"] / t_best["fd"]
    lines += [
        "",
        f"The {K}-NFE student against the teacher's DDIM at {best_steps} ({t_best['nfe']} NFE): "
        f"FD {s['fd']:.3f} vs {t_best['fd']:.3f} ({fd_ratio:.2f}x; target <= 1.2x), "
        f"accuracy {s['accuracy']:.3f} vs {t_best['accuracy']:.3f} (target >= teacher - 0.02), "
        f"{t_best['nfe'] / s['nfe']:.0f}x fewer network evaluations.",
    ]
    if f"steps={K}" in ddim:
        t_k = ddim[f"steps={K}"]
        lines.append(f"The teacher's own {K}-step DDIM: FD {t_k['fd']:.3f}, accuracy {t_k['accuracy']:.3f}.")
    return _write(path, lines)


def _write(path: str | Path, lines: list[str]) -> Path:
    return write_text(path, "\n".join(lines) + "\n")
