"""Live bytes of a network's calls at real size, measured on the meta device (nothing is allocated).

The real diffusers network, built from its config with meta tensors, runs forward and backward under two
modes: `LiveBytes` adds up the bytes of every storage an op creates until it is freed, `GPUSemantics`
makes the calls behave as on a GPU (fused attention, CUDA autocast). tdm.estimate composes the passes
into the phases of one TDM iteration (§4).
"""

from __future__ import annotations

import functools
import json
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .config import Config
from .families import DTYPES


class LiveBytes(TorchDispatchMode):
    """Adds up the bytes of every storage an op creates until it is freed; `peak` is the maximum since
    `reset()`. Views share their storage and count once; storages alive before (`ignore`) never count."""

    def __init__(self, ignore=()):
        super().__init__()
        self.live = self.peak = 0
        self._alive: dict[int, object] = {id(t.untyped_storage()): None for t in ignore}

    def _free(self, key: int, n: int) -> None:
        self.live -= n
        self._alive.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if id(st) not in self._alive:
                    self._alive[id(st)] = weakref.finalize(st, self._free, id(st), st.nbytes())
                    self.live += st.nbytes()
        self.peak = max(self.peak, self.live)
        return out

    def reset(self) -> int:
        """Start a new peak from the bytes live now, and return them."""
        self.peak = self.live
        return self.live


class GPUSemantics(TorchFunctionMode):
    """What a GPU run does that the meta device would not: fused attention (flash and memory-efficient
    kernels save the output and its log-sum-exp, never the L x L matrix) and, with `dtype`, CUDA autocast's
    casts (matmuls and convolutions in `dtype`; norms, pow, exp in fp32; softmax and sum output fp32).
    The casts of the trainable fp32 weights are made up front for `trainable`, so that the passes never count
    them: tdm.estimate adds them to the passes with grad, which save them for the backward."""

    LOW = (F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose2d, torch.matmul, torch.Tensor.matmul,
           torch.Tensor.__matmul__, torch.mm, torch.bmm, torch.baddbmm, torch.addmm, torch.einsum,
           F.scaled_dot_product_attention)
    FP32 = (F.group_norm, F.layer_norm, torch.exp, torch.Tensor.exp, torch.pow, torch.Tensor.pow,
            torch.Tensor.__pow__, torch.rsqrt, torch.Tensor.rsqrt, torch.log, torch.Tensor.log, F.softplus)
    FP32_OUT = (F.softmax, torch.softmax, torch.Tensor.softmax, torch.sum, torch.Tensor.sum)

    def __init__(self, dtype: torch.dtype | None, trainable=()):
        super().__init__()
        self.policy = {} if dtype is None else {
            **{f: dtype for f in self.LOW}, **{f: torch.float32 for f in self.FP32},
            **{f: "out" for f in self.FP32_OUT}}
        self.casts = {id(p): p.to(dtype) for p in trainable if dtype is not None and p.dtype == torch.float32}

    def _cast(self, x, dtype):
        if isinstance(x, (list, tuple)):
            return type(x)(self._cast(y, dtype) for y in x)
        if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype):
            return x
        return self.casts[id(x)] if id(x) in self.casts else x.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dtype = self.policy.get(func)
        if dtype == "out":
            if args[0].is_floating_point() and kwargs.get("dtype") is None:
                kwargs["dtype"] = torch.float32
        elif dtype is not None:
            args, kwargs = self._cast(args, dtype), {k: self._cast(v, dtype) for k, v in kwargs.items()}
        if func is F.scaled_dot_product_attention:
            # positional or by name (diffusers' attention dispatcher, FLUX's attention, names them)
            q, k, v, mask = (args[i] if len(args) > i else kwargs.get(n)
                             for i, n in enumerate(("query", "key", "value", "attn_mask")))
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, kwargs.get("is_causal", False), attn_mask=mask, scale=kwargs.get("scale"))[0]
        return func(*args, **kwargs)

    def checkpoint(self, module, *args):
        """diffusers' `_gradient_checkpointing_func`, with this mode active when backward recomputes."""
        def run(*a):
            with self:
                return module(*a)
        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


# -- meta networks ------------------------------------------------------------------------------
def meta_model(folder: Path):
    """A pipeline component built from its config on the meta device, its class named by model_index.json."""
    import importlib

    from accelerate import init_empty_weights

    library, name = json.loads((folder.parent / "model_index.json").read_text())[folder.name]
    cls = getattr(importlib.import_module(library), name)
    with init_empty_weights(include_buffers=True):
        if library == "diffusers":
            return cls.from_config(json.loads((folder / "config.json").read_text()))
        return cls(cls.config_class.from_pretrained(folder, local_files_only=True))


def bare_family(family_cls, path: str, resolution: int = 512, frames: int = 49, width: int = 0):
    """The family without its __init__ (nothing loaded): enough for `call`, `latent_shape` and `probe_cond`
    once `base` is set."""
    cfg = Config()
    cfg.teacher.path, cfg.teacher.resolution, cfg.teacher.frames, cfg.teacher.width = path, resolution, frames, width
    fam = object.__new__(family_cls)
    fam.cfg, fam.path = cfg, Path(path)
    fam._rope = {}  # CogVideoX's RoPE cache, which its `call` fills
    return fam


def kept_in_fp32(net, name: str, dtype: torch.dtype) -> bool:
    """Whether `from_pretrained(dtype=...)` keeps this tensor in fp32: diffusers keeps the modules named in
    `_keep_in_fp32_modules` (Wan's norms, time embedding) at any dtype; transformers (T5's `wo`) only for fp16."""
    from diffusers import ModelMixin

    if not isinstance(net, ModelMixin) and dtype != torch.float16:
        return False
    return any(keep in name.split(".") for keep in getattr(net, "_keep_in_fp32_modules", None) or [])


def meta_net(family_cls, path: str, dtype: torch.dtype = torch.float32):
    """The teacher's network (the family's class, e.g. PixArt's LoRA-capable one) in `dtype`, frozen."""
    from accelerate import init_empty_weights

    fam = bare_family(family_cls, path)
    config = json.loads((fam.path / fam.network_folder / "config.json").read_text())
    with init_empty_weights(include_buffers=True):
        net = fam.network_class.from_config(config)
    for name, m in net.named_modules():  # as from_pretrained(dtype=...): what the module makes itself keeps its
        for k, t in [*m._parameters.items(), *m._buffers.items()]:  # dtype, and so do `_keep_in_fp32_modules`
            if t is not None and t.is_floating_point() and k not in m._non_persistent_buffers_set \
                    and not kept_in_fp32(net, f"{name}.{k}", dtype):
                t.data = t.data.to(dtype)
    return net.requires_grad_(False)


@functools.cache
def probe_nets(family_cls, path: str, precision: str, lora: tuple | None) -> tuple:
    """Built once per setting: the frozen base in the mixed-precision dtype with, in LoRA mode, the trainer's
    'student' and 'fake' adapters in fp32; in full mode also one fp32 trainable copy, student and fake alike."""
    import warnings

    from accelerate import init_empty_weights
    from peft import LoraConfig

    base = meta_net(family_cls, path, DTYPES[precision])
    if not lora:
        return base, meta_net(family_cls, path).requires_grad_(True)
    rank, alpha, targets = lora
    with init_empty_weights(include_buffers=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: "Already found a peft_config attribute" at the second adapter
        for role in ("student", "fake"):  # the memory model is TDM's
            base.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                                        init_lora_weights="gaussian"), adapter_name=role)
    for name, p in base.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
    return base, None


def _setup(family_cls, path, resolution, frames, lora, precision, width=0):
    """The family, the fake's and the teacher's roles on the probe networks, the networks, their trainable
    parameters, and the two modes, live bytes counted from what exists now."""
    from .families.diffusers.lora import LoRARoles, RoleNet

    base, trainable = probe_nets(family_cls, path, precision, lora)
    fam = bare_family(family_cls, path, resolution, frames, width)
    fam.base, fam.roles = base, LoRARoles(base) if lora else None
    fam.dtype = torch.float32  # no autocast of the roles' own: GPUSemantics casts as CUDA's autocast would
    roles = {"fake": RoleNet(fam, base, "fake") if lora else RoleNet(fam, trainable, None),
             "teacher": RoleNet(fam, base, None)}
    nets = [base] if trainable is None else [base, trainable]
    params = [p for net in nets for p in net.parameters() if p.requires_grad]
    mode = GPUSemantics(None if precision == "no" else DTYPES[precision], params)
    held = [t for net in nets for t in (*net.parameters(), *net.buffers())]
    track = LiveBytes(ignore=held + list(mode.casts.values()))
    return fam, roles, nets, params, mode, track


def _inputs(fam, n: int):
    return (torch.empty(n, *fam.latent_shape(), device="meta"), torch.empty(n, device="meta"),
            fam.probe_cond(fam.base.config, n))


# -- the passes of one iteration --------------------------------------------------------------------
@functools.cache
def grad_pass(family_cls, path: str, resolution: int, frames: int, lora: tuple | None, precision: str,
              checkpointing: bool, B: int, width: int = 0) -> tuple[int, int, int]:
    """A trainable role's forward with grad at B rows, then its backward: (peak during the forward, bytes
    it leaves saved for backward, peak during the backward, its gradients included)."""
    fam, roles, nets, trainable, mode, track = _setup(family_cls, path, resolution, frames, lora, precision, width)
    for net in nets:
        net.enable_gradient_checkpointing(mode.checkpoint) if checkpointing else net.disable_gradient_checkpointing()
    with mode, track:
        x_t, t, cond = _inputs(fam, B)
        start = track.reset()
        loss = roles["fake"](x_t, t, cond).float().square().mean()
        forward, saved = track.peak - start, track.reset() - start
        roles["fake"].activate()  # what the trainer does before a backward: recomputation must see this role
        loss.backward()
        del loss
        backward = track.peak - start
        for p in trainable:
            p.grad = None
    return forward, saved, backward


@functools.cache
def no_grad_pass(family_cls, path: str, resolution: int, frames: int, lora: tuple | None, precision: str,
                 role: str, n: int, width: int = 0) -> int:
    """Peak bytes of one no-grad forward of `role` ('fake' or 'teacher') at n rows."""
    fam, roles, _, _, mode, track = _setup(family_cls, path, resolution, frames, lora, precision, width)
    with mode, track, torch.no_grad():
        x_t, t, cond = _inputs(fam, n)
        start = track.reset()
        roles[role](x_t, t, cond)
    return track.peak - start


@functools.cache
def decode_pass(path: str, precision: str, shape: tuple) -> int:
    """Peak bytes of one no-grad VAE decode of a (1, *shape) latent."""
    dtype = DTYPES[precision]
    vae = torch.nn.Module.to(meta_model(Path(path) / "vae"), dtype)
    track = LiveBytes(ignore=[*vae.parameters(), *vae.buffers()])
    with GPUSemantics(None if precision == "no" else dtype), track, torch.no_grad():
        vae.decode(torch.empty(1, *shape, device="meta", dtype=dtype))
    return track.peak
