"""TDM's iteration (TDM-METHOD §4) driven by stub networks that record every call.

The stubs are `Denoiser`s of prediction type 'sample' over known functions: the student `theta x`, the fake score
`phi x`, the teacher `0.7 x + b(label)` with `b(null) = 0`, so CFG's `x0_w = 0.7 x + w b(label)`. Labels are the row
numbers, so every call says which rows it ran on. A recording `RunRNG` keeps every draw (k_F, k_G, xi, ...), and a
recording `update` keeps each role's loss and its gradient w.r.t. the role's output (= x0_hat for 'sample').
Every golden value below is computed from the equations of §4, not from the library's loss functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from tdm.config import resolve
from tdm.core.denoiser import Denoiser
from tdm.core.rng import RunRNG
from tdm.core.schedules import VPSchedule
from tdm.methods.tdm import TDM

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
NULL = -1                      # the unconditional label
THETA, PHI, A_TEACHER = 0.6, 0.3, 0.7


@dataclass(eq=False)  # compared by identity
class Call:
    role: str
    t: torch.Tensor            # per row
    x: torch.Tensor
    cond: torch.Tensor         # labels = row numbers; NULL for the unconditional half
    extra: dict
    grad: bool                 # grad enabled during the call
    out: torch.Tensor          # the network's output (with its graph when grad was on)


class Stub(nn.Module):
    def __init__(self, role: str, log: list, scale: float | None):
        super().__init__()
        self.role, self.log = role, log
        self.scale = nn.Parameter(torch.tensor(scale, dtype=F64)) if scale is not None else None

    def forward(self, x, t, cond, **extra):
        if self.scale is not None:
            out = self.scale * x
        else:  # the teacher: 0.7 x + b(label), b = (label mod 3 + 1) / 4 per element, 0 for the null label
            bias = torch.where(cond == NULL, 0.0, (cond.remainder(3) + 1) / 4).to(x)
            out = A_TEACHER * x + bias[:, None]
        self.log.append(Call(self.role, t.clone(), x.detach().clone(), cond.clone(),
                             {k: torch.as_tensor(v).clone() for k, v in extra.items()}, torch.is_grad_enabled(), out))
        return out


class RecordingRNG(RunRNG):
    """A `RunRNG` that keeps every draw in order."""

    def __init__(self, seed: int):
        super().__init__(seed)
        self.draws: list[tuple[str, object]] = []

    def _keep(self, kind, value):
        self.draws.append((kind, value.clone() if torch.is_tensor(value) else value))
        return value

    def choice(self, n):
        return self._keep("choice", super().choice(n))

    def randint(self, low, high, n):
        return self._keep("randint", super().randint(low, high, n))

    def rand(self, n):
        return self._keep("rand", super().rand(n))

    def randn(self, shape, dtype=torch.float32):
        return self._keep("randn", super().randn(shape, dtype))

    def of(self, kind):
        return [v for k, v in self.draws if k == kind]


@dataclass
class Iteration:
    method: TDM
    calls: list[Call]
    rng: RecordingRNG
    losses: dict
    grads: dict               # role -> d loss / d (output of the role's call with grad)
    metrics: dict
    x_T: torch.Tensor
    labels: torch.Tensor

    @property
    def K(self):
        return self.metrics["K"]

    @property
    def grid(self):
        return self.method.grids[self.K]

    @property
    def k_F(self):
        return self.rng.of("randint")[0]

    @property
    def k_G(self):
        return self.rng.of("randint")[1]

    def of(self, role, grad=None):
        return [c for c in self.calls if c.role == role and (grad is None or c.grad == grad)]

    def rollout(self) -> list[Call]:
        """The student calls before the fake update."""
        first_fake = next(i for i, c in enumerate(self.calls) if c.role == "fake")
        return [c for c in self.calls[:first_fake] if c.role == "student"]

    def prediction(self, k: int, rows: torch.Tensor):
        """The rollout's (x0_hat, eps_hat) at step k for `rows`, from its recorded calls."""
        call = next(c for c in self.rollout() if c.t[0] == self.grid[self.K - k])
        at = [int((call.cond == r).nonzero()) for r in rows.tolist()]
        x0 = call.out[at]
        return x0, self.method.schedule.to_x0_eps(x0, call.x[at], call.t[at], "sample")[1]


def run_step(*overrides, B=64, d=2, seed=0, fixed_shapes=False) -> Iteration:
    cfg = resolve("toy-gmm", ["teacher.guidance=2", "tdm.importance_weight=tempered", "tdm.generator_loss=mse",
                              *overrides])
    schedule = VPSchedule.from_betas(cfg.teacher.beta_schedule, cfg.teacher.beta_start, cfg.teacher.beta_end)
    calls: list[Call] = []
    wrap = lambda role, scale: Denoiser(Stub(role, calls, scale), schedule, "sample")  # noqa: E731
    nets = {"student": wrap("student", THETA), "fake": wrap("fake", PHI)}
    method = TDM(cfg, schedule, wrap("teacher", None), nets, fixed_shapes=fixed_shapes)
    losses, grads = {}, {}

    def update(role, loss):
        losses[role] = loss.detach()
        (grads[role],) = torch.autograd.grad(loss, [c for c in calls if c.role == role and c.grad][-1].out)

    x_T = torch.randn(B, d, generator=torch.Generator().manual_seed(100 + seed), dtype=F64)
    labels = torch.arange(B)
    rng = RecordingRNG(seed)
    metrics = method.step(x_T, labels, torch.full_like(labels, NULL), update, rng)
    return Iteration(method, calls, rng, losses, grads, metrics, x_T, labels)


def _bc(v, like):
    return v.reshape(-1, *[1] * (like.ndim - 1)).to(like)


def _next_point(it: Iteration, x0, eps, t):
    """The deterministic DDIM step of §2, written out."""
    s = it.method.schedule
    return _bc(s.alpha(t), x0) * x0 + _bc(s.sigma(t), x0) * eps


def _transition(it: Iteration, x_s, s_t, tau, xi):
    """§1's forward transition, written out."""
    s = it.method.schedule
    ratio = s.alpha(tau) / s.alpha(s_t)
    beta = (s.sigma(tau) ** 2 - ratio**2 * s.sigma(s_t) ** 2).sqrt()
    return _bc(ratio, x_s) * x_s + _bc(beta, x_s) * xi


def _xi(it: Iteration):
    """The two xi of §4 (fake update, generator update): the last two noise draws."""
    return it.rng.of("randn")[-2:]


# -- 1. the rollout (§4 step 1) ---------------------------------------------------------------
@pytest.mark.parametrize("fixed_shapes", [False, True])
def test_rollout_runs_only_as_deep_as_needed_without_grad(fixed_shapes):
    """Depth min(k_F, k_G + 1), each step on the rows that still need it (all rows with fixed shapes), no grad,
    the student conditional only (guidance 1), every point the DDIM step of the previous prediction (§2)."""
    shallow = partial = 0
    for seed in range(12):
        it = run_step(B=4, seed=seed, fixed_shapes=fixed_shapes)
        K, grid = it.K, it.grid
        need = torch.minimum(it.k_F, it.k_G + 1)
        calls = it.rollout()
        assert len(calls) == K - int(need.min()) + 1
        shallow += int(need.min()) > 1
        prev = None
        for k, call in zip(range(K, 0, -1), calls):
            rows = it.labels if fixed_shapes else (need <= k).nonzero().squeeze(1)
            partial += len(rows) < 4
            assert not call.grad and not call.out.requires_grad
            assert torch.equal(call.cond, rows) and torch.all(call.t == grid[K - k])
            if prev is None:
                torch.testing.assert_close(call.x, it.x_T[rows])
            else:
                x0, eps = it.prediction(k + 1, rows)
                torch.testing.assert_close(call.x, _next_point(it, x0, eps, grid[K - k].expand(len(rows))))
            prev = call
        assert len(it.of("student")) == len(calls) + 1  # plus the generator update's single step
    assert shallow and (partial or fixed_shapes)  # the draws did cover a shallow and a partial rollout


def test_stochastic_student_rolls_out_with_fresh_noise():
    """student.stochastic (§2) trains the way it samples: every rollout point is `alpha x0_hat + sigma z` with z
    fresh noise (one draw of every step for the whole batch, so partial and fixed-shape rollouts draw alike), and
    both updates' `x_tau` has the law of the stochastic next point carried on to tau, `alpha_tau x0_hat +
    sigma_tau xi`: importance weight 1."""
    it = run_step("student.stochastic=true")
    s, K, grid = it.method.schedule, it.K, it.grid
    z = it.rng.of("randn")[0]
    assert z.shape == (64, K - 1, 2) and len(it.rng.of("randn")) == 3  # z, then the two xi
    for k, call in zip(range(K - 1, 0, -1), it.rollout()[1:]):
        x0, _ = it.prediction(k + 1, call.cond)
        torch.testing.assert_close(call.x, s.alpha(grid[K - k]) * x0 + s.sigma(grid[K - k]) * z[call.cond, K - k - 1])
    xi_F, xi_G = _xi(it)
    fake, (student, _, fake_G) = it.of("fake")[0], _generator_calls(it)
    x0, _ = _rollout_at(it, it.k_F)
    torch.testing.assert_close(fake.x, _bc(s.alpha(fake.t), x0) * x0 + _bc(s.sigma(fake.t), x0) * xi_F)
    x0 = student.out.detach()
    torch.testing.assert_close(fake_G.x, _bc(s.alpha(fake_G.t), x0) * x0 + _bc(s.sigma(fake_G.t), x0) * xi_G)
    torch.testing.assert_close(it.metrics["w_IS"], torch.tensor(1.0, dtype=F64))
    fixed = run_step("student.stochastic=true", fixed_shapes=True)
    assert fixed.losses["fake"] == it.losses["fake"] and fixed.losses["student"] == it.losses["student"]


def _rollout_at(it: Iteration, k: torch.Tensor):
    """The rollout's (x0_hat, eps_hat) at step k_i of every row i."""
    B = len(it.labels)
    x0, eps = torch.empty_like(it.x_T), torch.empty_like(it.x_T)
    for kk in k.unique().tolist():
        rows = (k == kk).nonzero().squeeze(1)
        x0[rows], eps[rows] = it.prediction(kk, rows)
    assert x0.shape[0] == B
    return x0, eps


# -- 2-4. the fake-score update ------------------------------------------------------------------
def _tau_bounds(it: Iteration, k: torch.Tensor, interval: str):
    K, grid = it.K, it.grid
    t_k, t_prev = grid[K - k], grid[K - k + 1]
    lo = t_prev.clamp_min(20)
    top = {"separate": t_k - 10, "randmid": t_k - 10, "shared": torch.full_like(t_k, float(grid[0]) + 1 - 10)}
    return lo, top[interval]


@pytest.mark.parametrize("interval", ["separate", "shared", "randmid"])
def test_fake_update_uses_the_rollout_prediction_noised_into_the_interval(interval):
    """§4 steps 2-4: the fake update runs right after the rollout (no student recomputation), conditional, with
    grad, at `x_tau = transition(x_m, t_m -> tau, xi)`, `x_m` the DDIM step of the rollout's own prediction at
    step k_F, tau an integer of the interval of `tdm.interval` ('shared': up to N - 10, N = t_K + 1 = 900)."""
    it = run_step(f"tdm.interval={interval}")
    K, grid, k_F = it.K, it.grid, it.k_F
    rollout = it.rollout()
    fake = it.of("fake")[0]
    assert it.calls.index(fake) == len(rollout)  # nothing between the rollout and the fake update
    assert fake.grad and torch.equal(fake.cond, it.labels)
    assert set(fake.extra) == ({"step_k"} if interval == "shared" else set())
    tau = fake.t
    lo, top = _tau_bounds(it, k_F, interval)
    assert torch.equal(tau, tau.round()) and torch.all(tau >= lo) and torch.all(tau <= top)
    x0, eps = _rollout_at(it, k_F)
    xi = _xi(it)[0]
    t_prev = grid[K - k_F + 1]
    if interval == "randmid":  # t_m is not recorded: some integer in [t_{k-1}, t_k - 20) must give x_tau
        for i in range(len(tau)):
            cands = torch.arange(int(t_prev[i]), int(grid[K - k_F[i]]) - 20, dtype=F64)
            cands = cands[cands <= tau[i]]
            n = len(cands)
            x_m = _next_point(it, x0[i].expand(n, -1), eps[i].expand(n, -1), cands)
            got = _transition(it, x_m, cands, tau[i].expand(n), xi[i].expand(n, -1))
            assert torch.isclose(got, fake.x[i], atol=1e-10, rtol=0).all(1).any(), i
    else:
        x_m = _next_point(it, x0, eps, t_prev)
        torch.testing.assert_close(fake.x, _transition(it, x_m, t_prev, tau, xi))
    if interval == "shared":  # the shared interval reaches above the step's own segment, up to N - 10
        assert torch.any(tau > grid[K - k_F] - 10) and tau.max() <= 890
        assert torch.equal(fake.extra["step_k"], k_F)


def _golden_fake_loss(it: Iteration, mode: str):
    """§4 step 4 by hand: mean_b[min(SNR(tau), 5) w_IS mean_elems (x0_F - x0_hat_kF)^2], x0_F = phi x_tau."""
    s = it.method.schedule
    fake = it.of("fake")[0]
    tau, x_tau = fake.t, fake.x
    x0, _ = _rollout_at(it, it.k_F)
    xi = _xi(it)[0]
    m = (x_tau - _bc(s.alpha(tau), x0) * x0) / _bc(s.sigma(tau), x0)
    w_IS = torch.exp(-0.5 * (m**2).mean(1)) / torch.exp(-0.5 * (xi**2).mean(1))
    if mode == "none":
        w_IS = torch.ones_like(w_IS)
    snr = (s.alpha(tau) / s.sigma(tau)) ** 2
    return (snr.clamp(max=5) * w_IS * ((PHI * x_tau - x0) ** 2).mean(1)).mean(), w_IS


@pytest.mark.parametrize("mode", ["tempered", "none"])
def test_configured_importance_weight_reaches_the_fake_loss(mode):
    """The fake loss equals the golden value of §4 step 4 with the configured w_IS; so does its gradient w.r.t.
    x0_F, `2 min(SNR, 5) w_IS (x0_F - x0_hat_kF) / (B d)`, which pins the target to the rollout's prediction."""
    it = run_step(f"tdm.importance_weight={mode}")
    golden, w_IS = _golden_fake_loss(it, mode)
    _, tempered = _golden_fake_loss(it, "tempered")
    assert (tempered - 1).abs().max() > 0.2  # the modes differ here, so the wrong one cannot pass
    torch.testing.assert_close(it.losses["fake"], golden)
    torch.testing.assert_close(it.metrics["w_IS"], w_IS.mean())
    fake = it.of("fake")[0]
    s = it.method.schedule
    x0, _ = _rollout_at(it, it.k_F)
    weight = (s.alpha(fake.t) / s.sigma(fake.t)).pow(2).clamp(max=5) * w_IS
    torch.testing.assert_close(it.grads["fake"], 2 * _bc(weight, x0) * (PHI * fake.x - x0) / x0.numel())


# -- 5. the generator update --------------------------------------------------------------------
def _generator_calls(it: Iteration):
    student = it.of("student", grad=True)
    assert len(student) == 1
    after = it.calls[it.calls.index(student[0]) + 1:]
    assert [c.role for c in after] == ["teacher", "fake"]
    return student[0], after[0], after[1]


@pytest.mark.parametrize("w", [2.0, 3.5])
@pytest.mark.parametrize("kind", ["mse", "huber_demo"])
def test_generator_update_guided_teacher_and_gradient_direction(w, kind):
    """§4 step 5: one student step with grad at t_{k_G} on the rollout's point x_{t_{k_G}}; x_tau from its
    detached prediction; the teacher without grad, cond and uncond batched, guided at teacher.guidance; the fake
    without grad, conditional; the gradient w.r.t. x0_hat is -2 (x0_w - x0_F) / (D B d) ('mse', exactly) and has
    the signs of (x0_w - x0_F) ('huber_demo'), x0_w = 0.7 x_tau + w b(label)."""
    it = run_step(f"teacher.guidance={w}", f"tdm.generator_loss={kind}")
    K, grid, k_G = it.K, it.grid, it.k_G
    student, teacher, fake = _generator_calls(it)
    B = len(it.labels)
    # the student step
    assert student.grad and torch.equal(student.cond, it.labels) and torch.equal(student.t, grid[K - k_G])
    for k in k_G.unique().tolist():
        rows = (k_G == k).nonzero().squeeze(1)
        if k == K:
            expected = it.x_T[rows]
        else:
            x0, eps = it.prediction(k + 1, rows)
            expected = _next_point(it, x0, eps, grid[K - k].expand(len(rows)))
        torch.testing.assert_close(student.x[rows], expected)
    # x_tau in the step's segment, from the prediction with grad (detached)
    x0_hat = student.out.detach()
    eps_hat = it.method.schedule.to_x0_eps(x0_hat, student.x, student.t, "sample")[1]
    tau = fake.t
    lo, top = _tau_bounds(it, k_G, "separate")
    assert torch.all(tau >= lo) and torch.all(tau <= top)
    t_prev = grid[K - k_G + 1]
    x_tau = _transition(it, _next_point(it, x0_hat, eps_hat, t_prev), t_prev, tau, _xi(it)[1])
    torch.testing.assert_close(fake.x, x_tau)
    # the teacher: CFG at w, one batched call without grad
    assert not teacher.grad and len(teacher.x) == 2 * B
    torch.testing.assert_close(teacher.x, torch.cat([x_tau, x_tau]))
    assert torch.equal(teacher.cond, torch.cat([it.labels, torch.full_like(it.labels, NULL)]))
    assert torch.equal(teacher.t, torch.cat([tau, tau]))
    # the fake: conditional, no grad
    assert not fake.grad and torch.equal(fake.cond, it.labels) and fake.extra == {}
    # the gradient
    bias = ((it.labels % 3 + 1) / 4).to(F64)[:, None]
    x0_w, x0_F = A_TEACHER * x_tau + w * bias, PHI * x_tau
    D = (x0_hat - x0_w).abs().mean(1, keepdim=True)
    torch.testing.assert_close(it.metrics["D"], D.mean())
    neg = -it.grads["student"]
    if kind == "mse":
        torch.testing.assert_close(neg, 2 * (x0_w - x0_F) / (D * x0_hat.numel()))
        torch.testing.assert_close(it.losses["student"], ((x0_w - x0_F) ** 2 / D).mean())
    else:
        assert torch.equal(torch.sign(neg), torch.sign(x0_w - x0_F))


# -- variants ------------------------------------------------------------------------------------
def test_clean_matching_diffuses_the_prediction():
    """tdm.matching=clean (paper Table 7, §7): both updates diffuse the step's x0_hat itself,
    `x_tau = alpha_tau x0_hat + sigma_tau xi`, tau in the same segment; then m = xi and w_IS = 1."""
    it = run_step("tdm.matching=clean")
    s = it.method.schedule
    fake0 = it.of("fake")[0]
    x0, _ = _rollout_at(it, it.k_F)
    lo, top = _tau_bounds(it, it.k_F, "separate")
    assert torch.all(fake0.t >= lo) and torch.all(fake0.t <= top)
    xi_F, xi_G = _xi(it)
    torch.testing.assert_close(fake0.x, _bc(s.alpha(fake0.t), x0) * x0 + _bc(s.sigma(fake0.t), x0) * xi_F)
    torch.testing.assert_close(it.metrics["w_IS"], torch.tensor(1.0, dtype=F64))
    student, _, fake1 = _generator_calls(it)
    x0_hat = student.out.detach()
    torch.testing.assert_close(fake1.x, _bc(s.alpha(fake1.t), x0) * x0_hat + _bc(s.sigma(fake1.t), x0) * xi_G)


def test_shared_interval_on_other_grids_and_with_unify():
    """'shared' tops out at N - 10 with N = t_K + 1 on every grid (trailing: 990), and under TDM-unify the fake
    sees both K (k_steps) and the step k (step_k); the student never sees k."""
    it = run_step("tdm.interval=shared", "student.grid=trailing", B=256)
    k = it.k_F
    tau = it.of("fake")[0].t
    assert tau.max() <= 990 and torch.any(tau > 899)
    assert tau[k == 1].max() > it.grid[it.K - 1]  # step 1's tau reaches above its own segment
    for seed in range(3):
        it = run_step("tdm.interval=shared", "student.unify=[1,2,4]", seed=seed)
        K = it.K
        fake_F, (student, _, fake_G) = it.of("fake")[0], _generator_calls(it)
        assert set(fake_F.extra) == set(fake_G.extra) == {"k_steps", "step_k"}
        assert int(fake_F.extra["k_steps"]) == K == int(student.extra["k_steps"])
        assert set(student.extra) == {"k_steps"}
        assert torch.equal(fake_F.extra["step_k"], it.k_F) and torch.equal(fake_G.extra["step_k"], it.k_G)
        assert it.of("fake")[0].t.max() <= 890


@pytest.mark.parametrize("variant", [(), ("tdm.interval=shared",), ("tdm.interval=randmid",), ("tdm.matching=clean",),
                                     ("student.stochastic=true",), ("tdm.importance_weight=none",),
                                     ("teacher.guidance=1",), ("student.steps=1",), ("student.unify=[1,2,4]",)])
def test_forwards_bound_is_reached_by_every_variant(variant):
    """`TDM.forwards(cfg)` is the count of a worst-case iteration (some k_F = 1: the whole rollout) for every
    switch, and the batch equivalents stay below its bound."""
    it = run_step(*variant)
    f = TDM.forwards(it.method.cfg)
    assert int(it.k_F.min()) == 1
    K_max = max(it.method.Ks)
    if it.K == K_max:
        assert it.metrics["forwards"] == f["network_calls"]
    assert it.metrics["forwards"] <= f["network_calls"] and it.metrics["forwards_batch_equiv"] <= f["batch_equivalents"]
    assert it.metrics["forwards"] == len(it.calls)


def test_shared_is_refused_where_the_fake_cannot_be_told_k(tmp_path):
    from tdm.families import check_inputs

    with pytest.raises(ValueError, match="tdm.interval=shared .* digits family"):
        check_inputs(resolve("digits", ["tdm.interval=shared"]))
    check_inputs(resolve("toy-gmm", ["tdm.interval=shared"]))


class EmbeddedGuidance(Denoiser):
    """A teacher that takes the guidance scale as an input (FLUX.1-dev's embedding): one conditional call."""

    def guided(self, x_t, t, cond, uncond, w, **extra):
        return self(x_t, t, cond, guidance=torch.full((x_t.shape[0],), w, dtype=F64), **extra)


@pytest.mark.parametrize("name", ["tdm", "dmd2", "consistency"])
@pytest.mark.parametrize("own_call", [False, True])
def test_a_family_s_guided_call_replaces_two_pass_cfg_in_every_method(name, own_call):
    """Every method reaches the teacher's guidance through `Denoiser.guided`: two-pass CFG by default (2B rows, the
    null label in the second half), the family's own call where its teacher overrides it (B rows, the scale as an
    input, no unconditional pass)."""
    from tdm.methods.base import method_class

    cfg = resolve("toy-gmm", ["teacher.guidance=3", f"method={name}",
                              *(["student.stochastic=true"] if name == "consistency" else [])])
    schedule = VPSchedule.from_betas(cfg.teacher.beta_schedule, cfg.teacher.beta_start, cfg.teacher.beta_end)
    calls: list[Call] = []
    cls = method_class(name)
    nets = {r.name: Denoiser(Stub(r.name, calls, 0.5), schedule, "sample") for r in cls.roles}
    teacher = (EmbeddedGuidance if own_call else Denoiser)(Stub("teacher", calls, None), schedule, "sample")
    method = cls(cfg, schedule, teacher, nets)
    B = 16
    labels = torch.arange(B)
    x_T = torch.randn(B, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    method.step(x_T, labels, torch.full_like(labels, NULL), lambda role, loss: None, RunRNG(0))
    taught = [c for c in calls if c.role == "teacher"]
    assert taught
    for c in taught:
        if own_call:
            assert len(c.x) <= B and not (c.cond == NULL).any() and torch.equal(c.extra["guidance"],
                                                                             torch.full((len(c.x),), 3.0, dtype=F64))
        else:
            assert len(c.x) % 2 == 0 and (c.cond[len(c.x) // 2:] == NULL).all() and c.extra == {}
