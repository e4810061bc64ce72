"""The trainer shared by all methods: accelerate, a network and optimiser per role the method declares, checkpoints,
resume, logging, the non-finite guard. It never names a method (tdm/methods/base.py holds the contract)."""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import time
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import AutocastKwargs, DistributedType, ProjectConfiguration, broadcast_object_list, set_seed
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from . import run
from .config import Config, dump
from .core.rng import RunRNG
from .errors import Interrupted, NonFiniteError, RunError
from .families import DTYPES, build_family, check_inputs
from .files import save_tensors
from .methods.base import method_class


class TrainState:
    """Step counter, skipped non-finite updates and the method's random generators, saved with every checkpoint."""

    def __init__(self, rng: RunRNG):
        self.step = 0
        self.skipped = 0
        self.rng = rng

    def state_dict(self) -> dict:
        return {"step": self.step, "skipped": self.skipped, "rng": self.rng.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.skipped = int(state["skipped"])
        self.rng.load_state_dict(state["rng"])


def _floats(m: dict) -> dict:
    """Metrics with device scalars read (this waits for the device: at log steps only)."""
    return {k: v.item() if torch.is_tensor(v) else v for k, v in m.items()}


def use_tf32() -> None:
    """TF32 tensor cores for fp32 matmuls and convolutions on CUDA (10 mantissa bits instead of 23)."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9
        torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def lr_factor(warmup: int, decay: str, iterations: int, i: int) -> float:
    """The learning rate's factor at iteration `i`: linear warm-up over `warmup` iterations, then constant or a
    cosine to zero at `iterations` (the demo's schedule)."""
    if i < warmup:
        return (i + 1) / warmup
    if decay == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (i - warmup) / max(1, iterations - warmup))))


class Trainer:
    """Builds the teacher and the method's roles from a config and runs its iterations in a run folder it locks."""

    def __init__(self, cfg: Config, run_dir: str | Path):
        check_inputs(cfg)  # every field and input file, before anything loads
        self.cfg = cfg
        self.run_dir = run.prepare(run_dir)
        tr = cfg.train
        self.accelerator = acc = Accelerator(
            mixed_precision=tr.mixed_precision,
            project_config=ProjectConfiguration(str(self.run_dir), logging_dir=str(self.run_dir / "logs")),
            log_with=None if tr.report_to == "none" else tr.report_to,  # installed: check_inputs asked
            # autocast's weight-cast cache would hold a low-precision copy of every trainable weight through the
            # iteration, and before torch 2.10 hand the no-grad rollout's copies (no history) to the student's
            # forward with grad, which then gets no gradient (pytorch/pytorch#112583)
            kwargs_handlers=[AutocastKwargs(cache_enabled=False)],
            # train.batch_size is the global batch: one schedule step per iteration, not one per process
            step_scheduler_with_optimizer=False)
        if tr.mixed_precision == "fp16" and acc.device.type == "cpu":
            raise ValueError("train.mixed_precision=fp16 needs a GPU (accelerate runs fp16 on the CPU as fp32); "
                             "use bf16 or no")
        if acc.distributed_type == DistributedType.DEEPSPEED:
            raise ValueError("DeepSpeed is not supported: the student and the fake score are two models with two "
                             "optimisers; use DDP (LoRA mode) or FSDP (full mode) through accelerate launch")
        if tr.batch_size % acc.num_processes:
            raise ValueError(f"train.batch_size={tr.batch_size} is the global batch: it must be a multiple of the "
                             f"{acc.num_processes} processes")
        self.ckpts = run.Checkpoints(self.run_dir / "checkpoints")
        stale = self._on_main(lambda: run.acquire(self.run_dir))
        self._locked = True
        try:
            if stale and acc.is_main_process:
                print(f"note: took over the lock of process {stale}, which is no longer running", file=sys.stderr)
            note = self._on_main(lambda: run.start(self.run_dir, cfg.to_dict(), dump(cfg), main=True))
            if note and acc.is_main_process:
                print(f"note: {note}", file=sys.stderr)
            self._build(cfg)
        except BaseException:
            self.release()
            raise

    def _build(self, cfg: Config) -> None:
        acc, o, tr = self.accelerator, cfg.optim, cfg.train
        if tr.tf32 and acc.device.type == "cuda":
            use_tf32()
        set_seed(tr.seed)
        self.family = family = build_family(cfg, acc.device, self.run_dir, DTYPES[tr.mixed_precision])
        with acc.main_process_first():  # the main process fits and caches; the others load its file
            pretrained = family.pretrained_net(self.run_dir / "pretrained.safetensors",
                                               generator=torch.Generator().manual_seed(tr.seed))
        method_cls = method_class(cfg.method)
        self.roles = {r.name: r for r in method_cls.roles}
        nets = family.role_nets(pretrained, list(self.roles))

        def optimiser(net, lr):
            params = net.trainable_parameters() if hasattr(net, "trainable_parameters") else list(net.parameters())
            kwargs = dict(lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
            if o.adam_8bit:
                from bitsandbytes.optim import AdamW8bit  # present: check_inputs asked

                opt = AdamW8bit(params, **kwargs)
            else:  # one fused kernel per step instead of one launch per tensor and moment
                opt = torch.optim.AdamW(params, fused=params[0].device.type == "cuda", **kwargs)
            return opt, torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, o.warmup, o.decay, tr.iterations))

        # prepared in one call, nets then optimisers then schedules, in the method's role order: the checkpoint's
        # file names (model.safetensors, model_1.safetensors, optimizer.bin, ...) follow it
        names = list(self.roles)
        opts = [optimiser(nets[r], getattr(o, f"lr_{r}")) for r in names]
        prepared = acc.prepare(*(nets[r] for r in names), *(opt for opt, _ in opts), *(sched for _, sched in opts))
        n = len(names)
        self.nets, self.opts, self.scheds = (dict(zip(names, prepared[i * n:(i + 1) * n])) for i in range(3))
        self.ema = None
        if o.ema > 0:
            self.ema = AveragedModel(acc.unwrap_model(self.nets["student"]), multi_avg_fn=get_ema_multi_avg_fn(o.ema))
            acc.register_for_checkpointing(self.ema)
        self.state = TrainState(RunRNG(tr.seed + 1, acc.device, acc.process_index, acc.num_processes))
        acc.register_for_checkpointing(self.state)

        self.method = method_cls(cfg, family.schedule, family.teacher,
                                 {r: family.wrap(net) for r, net in self.nets.items()}, fixed_shapes=tr.compile)
        if self.ema is not None:  # a method may read it (a consistency target); its updates stay the trainer's
            self.method.student_ema = family.wrap(self.ema.module)
        self.grad_norms: dict[str, torch.Tensor] = {}
        # The non-finite guard: per role, the first step whose [loss, grad norm] was not finite (0: none yet).
        # Kept on the device, so an iteration never waits for it; read at log and checkpoint steps.
        self.first_bad = {r: torch.zeros(2, dtype=torch.int64, device=acc.device) for r in self.roles}
        self._skipped_now: list[str] = []
        self._update_order: list[str] = []  # roles in the order the method updates them within an iteration
        self.last_checkpoint = 0
        # Every process must stop at the same iteration on a signal: they agree at each boundary with a host-side
        # all-reduce (gloo: no device sync), on a group of its own when the training backend is NCCL.
        self._stop_group = None
        if acc.num_processes > 1 and torch.distributed.get_backend() != "gloo":
            self._stop_group = torch.distributed.new_group(backend="gloo")

    def _on_main(self, fn):
        """`fn()` on the main process, its result or its error on every process (they must all stop alike)."""
        acc = self.accelerator
        out = [None, None]
        if acc.is_main_process:
            try:
                out[0] = fn()
            except Exception as err:  # re-raised below, on every process
                out[1] = err
        if acc.num_processes > 1:
            broadcast_object_list(out)
        if out[1] is not None:
            raise out[1]
        return out[0]

    def release(self) -> None:
        """Let go of the run folder's lock (the end of `train` does it)."""
        if self._locked and self.accelerator.is_main_process:
            run.release(self.run_dir)
        self._locked = False

    # -- one optimiser step of a role, called by the method ------------------------------
    def _update(self, role: str, loss: torch.Tensor) -> None:
        acc, tr = self.accelerator, self.cfg.train
        net, opt, sched = self.nets[role], self.opts[role], self.scheds[role]
        if role not in self._update_order:
            self._update_order.append(role)
        role_net = acc.unwrap_model(net)
        if hasattr(role_net, "activate"):  # LoRA roles share one base: recomputation must see this role
            role_net.activate()
        acc.backward(loss)
        clip = self.cfg.optim.grad_clip if self.roles[role].clip and self.cfg.optim.grad_clip > 0 else float("inf")
        params = net.parameters() if acc.distributed_type == DistributedType.FSDP else [
            p for group in opt.param_groups for p in group["params"]]
        self.grad_norms[role] = norm = acc.clip_grad_norm_(params, clip)
        bad = torch.stack([~torch.isfinite(loss.detach()), ~torch.isfinite(norm)])
        # Skipping needs the verdict before the step: a device sync, paid only when skips are allowed. The grad
        # norm decides, as it is the same on every process after DDP's all-reduce.
        if tr.max_nonfinite_skips and bool(bad[1]):
            opt.zero_grad(set_to_none=True)
            self.state.skipped += 1
            self._skipped_now.append(role)
            step = self.state.step + 1
            if self.state.skipped > tr.max_nonfinite_skips:
                raise NonFiniteError(self._nonfinite_message(step, role, "gradient norm",
                                                             f" ({tr.max_nonfinite_skips} skips allowed, all spent)"))
            if acc.is_main_process:
                tqdm.write(f"step {step}: non-finite gradient norm of {self.roles[role].title}, update skipped "
                           f"({self.state.skipped} of train.max_nonfinite_skips={tr.max_nonfinite_skips})")
            return
        fb = self.first_bad[role]
        fb.masked_fill_(bad & (fb == 0), self.state.step + 1)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if role == "student" and self.ema is not None:
            self.ema.update_parameters(acc.unwrap_model(net))

    def _nonfinite_message(self, step: int, role: str, what: str, extra: str = "") -> str:
        last = f"step_{self.last_checkpoint:07d}" if self.last_checkpoint else "none yet"
        return (f"non-finite {what} of {self.roles[role].title} at step {step}{extra}; nothing after it was saved "
                f"(last checkpoint: {last}). Lower optim.lr_{role} and start afresh in another --output, or allow "
                "skipping such steps with train.max_nonfinite_skips=N")

    def check_finite(self) -> None:
        """Stop (NonFiniteError) if any process saw a non-finite loss or gradient norm: called before anything is
        written from the weights. Reads the device flags (a sync), and gathers them across processes."""
        acc = self.accelerator
        roles = self._update_order + [r for r in self.roles if r not in self._update_order]
        flags = torch.stack([self.first_bad[r] for r in roles])
        if acc.num_processes > 1:
            flags = acc.gather(flags[None])
        flags = flags.reshape(-1, len(roles), 2).cpu()
        found = [(int(v), r, w) for p in flags for r, row in enumerate(p) for w, v in enumerate(row) if v > 0]
        if found:
            step, r, w = min(found)  # the first step; its first updated role (a NaN spreads), a loss before its norm
            raise NonFiniteError(self._nonfinite_message(step, roles[r], ("loss", "gradient norm")[w]))

    # -- checkpoints ---------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.ckpts.dir

    def save_checkpoint(self) -> None:
        """`checkpoints/step_N`, written whole or not at all (tdm.run.Checkpoints); never from non-finite weights."""
        self.check_finite()
        acc, step = self.accelerator, self.state.step
        partial = self.ckpts.partial(step)
        if acc.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        acc.wait_for_everyone()
        try:
            acc.save_state(str(partial))  # every process writes its random states, the main process the rest
            acc.wait_for_everyone()
            if acc.is_main_process:
                self.ckpts.commit(partial, step)
                self.ckpts.prune(self.cfg.train.keep_checkpoints)
        except Exception as err:
            if acc.is_main_process:
                shutil.rmtree(partial, ignore_errors=True)
            last = f"step_{self.last_checkpoint:07d}" if self.last_checkpoint else "none"
            raise RunError(f"could not write checkpoint step_{step:07d} in {self.ckpts.dir} ({_why(err)}); the "
                           f"last complete checkpoint ({last}) is intact: fix that, then run the same command to "
                           "resume") from err
        acc.wait_for_everyone()
        self.last_checkpoint = step

    def resume(self) -> bool:
        """Load the newest complete checkpoint, naming any torn or corrupt newer one it skips."""
        acc, tr = self.accelerator, self.cfg.train
        step, path, skipped = self._on_main(self.ckpts.newest_complete)
        if path is None and skipped:  # never guess: starting afresh would write over them
            raise RunError(f"no complete checkpoint in {self.ckpts.dir} to resume from: {', '.join(skipped)}; "
                           "delete that folder to start afresh, or pass another --output")
        if skipped and acc.is_main_process:
            print(f"skipped checkpoint{'s' * (len(skipped) > 1)} {', '.join(skipped)}; resuming from {path.name}",
                  file=sys.stderr)
        if path is None:
            done = run.student_step(self.run_dir)
            if done is not None:
                raise RunError(f"{self.run_dir} holds a student of step {done} but no checkpoint to go on from; "
                               "pass another --output to start afresh")
        elif step > tr.iterations:
            raise RunError(f"train.iterations={tr.iterations} is below step {step} of {path}: a run cannot go back; "
                           "raise train.iterations, or pass another --output to start afresh")
        else:
            try:
                acc.load_state(str(path))
            except Exception as err:
                raise RunError(f"checkpoint {path} does not load into this run ({_why(err)}); pass another "
                               "--output to start afresh") from err
        if acc.is_main_process:
            run.trim_log(self.run_dir / run.LOG, step)
        self.last_checkpoint = step
        return path is not None

    def save_student(self) -> Path:
        """Final student weights (EMA if enabled) for `tdm sample` / `tdm eval`, with the step they were taken at."""
        self.check_finite()
        acc = self.accelerator
        state = self.ema.module.state_dict() if self.ema is not None else acc.get_state_dict(self.nets["student"])
        path = self.run_dir / run.STUDENT
        if acc.is_main_process:
            try:
                save_tensors({k: v.detach().float().cpu().contiguous() for k, v in state.items()}, path,
                                 metadata={"step": str(self.state.step)})
            except Exception as err:
                raise RunError(f"could not write {path} ({_why(err)}); the final checkpoint is complete: fix that, "
                               "then run the same command to write the student") from err
        return path

    def preview(self) -> None:
        """Fixed prompts and noise through the student at K = 1, 2, 4: `previews/step_N.png` and the trackers."""
        if not (self.accelerator.is_main_process and hasattr(self.family, "preview")):
            return
        def grid_of(K: int) -> torch.Tensor:
            return self.family.schedule.grid(K, self.cfg.student.grid_spec())

        path = self.run_dir / "previews" / f"step_{self.state.step:07d}.png"
        with self.accelerator.autocast():
            image = self.family.preview(self.method.student, grid_of, path)
        pixels = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()  # HWC, as the PNG holds it
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"preview": pixels}, step=self.state.step, dataformats="HWC")
            elif tracker.name == "wandb":  # a list of images per key
                tracker.log_images({"preview": [pixels]}, step=self.state.step)

    # -- the loop ------------------------------------------------------------------------
    def _step(self) -> dict:
        """One iteration on this process's share of the global batch; its metrics stay on the device."""
        acc, tr, rng = self.accelerator, self.cfg.train, self.state.rng
        B = tr.batch_size // acc.num_processes
        cond, uncond = (rng.local(c) for c in self.family.sample_cond(tr.batch_size, rng.host))
        x_T = rng.randn(self.family.sample_shape(B))
        self._skipped_now = []
        with acc.autocast():
            m = self.method.step(x_T, cond, uncond, self._update, rng)
        self.state.step += 1
        m.update({f"grad_norm_{k}": v for k, v in self.grad_norms.items()}, step=self.state.step)
        if self._skipped_now:
            m["skipped"] = list(self._skipped_now)
        return m

    def _log(self, m: dict, log_path: Path, t0: float) -> dict:
        """Metrics averaged over processes, read from the device, checked, written to the log and the trackers."""
        acc = self.accelerator
        keys = [k for k, v in m.items() if torch.is_tensor(v)]
        mean = acc.reduce(torch.stack([m[k].float() for k in keys]), "mean") if acc.num_processes > 1 else None
        m = _floats({**m, **dict(zip(keys, mean))} if mean is not None else m)
        skipped = {k for role in m.get("skipped", ()) for k in self.roles[role].metrics}
        for k, v in m.items():
            if isinstance(v, float) and not math.isfinite(v):
                if k not in skipped:
                    self.check_finite()
                    raise NonFiniteError(f"non-finite {k} at step {self.state.step}; nothing after it was saved. "
                                         "Lower the learning rates (optim.lr_student, optim.lr_fake) and start "
                                         "afresh in another --output")
                m[k] = None  # a skipped update's value: JSON has no NaN
        m["wall_s"] = time.perf_counter() - t0
        m.update({f"lr_{role}": sched.get_last_lr()[0] for role, sched in self.scheds.items()})  # the next step's
        acc.log({k: v for k, v in m.items() if isinstance(v, (int, float)) and k != "step"}, step=self.state.step)
        if acc.is_main_process:
            with log_path.open("a") as f:
                f.write(json.dumps(m, allow_nan=False) + "\n")
        return m

    def _stop_signal(self, local: int) -> int:
        """The signal to stop on, agreed by every process at this iteration boundary (0: go on)."""
        if self.accelerator.num_processes == 1:
            return local
        flag = torch.tensor([local])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._stop_group)
        return int(flag)

    def train(self) -> list[dict]:
        """Run to `train.iterations`; returns this process's metrics per iteration. SIGINT / SIGTERM stop it at the
        next iteration boundary with a checkpoint (`Interrupted`); the lock is released however it ends."""
        try:
            with run.StopRequests() as stop:
                return self._train(stop)
        finally:
            self.release()

    def _train(self, stop: run.StopRequests) -> list[dict]:
        acc, tr = self.accelerator, self.cfg.train
        resumed = self.resume()
        flat = {f"{sec}.{k}": str(v) if isinstance(v, (list, type(None))) else v
                for sec, vals in self.cfg.to_dict().items() if isinstance(vals, dict) for k, v in vals.items()}
        # a resumed run drops TensorBoard's events after its checkpoint, as the log drops its lines; wandb keeps its
        # files in the run folder (not the working directory), one wandb run per start
        acc.init_trackers("tdm", config=flat, init_kwargs={
            "tensorboard": {"purge_step": self.state.step + 1} if resumed else {},
            "wandb": {"dir": str(self.run_dir), "name": self.run_dir.name}})
        log_path = self.run_dir / run.LOG
        history: list[dict] = []
        bar = tqdm(total=tr.iterations, initial=self.state.step, desc=self.cfg.method.upper(),
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
                    bar.set_postfix({label: _short(logged.get(key)) for label, key in self.method.progress},
                                    fwd=logged.get("forwards"))
                if self.state.step % tr.checkpoint_every == 0 or self.state.step == tr.iterations:
                    self.save_checkpoint()
                if tr.preview_every and self.state.step % tr.preview_every == 0:
                    self.preview()
                signum = self._stop_signal(stop.signum) if self.state.step < tr.iterations else 0
                if signum:
                    if self.last_checkpoint != self.state.step:
                        self.save_checkpoint()
                    raise Interrupted(signum, f"interrupted by {signal.Signals(signum).name} at step "
                                              f"{self.state.step}: checkpoint step_{self.state.step:07d} written; "
                                              "run the same command to resume")
            self.save_student()
            signum = self._stop_signal(stop.signum)
            if signum:  # it came during the last iteration: the run is complete, what follows is not run
                raise Interrupted(signum, f"interrupted by {signal.Signals(signum).name} after the last "
                                          f"iteration: {self.run_dir / run.STUDENT} is written; `tdm eval "
                                          f"{self.run_dir}` evaluates it")
        except (Interrupted, NonFiniteError):  # every process stops here alike: trackers can be closed
            bar.close()
            acc.end_training()
            raise
        bar.close()
        acc.end_training()
        return [_floats(m) for m in history]


def _short(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def _why(err: BaseException) -> str:
    """One line for a library error: an OSError's reason, else the first line of its message."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
