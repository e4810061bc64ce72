"""The exact Gaussian-mixture teacher and the distribution metrics (exact teacher of TDM-METHOD §1)."""

import json
import math

import pytest
import torch

from tdm.core.denoiser import Denoiser, cfg_denoise
from tdm.core.samplers import sample_ddim
from tdm.core.schedules import VPSchedule, teacher_grid
from tdm.eval.metrics import assign_components, energy_distance, mode_stats, sliced_wasserstein
from tdm.families.toy.family import load_mixture
from tdm.families.toy.gmm import ExactGMMNet, GaussianMixture, sample_teacher_law

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


# -- exact posterior mean -------------------------------------------------------------------------
def test_posterior_mean_matches_numerical_integration():
    """E[x0 | x_t] = int x0 p(x0) N(x_t; alpha x0, sigma^2) / int p(x0) N(...), on a fine grid (1-D, 2 components)."""
    w, mu, s = [0.3, 0.7], [-2.0, 1.5], [0.5, 1.0]
    mix = GaussianMixture(w, [[m] for m in mu], s)
    x0 = torch.linspace(-20, 20, 400_001, dtype=F64)
    prior = sum(wj / (sj * math.sqrt(2 * math.pi)) * torch.exp(-0.5 * ((x0 - mj) / sj) ** 2)
                for wj, mj, sj in zip(w, mu, s))
    pts = [(0.3, 0.8, 0.6), (-1.0, 0.3, 0.95), (2.5, 0.99, 0.1), (-0.4, 0.7, 0.714)]
    x_t = torch.tensor([[p[0]] for p in pts], dtype=F64)
    alpha, sigma = torch.tensor([p[1] for p in pts], dtype=F64), torch.tensor([p[2] for p in pts], dtype=F64)
    got = mix.posterior_mean(x_t, alpha, sigma)
    for i, (xt, a, sg) in enumerate(pts):
        lik = torch.exp(-0.5 * ((xt - a * x0) / sg) ** 2)
        ref = torch.trapezoid(x0 * prior * lik, x0) / torch.trapezoid(prior * lik, x0)
        assert got[i, 0].item() == pytest.approx(ref.item(), abs=1e-8)
    # responsibilities are a normalised distribution
    torch.testing.assert_close(mix.log_responsibilities(x_t, alpha, sigma).exp().sum(1), torch.ones(4, dtype=F64))


def _labelled():
    means = [[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0], [0.0, -3.0]]
    stds = [0.5, [0.3, 0.8], 0.4, [1.0, 0.2]]
    return GaussianMixture([1.0, 2.0, 1.5, 0.5], means, stds, labels=[0, 1, 0, 1]), means, stds


def test_posterior_mean_with_labels():
    """A class label restricts the posterior to that class's components; the null label means all of them."""
    mix, means, stds = _labelled()
    assert mix.num_classes == 2 and mix.null_label == 2
    cls0 = GaussianMixture([1.0, 1.5], [means[0], means[2]], [stds[0], stds[2]])
    cls1 = GaussianMixture([2.0, 0.5], [means[1], means[3]], [stds[1], stds[3]])
    unlabelled = GaussianMixture([1.0, 2.0, 1.5, 0.5], means, stds)
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(6, 2, generator=g, dtype=F64) * 2
    a, s = 0.6, 0.8
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    got = mix.posterior_mean(x_t, a, s, labels)
    torch.testing.assert_close(got[labels == 0], cls0.posterior_mean(x_t[labels == 0], a, s))
    torch.testing.assert_close(got[labels == 1], cls1.posterior_mean(x_t[labels == 1], a, s))
    torch.testing.assert_close(got[labels == 2], unlabelled.posterior_mean(x_t[labels == 2], a, s))
    assert not torch.allclose(cls0.posterior_mean(x_t, a, s), cls1.posterior_mean(x_t, a, s))


def test_sample_with_labels():
    """sample(n, labels=c) draws only components of class c; the null label draws from all."""
    mix, means, _ = _labelled()
    g = torch.Generator().manual_seed(1)
    x, comp = mix.sample(2000, generator=g, labels=torch.full((2000,), 1))
    assert set(comp.tolist()) == {1, 3}
    assert torch.all(mix.labels[comp] == 1)
    torch.testing.assert_close(x[comp == 1].mean(0).double(), torch.tensor(means[1], dtype=F64), atol=0.1, rtol=0)
    _, comp = mix.sample(2000, generator=g, labels=torch.full((2000,), mix.null_label))
    assert set(comp.tolist()) == {0, 1, 2, 3}
    labels = mix.sample_labels(4000, generator=g)  # class 0 holds weight 2.5 of 5
    assert abs((labels == 0).double().mean().item() - 0.5) < 0.05


def test_sample_noisy_marginal():
    """sample(alpha, sigma) draws x_t = alpha x0 + sigma eps: mean alpha mu, var alpha^2 s^2 + sigma^2."""
    mix = GaussianMixture([1.0], [[2.0, -1.0]], [[0.5, 2.0]])
    x, _ = mix.sample(40_000, generator=torch.Generator().manual_seed(2), alpha=0.6, sigma=0.8)
    x = x.double()
    torch.testing.assert_close(x.mean(0), torch.tensor([1.2, -0.6], dtype=F64), atol=0.03, rtol=0)
    torch.testing.assert_close(x.var(0), torch.tensor([0.09 + 0.64, 1.44 + 0.64], dtype=F64), atol=0, rtol=0.03)


# -- the teacher's own law (the reference sampler) ------------------------------------------------
TOY_SCHEDULE = VPSchedule.from_betas("scaled_linear", 0.00085, 0.012)  # the toy teacher's (TeacherConfig)


def _top(mix, n, g, labels=None):
    """Exact draws of the marginal at the teacher's top time T - 1, and its (alpha, sigma)."""
    t = torch.tensor(float(TOY_SCHEDULE.T - 1))
    a, s = TOY_SCHEDULE.alpha(t).item(), TOY_SCHEDULE.sigma(t).item()
    return mix.sample(n, g, labels, a, s)[0], a, s


def _per_mode(mix, x):
    """Share, mean and per-dimension std of the samples nearest each component."""
    comp = assign_components(mix, x, max_std=math.inf)
    x = x.double()
    return ([(comp == j).double().mean().item() for j in range(len(mix.weights))],
            torch.stack([x[comp == j].mean(0) for j in range(len(mix.weights))]),
            torch.stack([x[comp == j].std(0) for j in range(len(mix.weights))]))


def test_teacher_law_reproduces_the_true_modes():
    """Unguided, the reference sampler of the exact teacher draws the mixture itself: each mode's share, mean and
    per-dimension std (0.08 the narrowest) within 5% (about 4 standard errors at 10,000 samples). The teacher's
    50-step DDIM, whose last step jumps from t = 19 to the posterior mean, fails the same check: it leaves the
    std-0.08 direction at 0.042 and the std-0.05 one at 0.017 (the reference: 0.080 and 0.049). So does a
    999-step grid ending at t = 1 (0.038 for 0.05): the schedule's smallest times still carry noise."""
    mix = GaussianMixture([0.3, 0.7], [[-1.0, 0.0], [1.0, 0.0]], [[0.08, 0.3], [0.2, 0.05]])
    x_top, a, s = _top(mix, 10_000, torch.Generator().manual_seed(0))
    share, mean, std = _per_mode(mix, sample_teacher_law(mix, x_top, a, s))
    assert share == pytest.approx([0.3, 0.7], abs=0.015)
    torch.testing.assert_close(mean, mix.means, atol=0.01, rtol=0)
    torch.testing.assert_close(std, mix.stds, atol=0, rtol=0.05)

    teacher = Denoiser(ExactGMMNet(mix, TOY_SCHEDULE), TOY_SCHEDULE, "sample")
    _, _, std50 = _per_mode(mix, sample_ddim(teacher, x_top, teacher_grid(50, TOY_SCHEDULE)))
    assert std50[0, 0] < 0.06 and std50[1, 1] < 0.95 * 0.05  # the shrinking sampler the check must catch


def test_guided_posterior_mean_is_the_teachers_cfg():
    """The reference's guided denoiser is the library's CFG (§1) of the exact teacher, to the last bit."""
    mix = load_mixture("cond4d")
    g = torch.Generator().manual_seed(3)
    x_t = torch.randn(64, 4, generator=g, dtype=F64)
    t = torch.full((64,), 311.0, dtype=F64)
    labels = mix.sample_labels(64, g)
    teacher = Denoiser(ExactGMMNet(mix, TOY_SCHEDULE), TOY_SCHEDULE, "sample")
    x0_w, _ = cfg_denoise(teacher, x_t, t, labels, torch.full_like(labels, mix.null_label), 2.5)
    a, s = TOY_SCHEDULE.alpha(t), TOY_SCHEDULE.sigma(t)
    torch.testing.assert_close(mix.guided_posterior_mean(x_t, a, s, labels, 2.5), x0_w, atol=1e-12, rtol=0)
    torch.testing.assert_close(mix.guided_posterior_mean(x_t, a, s, labels, 1.0), mix.posterior_mean(x_t, a, s, labels))


def test_guided_teacher_law_is_converged_and_differs_from_the_true_law():
    """With CFG 2 on `cond4d` the reference at its 200 steps agrees with 600 steps (99% of samples within 5e-3;
    measured 1.6e-3), every sample stays on its class, and the law is not the true one: guidance narrows the
    modes (measured 0.86x their std on average; 0.99x at w = 1) and moves weight within a class (component 2
    holds 0.75 of class 1 in the true law, 0.83 in the guided one)."""
    mix = load_mixture("cond4d")
    g = torch.Generator().manual_seed(4)
    labels = mix.sample_labels(2000, g)
    x_top, a, s = _top(mix, 2000, g, labels)
    x200 = sample_teacher_law(mix, x_top, a, s, labels, 2.0)
    x600 = sample_teacher_law(mix, x_top, a, s, labels, 2.0, steps=600)
    assert (x200 - x600).abs().amax(1).quantile(0.99) < 5e-3
    assert mode_stats(mix, x200, labels)["class_accuracy"] == 1.0
    share, _, std = _per_mode(mix, x200)
    ratio = (std / mix.stds).mean().item()
    assert 0.75 < ratio < 0.93, ratio
    assert share[2] / (share[2] + share[3]) > 0.79  # true: 1.5 / (1.5 + 0.5) = 0.75
    _, _, std1 = _per_mode(mix, sample_teacher_law(mix, x_top, a, s, labels, 1.0))
    assert abs((std1 / mix.stds).mean().item() - 1) < 0.04  # w = 1 from the same start: the true stds (0.99x)


# -- loading mixtures -----------------------------------------------------------------------------
SPEC = {"weights": [1, 3], "means": [[0.0, 1.0], [2.0, -1.0]], "stds": [0.5, [0.1, 0.2]], "labels": [1, 0]}


def _check_spec(mix):
    torch.testing.assert_close(mix.weights, torch.tensor([0.25, 0.75], dtype=F64))
    torch.testing.assert_close(mix.stds, torch.tensor([[0.5, 0.5], [0.1, 0.2]], dtype=F64))
    assert mix.labels.tolist() == [1, 0] and mix.dim == 2


def test_from_dict_and_files(tmp_path):
    """Mixtures load from dicts, YAML and JSON; stds per component as a number or one per dimension."""
    _check_spec(GaussianMixture.from_dict(SPEC))
    (tmp_path / "m.json").write_text(json.dumps(SPEC))
    _check_spec(GaussianMixture.from_file(tmp_path / "m.json"))
    (tmp_path / "m.yaml").write_text("weights: [1, 3]\nmeans:\n  - [0.0, 1.0]\n  - [2.0, -1.0]\n"
                                     "stds: [0.5, [0.1, 0.2]]\nlabels: [1, 0]\n")
    _check_spec(GaussianMixture.from_file(tmp_path / "m.yaml"))
    assert GaussianMixture.from_dict(GaussianMixture.from_dict(SPEC).to_dict()).to_dict() == \
        GaussianMixture.from_dict(SPEC).to_dict()


def test_from_yaml_exponent_notation(tmp_path):
    (tmp_path / "m.yaml").write_text("weights: [1, 1]\nmeans: [[0, 0], [1, 1]]\nstds: [5e-2, 1e-1]\n")
    mix = GaussianMixture.from_file(tmp_path / "m.yaml")
    torch.testing.assert_close(mix.stds, torch.tensor([[0.05, 0.05], [0.1, 0.1]], dtype=F64))


@pytest.mark.parametrize("spec,match", [
    ({k: v for k, v in SPEC.items() if k != "stds"}, "missing keys.*stds"),
    ({**SPEC, "colour": 1}, "unknown keys.*colour"),
    ({**SPEC, "stds": [0.5, [0.1, 0.2, 0.3]]}, "stds"),      # wrong dimension
    ({**SPEC, "stds": [0.5, [0.1, 0.0]]}, "positive"),       # non-positive std
    ({**SPEC, "stds": [-0.5, 0.1]}, "positive"),
    ({**SPEC, "weights": [1, 2, 3]}, "weights"),
    ({**SPEC, "weights": [1, 0]}, "positive"),
    ({**SPEC, "labels": [0, 2]}, "labels"),                   # class 1 missing
    ({**SPEC, "labels": [0]}, "labels"),
])
def test_from_dict_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixture.from_dict(spec, source="test.yaml")


def test_ragged_means_error_names_means():
    with pytest.raises(ValueError, match="means"):
        GaussianMixture.from_dict({"weights": [1, 1], "means": [[0.0, 0.0], [1.0]], "stds": [1.0, 1.0]})


# -- metrics ------------------------------------------------------------------------------------
def _folded_mean(m, s):
    """E|N(m, s^2)|."""
    return s * math.sqrt(2 / math.pi) * math.exp(-m * m / (2 * s * s)) + m * math.erf(m / (s * math.sqrt(2)))


def test_energy_distance():
    """ED(x, x) = 0; ED(N(0,1), N(d,1)) grows with d and matches 2E|X-Y| - E|X-X'| - E|Y-Y'| in closed form."""
    g = torch.Generator().manual_seed(3)
    n = 2000
    x = torch.randn(n, 1, generator=g, dtype=F64)
    assert abs(energy_distance(x, x)) < 1e-12
    y = torch.randn(n, 1, generator=g, dtype=F64)
    eds = []
    for d in (0.5, 1.0, 2.0):
        ed = energy_distance(x, y + d)
        gold = 2 * _folded_mean(d, math.sqrt(2)) - 2 * _folded_mean(0, math.sqrt(2))
        assert ed == pytest.approx(gold, rel=0.15, abs=0.01)
        eds.append(ed)
    assert 0 < eds[0] < eds[1] < eds[2]
    assert energy_distance(x, x + 0.5) > energy_distance(x, x)


@pytest.mark.parametrize("v", [0.0, 0.7, -2.5])
def test_sliced_wasserstein_1d_shift(v):
    """In 1-D, W1 between a set and its copy shifted by v is exactly |v| (every projection is +-1)."""
    x = torch.randn(500, 1, generator=torch.Generator().manual_seed(4), dtype=F64)
    sw = sliced_wasserstein(x, x + v, n_proj=16, generator=torch.Generator().manual_seed(5))
    assert sw == pytest.approx(abs(v), abs=1e-12)
    with pytest.raises(ValueError):
        sliced_wasserstein(x, x[:10])


def _four_modes():
    means = [[4.0, 4.0], [-4.0, 4.0], [-4.0, -4.0], [4.0, -4.0]]
    return GaussianMixture([1, 1, 1, 1], means, [0.3, [0.2, 0.4], 0.3, 0.25], labels=[0, 0, 1, 1])


def test_mode_stats_exact_samples():
    """Exact mixture samples: full coverage, almost nothing off-mode, correct classes; wrong labels score ~0."""
    mix = _four_modes()
    g = torch.Generator().manual_seed(6)
    labels = mix.sample_labels(4000, generator=g)
    x, comp = mix.sample(4000, generator=g, labels=labels)
    st = mode_stats(mix, x, labels)
    assert st["mode_coverage"] == 1.0 and st["off_mode"] < 0.01 and st["class_accuracy"] > 0.99
    assert mode_stats(mix, x, 1 - labels)["class_accuracy"] < 0.01
    st = mode_stats(mix, x)  # unconditional
    assert st["mode_coverage"] == 1.0 and "class_accuracy" not in st
    assert st["mode_std_ratio"] == pytest.approx(1.0, abs=0.03)  # 4000 samples: about 1% standard error
    narrowed = mix.means[comp] + 0.5 * (x.double() - mix.means[comp])
    assert mode_stats(mix, narrowed)["mode_std_ratio"] == pytest.approx(0.5, abs=0.02)


def test_mode_stats_collapsed_and_off_mode():
    """All samples in one mode -> coverage 1/J; samples far from every mode are off-mode."""
    mix = _four_modes()
    g = torch.Generator().manual_seed(7)
    one = torch.tensor([[4.0, 4.0]]) + 0.3 * torch.randn(1000, 2, generator=g)
    assert mode_stats(mix, one)["mode_coverage"] == pytest.approx(1 / 4)
    # a mode counts as covered only with >= min_share (10%) of its expected 250 samples: 10 is not enough
    others = [torch.tensor([m]) + 0.1 * torch.randn(10, 2, generator=g) for m in mix.means[1:].tolist()]
    few = torch.cat([one[:970]] + others)
    assert mode_stats(mix, few)["mode_coverage"] == pytest.approx(1 / 4)
    assert mode_stats(mix, few, min_share=0.01)["mode_coverage"] == 1.0
    far = torch.zeros(1000, 2) + 0.1 * torch.randn(1000, 2, generator=g)  # the origin sits between the modes
    assert mode_stats(mix, far)["off_mode"] == 1.0
    assert math.isnan(mode_stats(mix, far)["mode_std_ratio"])  # no sample on any mode: undefined (null in JSON)
