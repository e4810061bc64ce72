"""Figures and the short report of an image run: sample grid, quality against NFE, report.md."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ..families.digits.data import to_pixels  # noqa: E402
from ..files import atomic_write, write_text  # noqa: E402


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


def picture_grid(rows: dict[str, torch.Tensor], captions: list[str], path: str | Path) -> Path:
    """One row per sampler of decoded pictures (n, 3, H, W) in [0, 1], side by side; a caption under each column."""
    first = next(iter(rows.values()))
    n, h, w = first.shape[0], first.shape[-2], first.shape[-1]
    fig, axes = plt.subplots(len(rows), 1, figsize=(n * 1.7 + 1.6, len(rows) * 1.7 * h / w + 0.4), squeeze=False)
    for ax, (name, x) in zip(axes[:, 0], rows.items()):
        strip = torch.cat([torch.nn.functional.pad(img, (2, 2, 2, 2), value=1.0) for img in x.float().cpu()], dim=2)
        ax.imshow(strip.permute(1, 2, 0).numpy())
        ax.set_xticks([(w + 4) * (i + 0.5) for i in range(len(x))], [_short(c) for c in captions[: len(x)]],
                      fontsize=6)
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)
    return path


def _short(text: str, chars: int = 28) -> str:
    return text if len(text) <= chars else text[: chars - 3] + "..."


def frame_gif(videos: list[torch.Tensor], path: str | Path, fps: int = 8) -> Path:
    """The videos (F, 3, H, W) in [0, 1] one above the other, played together: an animated GIF (Pillow's writer)."""
    from PIL import Image

    stacked = torch.cat(videos, dim=2)                                      # (F, 3, rows * H, W)
    frames = [Image.fromarray((f.permute(1, 2, 0).numpy() * 255).round().astype("uint8")) for f in stacked]
    path = Path(path)
    atomic_write(path, lambda p: frames[0].save(p, format="GIF", save_all=True, append_images=frames[1:],
                                                duration=round(1000 / fps), loop=0))
    return path


DIFFUSERS_COLUMNS = ("clip_score", "fid_vs_teacher", "kid_vs_teacher", "fid_real", "kid_real")


def write_diffusers_report(metrics: dict, path: str | Path, cfg) -> Path:
    """`report.md` of a diffusers run: what was measured with what, the table, the student at its K against the
    teacher's law."""
    K, e = cfg.student.steps, metrics["eval"]
    ddim = metrics["teacher"]["ddim"]
    law_steps = max(int(k.split("=")[1]) for k in ddim)
    columns = [c for c in DIFFUSERS_COLUMNS if c in metrics["student"][f"K={K}"]]
    lines = [
        f"# TDM on a {cfg.teacher.family} teacher: {K}-step student",
        "",
        f"{metrics['n_samples']} samples per entry on the run's prompts in file order (cycled), the same start noise "
        f"in every entry; the teacher with CFG w = {metrics['guidance']:g}, NFE counting both CFG passes."
        + (" Videos are measured on their first frame." if cfg.teacher.family in ("cogvideox", "wan") else ""),
    ]
    if e["clip"]:
        lines.append(f"CLIP score: 100 max(cos, 0) of each image with its prompt, in the CLIP of `{e['clip']}`.")
    if e["features"]:
        lines.append(f"FID and KID in the features of `{e['features']}` ({e['features_kind']}), not Inception's: "
                     "comparable only with this encoder and, for FID, at this sample count. `_vs_teacher`: against "
                     f"the teacher's DDIM at {law_steps} steps on the same prompts and noise (the distillation's "
                     "target); the teacher-law row is that sampler from other noise: what a sampler of exactly the "
                     "teacher's distribution reads at this count (below it, a set also follows the teacher's map from "
                     "noise to image)."
                     + (f" `_real`: against the {e['n_real_images']} images of `{e['real_images']}`."
                        if e["real_images"] else ""))
    lines += ["", "| sampler | NFE | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    row = lambda name, entry: (f"| {name} | {entry['nfe']} | "  # noqa: E731
                               + " | ".join(_cell(entry.get(c)) for c in columns) + " |")
    if "teacher_law" in metrics:
        lines.append(row(f"teacher law: DDIM {law_steps} steps, other noise", metrics["teacher_law"]))
    for key, entry in ddim.items():
        lines.append(row(f"teacher ddim {key}" + (" (the yardstick)" if key == f"steps={law_steps}" else ""), entry))
    for key, entry in metrics["student"].items():
        lines.append(row(f"student {key}" + ("" if entry["trained"] else " (not trained at this K)"), entry))
    s, t = metrics["student"][f"K={K}"], ddim[f"steps={law_steps}"]
    summary = [f"The {K}-step student against the teacher's DDIM at {law_steps} steps ({t['nfe']} NFE, "
               f"{t['nfe'] / s['nfe']:.0f}x the student's):"]
    if "fid_vs_teacher" in s:
        summary.append(f"FID to the teacher {_cell(s['fid_vs_teacher'])} (its law from other noise: "
                       f"{_cell(metrics['teacher_law']['fid_vs_teacher'])}), KID {_cell(s['kid_vs_teacher'])}")
    if "clip_score" in s:
        summary.append(f"CLIP score {_cell(s['clip_score'])} vs the teacher's {_cell(t['clip_score'])}")
    if "fid_real" in s:
        summary.append(f"FID to the real images {_cell(s['fid_real'])} vs the teacher's {_cell(t['fid_real'])}")
    lines += ["", summary[0] + " " + "; ".join(summary[1:]) + "."]
    return _write(path, lines)


def _cell(v) -> str:
    return "-" if v is None else f"{round(v, 4) + 0.0:.4f}"  # + 0.0: round-off below 0 shows as 0.0000, not -0.0000
