"""Files that appear whole or not at all: every write goes to a temporary name, is flushed to the disk and renamed
(a rename within a folder is atomic); JSON is strict (no NaN); a read error names the file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)`, flush it to the disk, rename it to `path`: readers see the old file or the new one, never a
    torn one. A failed write (a full disk) leaves no partial file behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")  # per process: two may write one cache at once
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
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
