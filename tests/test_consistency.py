"""method=consistency (LCM-style consistency distillation, tdm/methods/consistency.py).

The iteration is checked on stub networks that record every call (which network, at which times, on which
conditions, with or without grad); each check is also run against a planted bug, so that it can fail.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from tdm.config import resolve
from tdm.core.denoiser import Denoiser
from tdm.core.rng import RunRNG
from tdm.core.samplers import sample_ddim
from tdm.core.schedules import VPSchedule
from tdm.methods.consistency import Consistency, boundary_scalings, consistency_loss

B, NULL, W, SKIP = 6, 3, 2.0, 50


@dataclass
class Call:
    net: str
    t: torch.Tensor
    labels: torch.Tensor
    x: torch.Tensor
    grad: bool


class Stub(nn.Module):
    """`out = a x + 1e-3 t + bias[label]` (a 'sample' prediction): cheap, label-dependent, so CFG changes it."""

    def __init__(self, name: str, log: list, a: float, bias: list[float]):
        super().__init__()
        self.name, self.log = name, log
        self.a = nn.Parameter(torch.tensor(a))
        self.register_buffer("bias", torch.tensor(bias))

    def forward(self, x, t, labels, **extra):
        self.log.append(Call(self.name, t.clone(), labels.clone(), x.detach().clone(), torch.is_grad_enabled()))
        return self.a * x + 1e-3 * t[:, None].float() + self.bias[labels][:, None]


def _method(*overrides, log=None):
    cfg = resolve("toy-gmm-cond", ["method=consistency", "student.stochastic=true", f"teacher.guidance={W}",
                                   f"consistency.skip={SKIP}", *overrides])
    schedule = VPSchedule.from_betas()
    log = [] if log is None else log
    teacher = Denoiser(Stub("teacher", log, 0.9, [1.0, -1.0, 0.5, 0.0]), schedule, "sample")
    student = Denoiser(Stub("student", log, 0.5, [0.2, -0.2, 0.1, 0.0]), schedule, "sample")
    method = Consistency(cfg, schedule, teacher, {"student": student})
    if cfg.consistency.target == "ema":
        method.student_ema = Denoiser(Stub("ema", log, 0.4, [0.3, -0.3, 0.2, 0.0]), schedule, "sample")
    return method, log


def _step(method):
    """One iteration; returns its metrics and the losses handed to `update`."""
    g = torch.Generator().manual_seed(1)
    x_T, labels = torch.randn(B, 4, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    losses = []

    def update(role, loss):
        losses.append((role, loss))
        loss.backward()

    return method.step(x_T, labels, torch.full_like(labels, NULL), update, RunRNG(0)), losses, x_T, labels


def _solver_errors(method, log, labels) -> list[str]:
    """What is wrong with the teacher's solver step and the target call of an iteration (empty: nothing)."""
    s, errors = method.schedule, []
    i = max(j for j, c in enumerate(log) if c.net == "teacher")
    (teacher, target), online = log[i:i + 2], log[-1]  # the solver step, then the target, then the online student
    t_nk, t_n = online.t, target.t
    if target.net != ("ema" if method.c.target == "ema" else "student") or online.net != "student":
        errors.append("the target or the online call went to the wrong network")
    uncond = torch.full_like(labels, NULL)
    if teacher.x.shape[0] != 2 * B or not torch.equal(teacher.labels, torch.cat([labels, uncond])):
        errors.append("the teacher did not see cond and uncond in one batched call (CFG)")
        return errors
    if teacher.grad or target.grad or not online.grad:
        errors.append("teacher or target ran with grad, or the online student without")
    if not torch.equal(teacher.t[:B], t_nk) or not torch.equal(teacher.x[:B], online.x):
        errors.append("the teacher's step does not start at the student's (x_{t_{n+k}}, t_{n+k})")
    if not torch.equal(t_nk - t_n, torch.full_like(t_n, float(SKIP))):
        errors.append(f"t_{{n+k}} - t_n is not the skip {SKIP}")
    # expected x_{t_n}: the teacher stub's CFG prediction (Ho & Salimans, §1), then the DDIM step (§2)
    x, a = online.x.double(), s.alpha(t_nk)[:, None]
    out = lambda lab: 0.9 * x + 1e-3 * t_nk[:, None] + torch.tensor([1.0, -1.0, 0.5, 0.0]).double()[lab][:, None]  # noqa: E731
    x0_w = out(torch.full_like(labels, NULL)) + W * (out(labels) - out(torch.full_like(labels, NULL)))
    eps_w = (x - a * x0_w) / s.sigma(t_nk)[:, None]
    x_n = s.alpha(t_n)[:, None] * x0_w + s.sigma(t_n)[:, None] * eps_w
    if not torch.allclose(target.x.double(), x_n, atol=1e-5):
        errors.append("the target's input is not the guided teacher's DDIM step to t_n")
    return errors


def _f_student(c: Call) -> torch.Tensor:
    """The consistency function of a recorded student call (stub a = 0.5, 'sample' prediction), by hand."""
    c_skip, c_out = (v.float()[:, None] for v in boundary_scalings(c.t))
    x0_hat = 0.5 * c.x + 1e-3 * c.t[:, None].float() + torch.tensor([0.2, -0.2, 0.1, 0.0])[c.labels][:, None]
    return c_skip * c.x + c_out * x0_hat


def test_step_calls_student_source():
    """Source 'student': the K-step LCM rollout (no grad, on the student's grid), one batched CFG teacher call at
    t_{n+k}, the target (the student, no grad) at t_n = t_{n+k} - skip on the teacher's DDIM step, the student with
    grad at t_{n+k}; the loss is the pseudo-Huber distance of the two consistency functions."""
    method, log = _method()
    m, losses, _, labels = _step(method)
    assert [(c.net, c.grad) for c in log] == [("student", False)] * 4 + [("teacher", False), ("student", False),
                                                                        ("student", True)]
    assert [c.t.tolist() for c in log[:4]] == [[t] * B for t in (899.0, 674.0, 449.0, 224.0)]
    assert _solver_errors(method, log, labels) == []
    t_n = log[-2].t
    assert t_n.min() >= 0 and t_n.max() <= 999 - SKIP and len(set(t_n.tolist())) > 1
    [(role, L)] = losses
    assert role == "student"
    assert L.item() == pytest.approx(consistency_loss(_f_student(log[-1]), _f_student(log[-2])).item(), rel=1e-5)
    assert method.student.net.a.grad is not None and method.teacher.net.a.grad is None
    assert m["forwards"] == 7 == Consistency.forwards(method.cfg)["network_calls"]
    assert m["forwards_batch_equiv"] == 8 == Consistency.forwards(method.cfg)["batch_equivalents"]  # CFG: 2B


def test_planted_bugs_are_caught(monkeypatch):
    """The checks above fail on planted bugs: CFG dropped from the solver step, a weaker guidance there, the
    target evaluated at t_{n+k} instead of t_n, the target evaluated with grad."""
    method, log = _method()
    method.guidance = 1.0
    _, _, _, labels = _step(method)
    assert _solver_errors(method, log, labels) == ["the teacher did not see cond and uncond in one batched call (CFG)"]

    import tdm.methods.consistency as mod

    real = mod.cfg_denoise
    monkeypatch.setattr(mod, "cfg_denoise", lambda d, x, t, c, u, w, **e: real(d, x, t, c, u, 1.0 + 0.5 * (w - 1)))
    method, log = _method()
    _, _, _, labels = _step(method)
    assert _solver_errors(method, log, labels) == ["the target's input is not the guided teacher's DDIM step to t_n"]
    monkeypatch.undo()

    method, log = _method()
    f = method.f
    method.f = lambda net, x, t, cond, **e: f(net, x, t if torch.is_grad_enabled() else t + SKIP, cond, **e)
    _, _, _, labels = _step(method)
    assert f"t_{{n+k}} - t_n is not the skip {SKIP}" in _solver_errors(method, log, labels)

    method, log = _method()
    f = method.f
    method.f = lambda *a, **e: f(*a, **e) if torch.is_grad_enabled() else torch.enable_grad()(f)(*a, **e)
    _, _, _, labels = _step(method)
    assert _solver_errors(method, log, labels) == ["teacher or target ran with grad, or the online student without"]


def test_target_is_the_trainers_ema():
    """target=ema: the target call goes to the EMA network at t_n without grad; the student only at t_{n+k}."""
    method, log = _method("consistency.target=ema", "optim.ema=0.95")
    m, _, _, labels = _step(method)
    assert [c.net for c in log] == ["student"] * 4 + ["teacher", "ema", "student"]
    assert _solver_errors(method, log, labels) == []
    assert m["forwards"] == 7


def test_teacher_source_walks_the_teachers_ode_in_steps_of_skip():
    """Source 'teacher': each row goes down the guided teacher's DDIM path from t = 999 in steps of k to t_{n+k},
    the point `sample_ddim` on that row's grid reaches; the fixed-shape rollout computes the same."""
    method, log = _method("consistency.source=teacher")
    _, _, x_T, labels = _step(method)
    assert _solver_errors(method, log, labels) == []
    t_nk, x_nk = log[-1].t, log[-1].x
    rollout = [c for c in log if c.net == "teacher"][:-1]
    assert len(rollout) == max(-(-(999 - int(t)) // SKIP) for t in t_nk)  # the deepest row's steps
    assert len(rollout) + 3 <= Consistency.forwards(method.cfg)["network_calls"] == 22
    for r in range(B):
        u = int(t_nk[r])
        grid = torch.tensor([999.0] + [float(u + j * SKIP) for j in range(-(-(999 - u) // SKIP) - 1, -1, -1)] + [0.0])
        _, traj = sample_ddim(method.teacher, x_T[r:r + 1], grid, labels[r:r + 1], torch.tensor([NULL]), W,
                              return_trajectory=True)
        assert float(traj.t[-1]) == u and torch.allclose(x_nk[r], traj.x[-1][0], atol=1e-5), r
    fixed, log2 = _method("consistency.source=teacher")
    fixed.fixed_shapes = True
    _step(fixed)
    assert torch.allclose(log2[-1].x, x_nk, atol=1e-6)
    assert all(c.x.shape[0] == 2 * B for c in log2 if c.net == "teacher")


def test_boundary_scalings_golden():
    """LCM's c_skip, c_out (sigma_data 0.5, timestep scaling 10): f(x, 0) = x whatever the network says; at the
    student's grid times f is x0_hat to 1e-6, so sampling with x0_hat is LCM's sampler."""
    c_skip, c_out = boundary_scalings(torch.tensor([0.0, 1.0, 10.0, 50.0, 224.0]))
    assert c_skip.tolist() == pytest.approx([1.0, 0.25 / 100.25, 0.25 / 10000.25, 0.25 / 250000.25, 0.25 / 5017600.25],
                                            rel=1e-12)
    assert c_out.tolist() == pytest.approx([0.0, 0.998752338877, 0.999987500234, 0.999999500000, 0.999999975087],
                                           rel=1e-9)
    assert (c_skip[3:] < 1e-6).all() and (1 - c_out[3:] < 1e-6).all()
    method, _ = _method()
    x = torch.randn(B, 4)
    f0 = method.f(method.student, x, torch.zeros(B, dtype=torch.float64), torch.zeros(B, dtype=torch.long))
    assert torch.equal(f0, x)
    assert boundary_scalings(torch.tensor(1.0), timestep_scaling=1.0)[0].item() == pytest.approx(0.2)  # old LCM


def test_losses():
    a, b = torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.0])
    assert consistency_loss(a, b, "huber", 1e-3).item() == pytest.approx(((1 + 1e-6) ** 0.5 - 1e-3) / 2)
    assert consistency_loss(a, b, "l2").item() == pytest.approx(0.5)


def test_config_requires_the_lcm_sampler_and_an_ema_for_the_ema_target():
    with pytest.raises(ValueError, match="student.stochastic=true"):
        resolve("toy-gmm", ["method=consistency"])
    with pytest.raises(ValueError, match="optim.ema"):
        resolve("toy-gmm", ["method=consistency", "student.stochastic=true", "consistency.target=ema"])
    with pytest.raises(ValueError, match="belongs to method 'consistency'"):
        resolve("toy-gmm", ["consistency.skip=10"])


TINY = ["method=consistency", "student.stochastic=true", "train.progress=false", "net.hidden=64", "net.depth=2",
        "net.pretrain_steps=50", "net.pretrain_batch=256", "train.batch_size=64"]


def test_single_role_run_resumes_bit_identical_with_the_ema_target(tmp_path, one_thread):
    """The trainer builds one network and optimiser (the student); the EMA target is the trainer's, so a run
    stopped at a checkpoint and resumed computes the same losses and the same final student."""
    from safetensors.torch import load_file

    from tdm.trainer import Trainer

    ema = TINY + ["consistency.target=ema", "optim.ema=0.9", "train.checkpoint_every=4"]
    full = Trainer(resolve("toy-gmm", ema + ["train.iterations=8"]), tmp_path / "full")
    assert list(full.nets) == ["student"] and full.method.student_ema is not None
    hist = full.train()
    assert all(m["forwards"] == 7 for m in hist)
    Trainer(resolve("toy-gmm", ema + ["train.iterations=4"]), tmp_path / "split").train()
    rest = Trainer(resolve("toy-gmm", ema + ["train.iterations=8"]), tmp_path / "split").train()
    assert [m["loss_student"] for m in rest] == [m["loss_student"] for m in hist[4:]]
    a, b = (load_file(str(tmp_path / d / "student.safetensors")) for d in ("full", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_short_training_beats_its_start_and_the_teachers_4_step_ddim(tmp_path, one_thread):
    """ring8, exact teacher, a smaller MLP than the preset's: 1000 iterations at the default lr 1e-4 lower the 4-step
    LCM student's energy distance from its start (the pretrained network under the LCM sampler) and below the exact
    teacher's own 4-step DDIM. Measured at one thread: start 0.0388, trained 0.0183, teacher DDIM 4
    0.0352; the preset's network does better (README). Not asserted on `toy-gmm-cond` (CFG 2), because at the
    compared budget it does not: after 600 iterations it is at 0.0222 ± 0.0011 against the guided teacher's law,
    above that teacher's own 4-step DDIM (0.0178; benchmarks/compare.py, 3 seeds), its curve swinging between 0.020
    and 0.038 at 200, 400 and 600 iterations."""
    from tdm.eval.evaluate import evaluate
    from tdm.trainer import Trainer

    small = ["method=consistency", "student.stochastic=true", "train.progress=false", "net.hidden=128",
             "net.pretrain_steps=1500", "net.pretrain_batch=512", "train.eval_samples=2000"]
    Trainer(resolve("toy-gmm", small + ["train.iterations=0"]), tmp_path / "start").train()
    (tmp_path / "trained").mkdir()
    shutil.copy(tmp_path / "start" / "pretrained.safetensors", tmp_path / "trained")  # the same start
    Trainer(resolve("toy-gmm", small + ["train.iterations=1000"]), tmp_path / "trained").train()
    start = evaluate(tmp_path / "start", steps=())["student"]["K=4"]["energy_distance"]
    m = evaluate(tmp_path / "trained", steps=(4,))
    trained, ddim4 = m["student"]["K=4"]["energy_distance"], m["teacher"]["ddim"]["steps=4"]["energy_distance"]
    assert trained < 0.7 * start and trained < 0.7 * ddim4, (start, trained, ddim4)
