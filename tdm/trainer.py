"""The trainer shared by all methods: accelerate, optimisers, checkpoints, resume, logging."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import AutocastKwargs, DistributedType, ProjectConfiguration, set_seed
from safetensors.torch import save_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from .config import Config, dump
from .families import DTYPES, build_family
from .methods.tdm import TDM
from .rng import RunRNG
from .schedules import GridSpec, timestep_grid


class TrainState:
    """Step counter and the method's random generators, saved with every checkpoint."""

    def __init__(self, rng: RunRNG):
        self.step = 0
        self.rng = rng

    def state_dict(self) -> dict:
        return {"step": self.step, "rng": self.rng.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.rng.load_state_dict(state["rng"])


def _tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def _floats(m: dict) -> dict:
    """Metrics with device scalars read (this waits for the device: at log steps only)."""
    return {k: v.item() if torch.is_tensor(v) else v for k, v in m.items()}


def use_tf32() -> None:
    """TF32 tensor cores for fp32 matmuls and convolutions on CUDA (10 mantissa bits instead of 23)."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9
        torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


class Trainer:
    """Builds teacher, student and fake score from a config and runs a method's iterations."""

    def __init__(self, cfg: Config, run_dir: str | Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        o, tr = cfg.optim, cfg.train
        self.accelerator = acc = Accelerator(
            mixed_precision=tr.mixed_precision,
            project_config=ProjectConfiguration(str(self.run_dir), logging_dir=str(self.run_dir / "logs")),
            log_with="tensorboard" if _tensorboard_available() else None,
            # autocast's weight-cast cache would hold a low-precision copy of every trainable weight through the
            # iteration, and before torch 2.10 hand the no-grad rollout's copies (no history) to the student's
            # forward with grad, which then gets no gradient (pytorch/pytorch#112583)
            kwargs_handlers=[AutocastKwargs(cache_enabled=False)])
        if tr.mixed_precision == "fp16" and acc.device.type == "cpu":
            raise ValueError("train.mixed_precision=fp16 needs a GPU (accelerate runs fp16 on the CPU as fp32); "
                             "use bf16 or no")
        if acc.distributed_type == DistributedType.DEEPSPEED:
            raise ValueError("DeepSpeed is not supported: the student and the fake score are two models with two "
                             "optimisers; use DDP (LoRA mode) or FSDP (full mode) through accelerate launch")
        if tr.batch_size % acc.num_processes:
            raise ValueError(f"train.batch_size={tr.batch_size} is the global batch: it must be a multiple of the "
                             f"{acc.num_processes} processes")
        if tr.tf32 and acc.device.type == "cuda":
            use_tf32()
        set_seed(tr.seed)
        if acc.is_main_process:
            (self.run_dir / "config.yaml").write_text(dump(cfg))
        self.family = family = build_family(cfg, acc.device, self.run_dir, DTYPES[tr.mixed_precision])
        with acc.main_process_first():  # the main process fits and caches; the others load its file
            pretrained = family.pretrained_net(self.run_dir / "pretrained.safetensors",
                                               generator=torch.Generator().manual_seed(tr.seed))
        student_net, fake_net = family.student_and_fake(pretrained)

        def optimiser(net, lr):
            params = net.trainable_parameters() if hasattr(net, "trainable_parameters") else list(net.parameters())
            kwargs = dict(lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
            if o.adam_8bit:
                try:
                    from bitsandbytes.optim import AdamW8bit
                except ImportError:
                    raise ValueError("optim.adam_8bit=true needs bitsandbytes: pip install bitsandbytes") from None
                opt = AdamW8bit(params, **kwargs)
            else:  # one fused kernel per step instead of one launch per tensor and moment
                opt = torch.optim.AdamW(params, fused=params[0].device.type == "cuda", **kwargs)
            warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / max(1, o.warmup)))
            return opt, warm

        opt_G, sched_G = optimiser(student_net, o.lr_student)
        opt_F, sched_F = optimiser(fake_net, o.lr_fake)
        (student_net, fake_net, self.opt_G, self.opt_F, self.sched_G, self.sched_F) = acc.prepare(
            student_net, fake_net, opt_G, opt_F, sched_G, sched_F)
        self.student_net, self.fake_net = student_net, fake_net
        self.ema = None
        if o.ema > 0:
            self.ema = AveragedModel(acc.unwrap_model(student_net), multi_avg_fn=get_ema_multi_avg_fn(o.ema))
            acc.register_for_checkpointing(self.ema)
        self.state = TrainState(RunRNG(tr.seed + 1, acc.device, acc.process_index, acc.num_processes))
        acc.register_for_checkpointing(self.state)

        s = cfg.student
        Ks = s.unify or [s.steps]
        self.method = TDM(cfg.tdm, family.schedule, family.teacher, family.wrap(student_net), family.wrap(fake_net),
                          cfg.teacher.guidance, Ks, GridSpec(s.grid, s.grid_N, s.grid_shift),
                          k_conditioning=bool(s.unify), fixed_shapes=tr.compile)
        self.grad_norms: dict[str, torch.Tensor] = {}

    # -- one optimiser step of a role, called by the method ------------------------------
    def _update(self, role: str, loss: torch.Tensor) -> None:
        acc = self.accelerator
        net, opt, sched = ((self.student_net, self.opt_G, self.sched_G) if role == "student"
                           else (self.fake_net, self.opt_F, self.sched_F))
        role_net = acc.unwrap_model(net)
        if hasattr(role_net, "activate"):  # LoRA roles share one base: recomputation must see this role
            role_net.activate()
        acc.backward(loss)
        clip = self.cfg.optim.grad_clip if role == "student" and self.cfg.optim.grad_clip > 0 else float("inf")
        params = net.parameters() if acc.distributed_type == DistributedType.FSDP else [
            p for group in opt.param_groups for p in group["params"]]
        self.grad_norms[role] = acc.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if role == "student" and self.ema is not None:
            self.ema.update_parameters(acc.unwrap_model(net))

    # -- checkpoints ---------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        ckpts = sorted(self.checkpoint_dir.glob("step_*"))
        return ckpts[-1] if ckpts else None

    def save_checkpoint(self) -> None:
        acc = self.accelerator
        acc.save_state(str(self.checkpoint_dir / f"step_{self.state.step:07d}"))
        if acc.is_main_process:
            for old in sorted(self.checkpoint_dir.glob("step_*"))[: -self.cfg.train.keep_checkpoints]:
                shutil.rmtree(old)
        acc.wait_for_everyone()

    def resume(self) -> bool:
        latest = self.latest_checkpoint()
        if latest is None:
            return False
        self.accelerator.load_state(str(latest))
        return True

    def save_student(self) -> Path:
        """Final student weights (EMA if enabled) for `tdm sample` / `tdm eval`."""
        acc = self.accelerator
        state = self.ema.module.state_dict() if self.ema is not None else acc.get_state_dict(self.student_net)
        path = self.run_dir / "student.safetensors"
        if acc.is_main_process:
            save_file({k: v.detach().float().cpu().contiguous() for k, v in state.items()}, str(path))
        return path

    def preview(self) -> None:
        """Fixed prompts and noise through the student at K = 1, 2, 4: `previews/step_N.png` and the trackers."""
        if not (self.accelerator.is_main_process and hasattr(self.family, "preview")):
            return
        s = self.cfg.student

        def grid_of(K: int) -> torch.Tensor:
            return timestep_grid(K, GridSpec(s.grid, s.grid_N, s.grid_shift), self.family.schedule.T,
                                 self.family.schedule.discrete)

        path = self.run_dir / "previews" / f"step_{self.state.step:07d}.png"
        with self.accelerator.autocast():
            image = self.family.preview(self.method.student, grid_of, path)
        for tracker in self.accelerator.trackers:
            tracker.log_images({"preview": image.permute(1, 2, 0).numpy()}, step=self.state.step, dataformats="HWC")

    # -- the loop ------------------------------------------------------------------------
    def _step(self) -> dict:
        """One iteration on this process's share of the global batch; its metrics stay on the device."""
        acc, tr, rng = self.accelerator, self.cfg.train, self.state.rng
        B = tr.batch_size // acc.num_processes
        cond, uncond = (rng.local(c) for c in self.family.sample_cond(tr.batch_size, rng.host))
        x_T = rng.randn(self.family.sample_shape(B))
        with acc.autocast():
            m = self.method.iteration(x_T, cond, uncond, self._update, rng)
        self.state.step += 1
        m.update({f"grad_norm_{k}": v for k, v in self.grad_norms.items()}, step=self.state.step)
        return m

    def _log(self, m: dict, log_path: Path, t0: float) -> dict:
        """Metrics averaged over processes, read from the device, written to the log and the trackers."""
        acc = self.accelerator
        keys = [k for k, v in m.items() if torch.is_tensor(v)]
        mean = acc.reduce(torch.stack([m[k].float() for k in keys]), "mean") if acc.num_processes > 1 else None
        m = _floats({**m, **dict(zip(keys, mean))} if mean is not None else m)
        m["wall_s"] = time.perf_counter() - t0
        acc.log({k: v for k, v in m.items() if k != "step"}, step=self.state.step)
        if acc.is_main_process:
            with log_path.open("a") as f:
                f.write(json.dumps(m) + "\n")
        return m

    def train(self) -> list[dict]:
        """Run to `train.iterations`; returns this process's metrics per iteration."""
        acc, tr = self.accelerator, self.cfg.train
        resumed = self.resume()
        flat = {f"{sec}.{k}": str(v) if isinstance(v, (list, type(None))) else v
                for sec, vals in self.cfg.to_dict().items() if isinstance(vals, dict) for k, v in vals.items()}
        acc.init_trackers("tdm", config=flat)
        log_path = self.run_dir / "train_log.jsonl"
        history: list[dict] = []
        bar = tqdm(total=tr.iterations, initial=self.state.step, desc="TDM",
                   disable=not (tr.progress and acc.is_main_process))
        if resumed:
            bar.write(f"resumed from step {self.state.step}")
        t0 = time.perf_counter()
        try:
            while self.state.step < tr.iterations:
                m = self._step()
                history.append(m)
                bar.update(1)
                if self.state.step % tr.log_every == 0 or self.state.step == tr.iterations:
                    logged = self._log(m, log_path, t0)
                    bar.set_postfix(L_F=f"{logged['loss_fake']:.3g}", L_G=f"{logged['loss_student']:.3g}",
                                    D=f"{logged['D']:.3g}", fwd=logged["forwards"])
                if self.state.step % tr.checkpoint_every == 0 or self.state.step == tr.iterations:
                    self.save_checkpoint()
                if tr.preview_every and self.state.step % tr.preview_every == 0:
                    self.preview()
        except KeyboardInterrupt:
            bar.write(f"interrupted: checkpointing step {self.state.step}; run the same command to resume")
            self.save_checkpoint()
            raise
        bar.close()
        self.save_student()
        acc.end_training()
        return [_floats(m) for m in history]

