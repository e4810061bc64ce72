"""Row gathers with host-computed indices, shared by the methods' rollouts: no boolean masks, which wait on the
device; a full batch is passed through untouched."""

from __future__ import annotations

import torch


def index_of(rows: torch.Tensor, B: int, device: torch.device) -> torch.Tensor | slice:
    return slice(None) if len(rows) == B else rows.to(device)


def take(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return x if len(rows) == x.shape[0] else x.index_select(0, rows.to(x.device))


def put(x: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    """`x[rows] = values`, with `rows` a host index tensor or a boolean host mask."""
    if rows.dtype == torch.bool:
        rows = rows.nonzero().squeeze(1)
        values = take(values, rows)
    if len(rows) == x.shape[0]:
        x.copy_(values)
    elif len(rows):
        x.index_copy_(0, rows.to(x.device), values)
