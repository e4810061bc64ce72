"""The trainer shared by all methods: accelerate, optimisers, checkpoints, resume, logging."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from safetensors.torch import save_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from .config import Config, dump
from .families import build_family
from .methods.tdm import TDM
from .schedules import GridSpec, timestep_grid


class TrainState:
    """Step counter and the method's random generator, saved with every checkpoint."""

    def __init__(self, generator: torch.Generator):
        self.step = 0
        self.generator = generator

    def state_dict(self) -> dict:
        return {"step": self.step, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.generator.set_state(state["generator"])


def _tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


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
            log_with="tensorboard" if _tensorboard_available() else None)
        set_seed(tr.seed)
        if acc.is_main_process:
            (self.run_dir / "config.yaml").write_text(dump(cfg))
        self.family = family = build_family(cfg, acc.device, self.run_dir)
        with acc.main_process_first():  # the main process fits and caches; the others load its file
            pretrained = family.pretrained_net(self.run_dir / "pretrained.safetensors",
                                               generator=torch.Generator().manual_seed(tr.seed))
        student_net, fake_net = family.student_and_fake(pretrained)

        adamw = torch.optim.AdamW
        if o.adam_8bit:
            try:
                from bitsandbytes.optim import AdamW8bit as adamw
            except ImportError:
                raise ValueError("optim.adam_8bit=true needs bitsandbytes: pip install bitsandbytes") from None

        def optimiser(net, lr):
            params = net.trainable_parameters() if hasattr(net, "trainable_parameters") else net.parameters()
            opt = adamw(params, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
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
        # one generator per process drives every random draw of the method
        self.state = TrainState(torch.Generator().manual_seed(tr.seed + 1 + acc.process_index))
        acc.register_for_checkpointing(self.state)

        s = cfg.student
        Ks = s.unify or [s.steps]
        self.method = TDM(cfg.tdm, family.schedule, family.teacher, family.wrap(student_net), family.wrap(fake_net),
                          cfg.teacher.guidance, Ks, GridSpec(s.grid, s.grid_N, s.grid_shift),
                          k_conditioning=bool(s.unify))
        self.grad_norms: dict[str, float] = {}

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
        self.grad_norms[role] = float(acc.clip_grad_norm_(net.parameters(), clip))
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
        net = self.ema.module if self.ema is not None else self.accelerator.unwrap_model(self.student_net)
        path = self.run_dir / "student.safetensors"
        if self.accelerator.is_main_process:
            save_file({k: v.detach().float().cpu().contiguous() for k, v in net.state_dict().items()}, str(path))
        return path

    def preview(self) -> None:
        """Fixed prompts and noise through the student at K = 1, 2, 4: `previews/step_N.png` and the trackers."""
        if not (self.accelerator.is_main_process and hasattr(self.family, "preview")):
            return
        s = self.cfg.student
        grid_of = lambda K: timestep_grid(K, GridSpec(s.grid, s.grid_N, s.grid_shift), self.family.schedule.T,  # noqa: E731
                                          self.family.schedule.discrete)
        path = self.run_dir / "previews" / f"step_{self.state.step:07d}.png"
        image = self.family.preview(self.method.student, grid_of, path)
        for tracker in self.accelerator.trackers:
            tracker.log_images({"preview": image.permute(1, 2, 0).numpy()}, step=self.state.step, dataformats="HWC")

    # -- the loop ------------------------------------------------------------------------
    def _step(self, log_path: Path, t0: float) -> dict:
        acc, tr = self.accelerator, self.cfg.train
        gen, B = self.state.generator, tr.batch_size
        cond, uncond = self.family.sample_cond(B, gen)
        x_T = torch.randn(self.family.sample_shape(B), generator=gen).to(acc.device)
        with acc.autocast():
            m = self.method.iteration(x_T, cond, uncond, self._update, gen)
        self.state.step += 1
        m.update({f"grad_norm_{k}": v for k, v in self.grad_norms.items()})
        m.update(step=self.state.step, wall_s=time.perf_counter() - t0)
        if self.state.step % tr.log_every == 0 or self.state.step == tr.iterations:
            acc.log({k: v for k, v in m.items() if k != "step"}, step=self.state.step)
            if acc.is_main_process:
                with log_path.open("a") as f:
                    f.write(json.dumps(m) + "\n")
        return m

    def train(self) -> list[dict]:
        acc, tr = self.accelerator, self.cfg.train
        resumed = self.resume()
        flat = {f"{sec}.{k}": str(v) if isinstance(v, (list, type(None))) else v
                for sec, vals in self.cfg.to_dict().items() if isinstance(vals, dict) for k, v in vals.items()}
        acc.init_trackers("tdm", config=flat)
        log_path = self.run_dir / "train_log.jsonl"
        history: list[dict] = []
        bar = tqdm(total=tr.iterations, initial=self.state.step, desc="TDM", disable=not (tr.progress and acc.is_main_process))
        if resumed:
            bar.write(f"resumed from step {self.state.step}")
        t0 = time.perf_counter()
        try:
            while self.state.step < tr.iterations:
                m = self._step(log_path, t0)
                history.append(m)
                bar.update(1)
                bar.set_postfix(L_F=f"{m['loss_fake']:.3g}", L_G=f"{m['loss_student']:.3g}", D=f"{m['D']:.3g}",
                                fwd=m["forwards"])
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
        return history
