"""A run folder: one run per folder (a lock), its config, atomic writes, checkpoints with manifests, the resume rule,
and SIGINT / SIGTERM turned into a stop at the next iteration boundary.

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
from pathlib import Path
from typing import Callable

import yaml

from .errors import RunError

CONFIG, LOCK, LOG, MANIFEST = "config.yaml", "tdm.lock", "train_log.jsonl", "manifest.json"
STUDENT = "student.safetensors"
# What a run may change when it is started again on its folder: none of them changes what the iterations compute.
RESUMABLE = ("train.iterations", "train.progress", "train.max_nonfinite_skips", "train.eval_samples",
             "train.log_every", "train.checkpoint_every", "train.keep_checkpoints")
# Caches of a start that never trained: cleared when the folder is started afresh with another config.
DERIVED = ("pretrained.safetensors", LOG)


# -- atomic writes ------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)`, flush it to the disk, rename it to `path`: readers see the old file or the new one, never a
    torn one. A failed write (a full disk) leaves no partial file behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj) -> Path:
    """Strict JSON (no NaN or Infinity, which JSON does not have), written atomically."""
    return write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def save_tensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata))


def read_json(path: str | Path):
    """A JSON file; an error names the file (and the line)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None


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
        _fsync_dir(self.dir)
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
