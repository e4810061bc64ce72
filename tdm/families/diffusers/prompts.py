"""Prompts for text-conditioned teachers: read, cleaned, and their embeddings cached on disk."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from ...files import save_tensors


def read_prompts(source: str | Path, max_chars: int = 1000) -> list[str]:
    """Prompts from a text file (one per line), JSONL (`prompt` field) or a `datasets` folder on disk.

    Empty lines and duplicates are dropped, over-long prompts truncated, each with a warning that
    says how many; an empty result is an error.
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"data.prompts: {path} does not exist; give a text file, JSONL or a `datasets` "
                                "folder (--prompts)")
    if path.is_dir():
        if not (path / "dataset_info.json").is_file() and not (path / "dataset_dict.json").is_file():
            raise ValueError(f"data.prompts: {path} is a folder but not a `datasets` folder (no dataset_info.json; "
                             "write one with Dataset.save_to_disk), nor a file of prompts")
        try:
            from datasets import load_from_disk
        except ImportError:
            raise ValueError(f"data.prompts: {path} is a `datasets` folder; reading it needs the datasets package "
                             "(pip install datasets), or give a text or JSONL file") from None
        data = load_from_disk(str(path))
        if not hasattr(data, "column_names") or "prompt" not in data.column_names:
            raise ValueError(f"data.prompts: the dataset {path} needs one split with a 'prompt' column (it has "
                             f"{getattr(data, 'column_names', 'several splits')})")
        raw = list(data["prompt"])
    else:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise ValueError(f"data.prompts: {path} is not UTF-8 text (byte {err.start}); give a text file, JSONL or "
                             "a `datasets` folder") from None
        raw = lines if path.suffix != ".jsonl" else _jsonl_prompts(path, lines)
    prompts, seen, empty, dup, long = [], set(), 0, 0, 0
    for p in raw:
        p = " ".join(str(p).split())
        if not p:
            empty += 1
            continue
        if len(p) > max_chars:
            p, long = p[:max_chars], long + 1
        if p in seen:
            dup += 1
            continue
        seen.add(p)
        prompts.append(p)
    if not prompts:
        raise ValueError(f"data.prompts: {path} holds no usable prompt")
    if empty or dup or long:
        warnings.warn(f"{path}: dropped {empty} empty and {dup} duplicate prompts, truncated {long} "
                      f"over {max_chars} characters; {len(prompts)} remain", stacklevel=2)
    return prompts


def _jsonl_prompts(path: Path, lines: list[str]) -> list:
    """The `prompt` field of each non-empty JSONL line; an error names the file and the line."""
    raw = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"data.prompts: {path}:{i}: not valid JSON ({err.msg}); one object a line, e.g. "
                             '{"prompt": "a cat"}') from None
        if not isinstance(row, dict) or "prompt" not in row:
            raise ValueError(f"data.prompts: {path}:{i}: no 'prompt' field")
        raw.append(row["prompt"])
    return raw


def cached_embeddings(prompts: list[str], encode: Callable[[list[str]], dict[str, torch.Tensor]],
                      cache_dir: str | Path, key: str, extra: list[str] = ()) -> dict[str, torch.Tensor]:
    """Encode every prompt, the empty prompt after them, then the `extra` prompts (validation) once, in one load of
    the encoders; reuse the file on later runs.

    `encode` maps all prompts to a dict of tensors with the batch on dim 0 (it loads the text
    encoders, batches, and lets them go when it returns); `key` names the
    encoder (teacher folder and family) so a cache is never reused for another model.
    """
    text = "\n".join(prompts) + "\0" + key + ("\0" + "\n".join(extra) if extra else "")  # no extra: as before
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"prompt_embeddings_{digest}.safetensors"
    if path.exists():
        return load_file(str(path))
    out = {k: v.contiguous() for k, v in encode(prompts + [""] + list(extra)).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(out, path)
    return out
