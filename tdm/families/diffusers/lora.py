"""LoRA roles on one frozen base: an adapter per role of the method ('student', 'fake', ...), the teacher the same
base with adapters off, and a view of the base per role that trains, saves and loads its own adapter only."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .base import DiffusersFamily


class LoRARoles:
    """Routes one base carrying the adapters 'student' and 'fake' through one role at a time (None = the
    teacher, adapters off).

    peft's model-level switches walk every module and rescan every parameter, several times per iteration;
    here the LoRA layers are found once and the current role is remembered, so re-selecting it is free.
    peft clears `requires_grad` of the layers it switches away from: a role is therefore selected again
    before its backward (`RoleNet.activate`).
    """

    def __init__(self, base: nn.Module):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.layers = [m for m in base.modules() if isinstance(m, BaseTunerLayer)]
        self.current: str | None | bool = False  # False: unknown

    def select(self, role: str | None) -> None:
        if role == self.current:
            return
        switch_on = role is not None and self.current in (None, False)  # adapters may be off (teacher)
        for layer in self.layers:
            if role is None:
                layer.enable_adapters(False)
                continue
            if switch_on:
                layer.enable_adapters(True)
            layer.set_adapter(role)
        self.current = role


def time_embedding(base: nn.Module, path: str) -> nn.Module | None:
    """The network's time-embedding MLP (a diffusers `TimestepEmbedding` at `path`, the family's
    `time_embedding_path`) whose output the step-count embedding of TDM-unify is added to (§6); None where the
    network has none there."""
    try:
        te = base.get_submodule(path) if path else None
    except AttributeError:
        return None
    return te if isinstance(getattr(te, "linear_2", None), nn.Linear) else None


def _add_k(module: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
    """Forward hook of the time embedding: adds the calling role's K embedding (none for the teacher)."""
    add = module.__dict__.get("_tdm_k_add")
    return out if add is None else out + add.to(out.dtype)


class RoleNet(nn.Module):
    """`net(x_t, t, cond, k_steps=None)` of one role: the base through `adapter` (None = the teacher) via
    `family.call`. `max_K` > 0 (TDM-unify, §6): the role owns a zero-initialised embedding of the step count K,
    added to the output of the network's time embedding, so that at initialisation the role equals the teacher."""

    def __init__(self, family: DiffusersFamily, base: nn.Module, adapter: str | None, max_K: int = 0):
        super().__init__()
        self.base = base
        self.adapter = adapter
        self.k_embed = None
        self._te_path = family.time_embedding_path
        if max_K:
            te = time_embedding(base, self._te_path)
            if te is None:
                raise ValueError(f"student.unify: the {type(base).__name__} network has no time embedding "
                                 f"{self._te_path!r} to add K to; remove student.unify")
            self.k_embed = nn.Embedding(max_K + 1, te.linear_2.out_features).to(family.device)
            nn.init.zeros_(self.k_embed.weight)
            if "_tdm_k_hook" not in te.__dict__:  # one hook per network, shared by the roles on it
                te._tdm_k_hook = te.register_forward_hook(_add_k)
        self._roles = family.roles if base is family.base else None  # full copies carry no adapters
        self._call = torch.compile(family.call) if family.cfg.train.compile else family.call
        self._dtype = family.dtype
        self._no_split_modules = getattr(base, "_no_split_modules", None)  # FSDP shards block by block

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict, k_steps: torch.Tensor | None = None,
                **extra) -> torch.Tensor:
        if extra:
            raise ValueError(f"diffusers teachers take no extra conditioning but k_steps, got {sorted(extra)}")
        if (k_steps is None) != (self.k_embed is None):
            raise ValueError("k_steps is given to a network without a step-count embedding" if self.k_embed is None
                             else "this network is K-conditioned (student.unify): pass k_steps")
        self.activate()
        te = time_embedding(self.base, self._te_path) if self.k_embed is not None else None
        if te is not None:
            te._tdm_k_add = self.k_embed(torch.as_tensor(k_steps, device=self.k_embed.weight.device).reshape(-1))
        try:
            if self._dtype == torch.float32:
                return self._call(self.base, x_t, t, cond)
            # the frozen networks' dtype is the compute dtype wherever the network runs (training, previews, eval)
            with torch.autocast(x_t.device.type, self._dtype, cache_enabled=False):
                return self._call(self.base, x_t, t, cond)
        finally:
            if te is not None:
                te._tdm_k_add = None

    def activate(self) -> None:
        """Route the shared base through this role. The trainer calls it again before this role's
        backward: gradient checkpointing recomputes the forward then, after other roles ran."""
        if self._roles is not None:
            self._roles.select(self.adapter)

    def trainable_parameters(self) -> list[nn.Parameter]:
        k = [self.k_embed.weight] if self.k_embed is not None else []
        if self.adapter is None:
            return [p for p in self.base.parameters() if p.requires_grad] + k
        return list(self._adapter_params().values())

    def _adapter_params(self) -> dict[str, nn.Parameter]:
        """The adapter's weights (network names) and the role's K embedding ('k_embed.weight')."""
        params = {n: p for n, p in self.base.named_parameters() if f".{self.adapter}." in n}
        return {**params, "k_embed.weight": self.k_embed.weight} if self.k_embed is not None else params

    # A LoRA role's weights are its adapter alone: checkpoints and `student.safetensors` then hold
    # megabytes, not a copy of the base per role.
    def state_dict(self, *args, **kwargs):
        if self.adapter is None:
            return super().state_dict(*args, **kwargs)
        return {n: p.detach() for n, p in self._adapter_params().items()}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self.adapter is None:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        params = self._adapter_params()
        missing, unexpected = sorted(set(params) - set(state_dict)), sorted(set(state_dict) - set(params))
        if missing or unexpected:  # a LoRA role restores all of its adapter or nothing
            raise KeyError(f"adapter '{self.adapter}' weights do not match: {len(missing)} missing, "
                           f"{len(unexpected)} unexpected (different lora.rank or lora.targets?)")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state_dict[n])
        return nn.modules.module._IncompatibleKeys([], [])
