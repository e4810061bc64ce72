"""A run folder: one run per folder (a lock), its config, checkpoints with manifests, the resume rule, SIGINT /
SIGTERM turned into a stop at the next iteration boundary, and a finished run loaded (`load_run`).

Every file a run writes appears whole or not at all: it is written under a temporary name, flushed to the disk and
renamed (a rename within a folder is atomic). A checkpoint is a folder written the same way and is complete when its
`manifest.json` lists every file with its size and SHA-256; a resumed run starts from the newest complete one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from .errors import RunError
from .files import fsync_dir, write_json, write_text

if TYPE_CHECKING:
    import torch

    from .config import Config
    from .core.denoiser import Denoiser

CONFIG, LOCK, LOG, MANIFEST = "config.yaml", "tdm.lock", "train_log.jsonl", "manifest.json"
STUDENT = "student.safetensors"
# What a run may change when it is started again on its folder: none of them changes what the iterations compute.
RESUMABLE = ("train.iterations", "train.progress", "train.max_nonfinite_skips", "train.eval_samples",
             "train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "train.report_to",
             "train.validation_prompts", "eval.clip", "eval.features", "eval.real_images", "eval.teacher_steps",
             "eval.batch_size")
# Caches of a start that never trained: cleared when the folder is started afresh with another config.
DERIVED = ("pretrained.safetensors", LOG)


# -- the lock -----------------------------------------------------------------------------
_held: dict[Path, list] = {}  # this process's locks: lock file -> [fd, depth]; re-entrant within a process


def acquire(run_dir: Path) -> int | None:
    """Hold `run_dir`'s lock, or raise naming its holder. An flock: the kernel drops it when its process dies, so a
    lock left by a killed run is stale and taken over. Returns the pid written in a stale lock, if any."""
    path = (Path(run_dir) / LOCK).resolve()
    if path in _held:
        _held[path][1] += 1
        return None
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = _owner(fd)
        os.close(fd)
        who = f"process {owner['pid']} on {owner['host']}" if owner else "another process"
        raise RunError(f"{run_dir} is in use by {who} (lock {path}); wait for it to finish or pass another "
                       "--output") from None
    stale = _owner(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
    os.fsync(fd)
    _held[path] = [fd, 1]
    return stale["pid"] if stale and stale["pid"] != os.getpid() else None


def release(run_dir: Path) -> None:
    """Undo one `acquire`; the last one empties the lock file (never removed: a waiting opener would then lock
    an unlinked file while a third process creates a new one)."""
    path = (Path(run_dir) / LOCK).resolve()
    entry = _held.get(path)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _held[path]
        os.ftruncate(entry[0], 0)
        os.close(entry[0])  # closing drops the flock


@contextmanager
def lock(run_dir: Path):
    """`acquire` for the duration of a block."""
    acquire(run_dir)
    try:
        yield
    finally:
        release(run_dir)


def _owner(fd: int) -> dict | None:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode())
    except ValueError:  # empty (released) or unreadable
        return None


# -- checkpoints --------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


class Checkpoints:
    """`checkpoints/step_N` folders, each written as `.partial_step_N` and renamed once its manifest is in."""

    pattern = re.compile(r"step_(\d+)")

    def __init__(self, folder: Path):
        self.dir = Path(folder)

    def path(self, step: int) -> Path:
        return self.dir / f"step_{step:07d}"

    def partial(self, step: int) -> Path:
        return self.dir / f".partial_step_{step:07d}"

    def all(self) -> list[tuple[int, Path]]:
        """Every `step_N` folder, complete or not, by step."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := self.pattern.fullmatch(p.name))]
        return sorted(found)

    @staticmethod
    def problem(folder: Path, hashes: bool = True) -> str | None:
        """Why `folder` is not a complete checkpoint, or None. Sizes only with `hashes=False` (cheap)."""
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            listed = manifest["files"]
        except FileNotFoundError:
            return "no manifest: torn, or written by a tdm older than its manifests"
        except (ValueError, KeyError, TypeError):
            return "unreadable manifest"
        on_disk = {str(p.relative_to(folder)) for p in _files(folder)}
        if set(listed) - on_disk:
            return f"missing {sorted(set(listed) - on_disk)[0]}"
        for name, entry in listed.items():
            p = folder / name
            try:
                size, digest = entry["bytes"], entry["sha256"]
            except (KeyError, TypeError):
                return "unreadable manifest"
            if p.stat().st_size != size:
                return f"{name} has {p.stat().st_size} bytes, not {size}"
            if hashes and _sha256(p) != digest:
                return f"{name} is corrupt (SHA-256 differs)"
        return None

    def commit(self, partial: Path, step: int) -> Path:
        """Flush the written files, list them in the manifest, rename the folder into place."""
        files = _files(partial)
        for p in files:
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
        listing = {str(p.relative_to(partial)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
        write_json(partial / MANIFEST, {"step": step, "files": listing})
        final = self.path(step)
        if final.exists():  # a torn folder of the same step (its run died before finishing it)
            shutil.rmtree(final)
        os.rename(partial, final)
        fsync_dir(self.dir)
        return final

    def prune(self, keep: int) -> None:
        """Keep the newest `keep` complete checkpoints (at least the one just written) and remove partial folders.
        An incomplete `step_N` is left alone (named on resume, replaced when step N is written again): it may be
        a checkpoint of an older tdm, which only its owner can judge."""
        complete = [p for _, p in self.all() if self.problem(p, hashes=False) is None]
        for p in complete[:-keep] + list(self.dir.glob(".partial_step_*")):
            shutil.rmtree(p)

    def newest_complete(self) -> tuple[int, Path | None, list[str]]:
        """The newest checkpoint whose files all match their manifest (hashed), and what was skipped on the way."""
        skipped = []
        for step, path in reversed(self.all()):
            why = self.problem(path)
            if why is None:
                return step, path, skipped
            skipped.append(f"{path.name} ({why})")
        return 0, None, skipped

    def any_complete(self) -> bool:
        return any(self.problem(p, hashes=False) is None for _, p in self.all())


# -- the run folder -----------------------------------------------------------------------
def prepare(run_dir: str | Path) -> Path:
    """The run folder, created if needed; a clear error if the path is a file."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"{run_dir} is a file, not a run folder; pass another --output")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _flat(d: dict) -> dict:
    return {f"{s}.{k}": v for s, vals in d.items() if isinstance(vals, dict) for k, v in vals.items()} | {
        s: v for s, v in d.items() if not isinstance(v, dict)}


def config_changes(run_dir: Path, now: dict) -> list[str] | None:
    """How `now` differs from the folder's `config.yaml` outside RESUMABLE (None when it holds none)."""
    path = Path(run_dir) / CONFIG
    if not path.exists():
        return None
    try:
        prev = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise RunError(f"{path} is not readable YAML ({type(err).__name__}); delete it or pass another "
                       "--output") from None
    if not isinstance(prev, dict):
        raise RunError(f"{path} holds no config; delete it or pass another --output")
    prev, now = _flat(prev), _flat(now)
    keys = [k for k in dict.fromkeys([*prev, *now]) if k not in RESUMABLE]
    return [f"{k}: {prev.get(k, '(absent)')!r} -> {now.get(k, '(absent)')!r}" for k in keys
            if prev.get(k, "(absent)") != now.get(k, "(absent)")]


def has_progress(run_dir: Path) -> bool:
    """A student or a complete checkpoint: something a start with another config would destroy."""
    return (Path(run_dir) / STUDENT).exists() or Checkpoints(Path(run_dir) / "checkpoints").any_complete()


def start(run_dir: Path, cfg_dict: dict, dump: str, main: bool) -> str | None:
    """Refuse a folder holding another run's progress; otherwise record the config (main process). A start that
    failed before training left no progress: its folder is reused, its caches cleared. Returns a note to print."""
    changes = config_changes(run_dir, cfg_dict)
    note = None
    if changes:
        if has_progress(run_dir):
            shown = "; ".join(changes[:3]) + (f"; and {len(changes) - 3} more" if len(changes) > 3 else "")
            raise RunError(f"{run_dir} holds a run with another config ({shown}); pass another --output to start "
                           "afresh, or delete the folder")
        note = f"{run_dir} held a start with another config that never trained; starting afresh"
        if main:
            for name in DERIVED:
                (Path(run_dir) / name).unlink(missing_ok=True)
    if main:
        write_text(Path(run_dir) / CONFIG, dump)
    return note


def student_step(run_dir: str | Path) -> int | None:
    """The iteration `student.safetensors` was written at (None: no student, an unreadable one, which training
    writes again from its final checkpoint, or one without the record)."""
    path = Path(run_dir) / STUDENT
    if not path.exists():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            step = (f.metadata() or {}).get("step")
    except SafetensorError:
        return None
    return int(step) if step is not None else None


def trim_log(path: Path, step: int) -> None:
    """Keep the training log's lines up to `step`: the iterations after it are run again on resume (no duplicate
    steps), and a line torn by a kill is dropped."""
    if not path.exists():
        return
    kept = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    if len(kept) != len(lines):
        write_text(path, "".join(f"{line}\n" for line in kept))


# -- signals ------------------------------------------------------------------------------
class StopRequests:
    """While active, SIGINT and SIGTERM are recorded instead of raised: the training loop reads `signum` at each
    iteration boundary, finishes there, checkpoints and exits. Later signals change nothing (a kill -9 is safe at
    any moment: every write is atomic). Only the main thread can own signal handlers; elsewhere this is inert."""

    signals = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> "StopRequests":
        self.signum = 0
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._record) for s in self.signals}
        return self

    def _record(self, signum, frame) -> None:
        self.signum = self.signum or signum

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


# -- a finished run, loaded ---------------------------------------------------------------
# (tdm.config, the families and torch load on first use: `tdm --help` and the CLI's checks stay quick)
@dataclass
class Run:
    cfg: Config
    family: object
    student: Denoiser

    @property
    def Ks(self) -> list[int]:
        return self.cfg.student.unify or [self.cfg.student.steps]

    def grid(self, K: int) -> torch.Tensor:
        return self.family.schedule.grid(K, self.cfg.student.grid_spec())

    def draw(self, n: int, generator: torch.Generator, labels: torch.Tensor | None = None):
        """Start noise and conditions for `n` samples (labels drawn from the teacher unless given)."""
        import torch

        fam = self.family
        classes = getattr(fam, "num_classes", 0)
        if labels is not None and not classes:
            raise ValueError(f"--labels needs a class-conditional run; this {self.cfg.teacher.family} run has no "
                             "classes")
        if labels is not None and not ((labels >= 0) & (labels < classes)).all():
            raise ValueError(f"--labels {labels.unique().tolist()}: this run's classes are 0..{classes - 1}")
        x_T = torch.randn(fam.sample_shape(n), generator=generator)
        cond, uncond = fam.sample_cond(n, generator)
        if labels is not None and torch.is_tensor(cond):
            cond = labels.to(cond)
        elif labels is not None:  # prompt-conditioned: the family picks a prompt per label
            cond = fam.label_cond(labels, generator)
        return x_T, cond, uncond

    def sample(self, K: int, x_T: torch.Tensor, cond, return_trajectory: bool = False,
               generator: torch.Generator | None = None):
        """The student's K-step sample from `x_T`; a stochastic student's own draws come from `generator` (a fixed
        seed by default; one generator across the batches of one sample set keeps their draws independent)."""
        import torch

        from .core.samplers import sample_student

        extra = {"k_steps": torch.tensor(K)} if self.cfg.student.unify else {}
        generator = torch.Generator().manual_seed(0) if generator is None else generator
        return sample_student(self.student, x_T, self.grid(K), cond, stochastic=self.cfg.student.stochastic,
                              generator=generator, return_trajectory=return_trajectory, **extra)


def run_config(run_dir: str | Path) -> Config:
    """A finished run's config, checked; nothing loads."""
    from .config import Config, validate

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a run folder (it does not exist or is a file)")
    for name in (CONFIG, STUDENT):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir} is not a finished run: {name} is missing (`tdm distill` writes it at "
                                    "the end of training)")
    try:
        cfg = Config.from_dict(yaml.safe_load((run_dir / CONFIG).read_text(encoding="utf-8")))
    except (yaml.YAMLError, UnicodeDecodeError, AttributeError, KeyError, ValueError) as err:
        raise RunError(f"{run_dir / CONFIG} is not a config this tdm reads ({_first_line(err)})") from None
    validate(cfg)
    cfg.train.progress = False
    return cfg


def load_run(run_dir: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
             cfg: Config | None = None) -> Run:
    """A finished run's family and student on `device`, its frozen networks in `dtype` (float32 by default); `cfg`:
    its config as `run_config` reads it, with changes that leave the student as trained (`tdm eval`'s eval.*)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .families import build_family

    run_dir = Path(run_dir)
    cfg = run_config(run_dir) if cfg is None else cfg
    family = build_family(cfg, device, run_dir, dtype or torch.float32)
    net = family.role_nets(family.new_net(), ["student"])["student"]
    try:
        weights = load_file(str(run_dir / STUDENT), device=str(device))
        net.load_state_dict(weights)
    except (SafetensorError, RuntimeError, KeyError) as err:
        raise RunError(f"{run_dir / STUDENT} does not load into the run's network ({_first_line(err)}); it is "
                       "damaged or from another config") from None
    if not all(torch.isfinite(w).all() for w in weights.values()):
        raise RunError(f"{run_dir / STUDENT} holds non-finite weights (written before tdm's non-finite guard); "
                       "train the run again in another --output")
    return Run(cfg, family, family.wrap(net.eval()))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
