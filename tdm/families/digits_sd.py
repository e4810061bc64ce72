"""digits-sd: the committed text-to-image Stable Diffusion pipeline on the digits, through the sd15 code
path (cached prompt embeddings, CFG in one call, LoRA roles on one base, export), measured like the
pixel digits job: decoded samples scored by the committed digit classifier."""

from __future__ import annotations

import copy
import tempfile
import warnings
from importlib import resources
from pathlib import Path

import torch

from ..config import Config
from ..images.metrics import DigitEvaluator, digit_evaluator
from ..images.report import image_grid, quality_plot, write_report
from ..images.sd_teacher import MAX_TOKENS, prompt_label, to_digit
from ..prompts import read_prompts
from .sd15 import SD15Family

NULL_LABEL = 10                  # the empty prompt's label: no digit


def teacher_dir(path: str) -> Path:
    """`digits-sd` names the committed pipeline; anything else is a folder written by `tdm teacher train`."""
    if path in ("", "digits-sd"):
        return Path(str(resources.files("tdm") / "assets" / "digits_sd"))
    return Path(path)


class DigitsSDFamily(SD15Family):
    """SD15Family plus the digit labels of its prompts (a `labels` entry in every condition, which
    `SD15Family.call` ignores) and the classifier's metrics on decoded samples."""

    num_classes = NULL_LABEL         # digits 0..9, each with its prompts
    teacher_steps = (4, 8, 25, 50)   # teacher sampler steps that `tdm eval` measures
    student_eval_Ks = (1, 2, 4)      # the student is shown at these K whatever it was trained for

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
        self.labels = torch.tensor([prompt_label(p) for p in self.prompts] + [NULL_LABEL], device=self.device)

    @property
    def evaluator(self) -> DigitEvaluator:
        return digit_evaluator()  # the classifier and the real digits: loaded on the first evaluation

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

    def eval_prompts(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """The held-out digits' labels (cycled to `n`), so FD compares like with like, each with a prompt."""
        test_y = self.evaluator.split.test_y
        return self.prompts_for(test_y[torch.arange(n) % len(test_y)], generator)

    def label_cond(self, labels: torch.Tensor, generator: torch.Generator) -> dict:
        """`tdm sample RUN --labels`: a prompt of each requested digit."""
        return self._cond(self.prompts_for(labels.cpu(), generator).to(self.device))

    def eval_cond(self, n: int, generator: torch.Generator):
        idx = self.eval_prompts(n, generator).to(self.device)
        return self._cond(idx), self._cond(torch.full_like(idx, len(self.prompts)))

    # -- evaluation ---------------------------------------------------------------------
    def digits(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> decoded 16x16 images -> the 8x8 digits the classifier reads, in [-1, 1]."""
        return to_digit(self.decode(latents) * 2 - 1)

    def quality(self, x: torch.Tensor, cond: dict, generator: torch.Generator) -> dict[str, float]:
        return self.evaluator.evaluate(self.digits(x), cond["labels"].cpu())

    def reference(self, n: int, cond: dict, generator: torch.Generator):
        """Real training digits with the held-out class shares, and their metrics: the floor at `n`."""
        return None, self.evaluator.floor(n, generator)

    def trajectory_quality(self, traj, cond: dict, generator: torch.Generator) -> None:
        """The classifier only knows clean digits, so trajectory points are not scored."""

    def figures(self, run_dir: Path, samples: dict, cond: dict, metrics: dict) -> None:
        """`grid.png` (teacher at its most steps with CFG beside the student at each K), `quality.png`, `report.md`."""
        run_dir = Path(run_dir)
        columns, rows = 20, {}
        if samples["teacher"]:  # an evaluation of the student alone has none
            n_steps = max(samples["teacher"])
            rows[f"teacher {n_steps} steps, CFG {self.cfg.teacher.guidance:g}"] = samples["teacher"][n_steps][:columns]
        rows.update({f"student {K} step{'s' * (K > 1)}": x[:columns] for K, x in samples["student"].items()})
        image_grid({name: self.digits(x) for name, x in rows.items()}, cond["labels"].cpu(), run_dir / "grid.png")
        quality_plot(metrics, run_dir / "quality.png")
        write_report(metrics, run_dir / "report.md", self.cfg.student.steps)

    def save_samples(self, x: torch.Tensor, cond: dict, path: Path) -> None:
        image_grid({"samples": self.digits(x)}, cond["labels"].cpu(), path, columns=min(len(x), 40))


def teacher_check(path: str | Path, n_steps: int = 25, w: float | None = None, seed: int = 0,
                  n: int = 450) -> dict:
    """FD and accuracy of a teacher's DDIM at `n_steps` with CFG `w` (the preset's by default), on the
    same noise and prompts as `tdm eval` draws with `seed`. `tdm teacher train` records it in teacher.json."""
    from ..config import resolve
    from ..core.samplers import sample_ddim
    from ..core.schedules import teacher_grid

    cfg = resolve("digits-sd", [f"teacher.path={path}", "lora.enabled=false"])
    w = cfg.teacher.guidance if w is None else w
    with tempfile.TemporaryDirectory() as cache:   # prompt embeddings: not into the teacher folder
        fam = DigitsSDFamily(cfg, run_dir=cache)
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(fam.sample_shape(n), generator=g)
    cond, uncond = fam.eval_cond(n, g)
    x = sample_ddim(fam.teacher, x_T, teacher_grid(n_steps, fam.schedule), cond, uncond, w)
    return {"sampler": "ddim", "steps": n_steps, "guidance": w, "seed": seed, "n": n, **fam.quality(x, cond, g)}
