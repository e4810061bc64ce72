"""The diffusers evaluator: every sample set decoded and measured with local models the eval section names (nothing
is downloaded): the CLIP score with its prompt; FID and KID in a CLIP or DINOv2 image encoder's features against the
teacher's DDIM at its most steps with CFG on the same prompts and noise (`*_vs_teacher`: the distillation's
yardstick) and against a folder of real images (`*_real`). A video is measured on its first frame."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import RunError
from .encoders import Encoder, check_image_folder
from .image_metrics import clip_score, frechet_distance, kid
from .report import frame_gif, picture_grid, write_diffusers_report


class DiffusersEvaluator:
    """Everything `tdm eval` measures and draws on a run of a diffusers teacher."""

    student_eval_Ks = (1, 2, 4)   # the student is shown at these K whatever it was trained for
    teacher_samplers = ("ddim",)  # the teacher's law is its DDIM at the most steps; one sampler keeps its cost there
    teacher_law_sampler = "ddim"
    accelerated = True            # measured on the GPU where there is one
    columns = 6                   # samples per row of `grid.png` (a video: its first sample's frames)
    frames = 8                    # frames per video row of `grid.png`

    @classmethod
    def check_run(cls, cfg, run_dir: Path, n: int) -> None:
        """Before anything loads: a model to measure with, and enough samples for FID and KID."""
        e = cfg.eval
        if not (e.clip or e.features):
            raise RunError(f"{run_dir}: a {cfg.teacher.family} run is measured with local models; name them: tdm eval "
                           f"{run_dir} eval.clip=CLIP_FOLDER [eval.features=ENCODER_FOLDER] [eval.real_images=DIR]")
        if e.features and n == 1:
            raise RunError(f"{run_dir}: FID and KID (eval.features) need at least 2 samples; give --n 2 or more")

    def __init__(self, family):
        self.family, self.cfg = family, family.cfg
        e = self.cfg.eval
        self.teacher_steps = tuple(sorted(e.teacher_steps))
        self.batch_size = e.batch_size
        self.clip = Encoder("eval.clip", e.clip, family.device, text=True) if e.clip else None
        self.features = None
        if e.features:
            same = self.clip is not None and Path(e.features).resolve() == Path(e.clip).resolve()
            self.features = self.clip if same else Encoder("eval.features", e.features, family.device)
        self.real = None
        if e.real_images:  # embedded once: every entry is measured against them
            self.real = self.features.files(check_image_folder("eval.real_images", e.real_images), self.batch_size)
        self.settings = {"eval": {"clip": e.clip or None, "features": e.features or None,
                                  "features_kind": self.features.kind if self.features else None,
                                  "real_images": e.real_images or None,
                                  "n_real_images": len(self.real) if self.real is not None else None}}
        self._memo: dict[int, tuple] = {}

    def _cached(self, x: torch.Tensor, compute):
        """`compute()` once per tensor object; the tensor is kept so that its id is not reused."""
        if id(x) not in self._memo:
            self._memo[id(x)] = (x, compute())
        return self._memo[id(x)][1]

    def cond(self, n: int, generator: torch.Generator):
        """The run's prompts in file order, cycled to `n` (each as evenly used as n allows); the empty one for CFG.
        `prompt_index` rides along for the CLIP score (the networks read only their own keys)."""
        fam = self.family
        idx = (torch.arange(n) % len(fam.prompts)).to(fam.device)
        empty = torch.full_like(idx, len(fam.prompts))
        return {**fam._cond(idx), "prompt_index": idx}, {**fam._cond(empty), "prompt_index": empty}

    def _embeddings(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Decoded a batch at a time (the images are not kept: 1000 at 1024 px would hold 12 GB) and embedded."""
        def compute():
            out = {"clip": [], "features": []}
            for batch in x.split(self.batch_size):
                images = self.family.decode(batch)
                if self.clip is not None:
                    out["clip"].append(self.clip.images(images))
                if self.features is not None:
                    out["features"].append(self.features.images(images))
            return {k: torch.cat(v) for k, v in out.items() if v}
        return self._cached(x, compute)

    def quality(self, x: torch.Tensor, cond: dict, generator: torch.Generator,
                teacher_law: torch.Tensor | None = None) -> dict[str, float]:
        """`clip_score` (eval.clip); `fid_vs_teacher`, `kid_vs_teacher` against `teacher_law` and `fid_real`,
        `kid_real` against eval.real_images (eval.features)."""
        emb, out = self._embeddings(x), {}
        if self.clip is not None:
            idx = cond["prompt_index"]
            text = self._cached(idx, lambda: self.clip.texts([self.family.prompts[i] for i in idx.tolist()]))
            out["clip_score"] = clip_score(emb["clip"], text)
        if self.features is not None:
            f = emb["features"]
            if teacher_law is not None:
                ref = self._embeddings(teacher_law)["features"]
                out["fid_vs_teacher"], out["kid_vs_teacher"] = frechet_distance(f, ref), kid(f, ref, generator)
            if self.real is not None:
                out["fid_real"], out["kid_real"] = frechet_distance(f, self.real), kid(f, self.real, generator)
        return out

    def figures(self, run_dir: Path, samples: dict, cond: dict, metrics: dict) -> None:
        """`grid.png`: the teacher at its most steps with CFG above the student at each K, on the same prompts and
        noise (a video: its first sample's frames, and `video.gif` of them); `report.md`."""
        run_dir, rows = Path(run_dir), {}
        teacher = samples["teacher"]
        if teacher:
            n_steps = max(teacher)
            rows[f"teacher {n_steps} steps\nCFG {self.cfg.teacher.guidance:g}"] = teacher[n_steps]
        rows.update({f"student {K} step{'s' * (K > 1)}": x for K, x in samples["student"].items()})
        fam = self.family
        if hasattr(fam, "decode_video"):
            videos = {name: fam.decode_video(x[:1])[0] for name, x in rows.items()}   # (F, 3, H, W) each
            frames = next(iter(videos.values())).shape[0]
            keep = torch.linspace(0, frames - 1, min(self.frames, frames)).round().long()
            picture_grid({name: v[keep] for name, v in videos.items()}, [f"frame {int(i)}" for i in keep],
                         run_dir / "grid.png")
            frame_gif(list(videos.values()), run_dir / "video.gif")
        else:
            captions = [fam.prompts[i] for i in cond["prompt_index"][:self.columns].tolist()]
            picture_grid({name: fam.decode(x[:self.columns]) for name, x in rows.items()}, captions,
                         run_dir / "grid.png")
        write_diffusers_report(metrics, run_dir / "report.md", self.cfg)
