"""Prompts for text-conditioned teachers: read, cleaned, and their embeddings cached on disk."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file


def read_prompts(source: str | Path, max_chars: int = 1000) -> list[str]:
    """Prompts from a text file (one per line), JSONL (`prompt` field) or a `datasets` folder on disk.

    Empty lines and duplicates are dropped, over-long prompts truncated, each with a warning that
    says how many; an empty result is an error.
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"prompt source {path} does not exist")
    if path.is_dir():
        from datasets import load_from_disk

        data = load_from_disk(str(path))
        if "prompt" not in data.column_names:
            raise ValueError(f"{path}: the dataset has no 'prompt' column (columns: {data.column_names})")
        raw = list(data["prompt"])
    elif path.suffix == ".jsonl":
        raw = []
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                row = json.loads(line)
                if "prompt" not in row:
                    raise ValueError(f"{path}:{i}: no 'prompt' field")
                raw.append(row["prompt"])
    else:
        raw = path.read_text().splitlines()
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
    if empty or dup or long:
        warnings.warn(f"{path}: dropped {empty} empty and {dup} duplicate prompts, truncated {long} "
                      f"over {max_chars} characters; {len(prompts)} remain", stacklevel=2)
    if not prompts:
        raise ValueError(f"{path} holds no usable prompt")
    return prompts


def cached_embeddings(prompts: list[str], encode: Callable[[list[str]], dict[str, torch.Tensor]],
                      cache_dir: str | Path, key: str) -> dict[str, torch.Tensor]:
    """Encode every prompt (and the empty prompt, last) once; reuse the file on later runs.

    `encode` maps all prompts to a dict of tensors with the batch on dim 0 (it loads the text
    encoders, batches, and lets them go when it returns); `key` names the
    encoder (teacher folder and family) so a cache is never reused for another model.
    """
    digest = hashlib.sha256(("\n".join(prompts) + "\0" + key).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"prompt_embeddings_{digest}.safetensors"
    if path.exists():
        return load_file(str(path))
    out = {k: v.contiguous() for k, v in encode(prompts + [""]).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path))
    return out
