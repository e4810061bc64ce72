"""Image metrics (Fréchet distance, precision/recall), the digits split and the committed digit classifier."""

import json

import pytest
import torch

from tdm.eval.classifier import ASSET_DIR, load_classifier, train_classifier
from tdm.eval.digit_metrics import DigitMetrics, precision_recall
from tdm.eval.image_metrics import frechet_distance
from tdm.families.digits.data import load_digits_split, to_pixels

pytestmark = pytest.mark.usefixtures("one_thread")


# -- Fréchet distance -----------------------------------------------------------------------------
def test_frechet_distance_of_a_set_with_itself_is_zero():
    f = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    assert abs(frechet_distance(f, f)) < 1e-8


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    """|mu1 - mu2|^2 + sum(s1^2 + s2^2 - 2 s1 s2) with many samples; symmetric."""
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.tensor([0.0, 1.0, -1.0, 2.0]), torch.tensor([0.5, 1.0, 0.0, 0.0])
    s1, s2 = torch.tensor([1.0, 0.5, 2.0, 1.0]), torch.tensor([0.3, 0.5, 1.0, 3.0])
    a = mu1 + s1 * torch.randn(100_000, 4, generator=g)
    b = mu2 + s2 * torch.randn(100_000, 4, generator=g)
    exact = ((mu1 - mu2).pow(2) + s1**2 + s2**2 - 2 * s1 * s2).sum().item()
    assert frechet_distance(a, b) == pytest.approx(exact, rel=0.02)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-10)


def test_frechet_distance_trace_term_for_full_covariances():
    """tr (S_a S_b)^{1/2} = sum of square roots of the (real, non-negative) eigenvalues of S_a S_b."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(300, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    b = torch.randn(300, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    S_a, S_b = torch.cov(a.T), torch.cov(b.T)
    tr_sqrt = torch.linalg.eigvals(S_a @ S_b).real.clamp_min(0).sqrt().sum()
    ref = (a.mean(0) - b.mean(0)).pow(2).sum() + S_a.trace() + S_b.trace() - 2 * tr_sqrt
    assert frechet_distance(a, b) == pytest.approx(ref.item(), rel=1e-8)


# -- precision / recall ---------------------------------------------------------------------------
def test_precision_recall_of_identical_sets():
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    assert precision_recall(x, x) == (1.0, 1.0)


def test_precision_of_a_far_away_set_is_zero():
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    assert precision_recall(x, x + 100)[0] == 0.0


def test_half_the_modes_gives_full_precision_and_half_recall():
    g = torch.Generator().manual_seed(0)
    centre = torch.tensor([10.0, 0.0])
    real = torch.cat([torch.randn(300, 2, generator=g) + centre, torch.randn(300, 2, generator=g) - centre])
    fake = torch.randn(300, 2, generator=g) + centre
    precision, recall = precision_recall(real, fake)
    assert precision > 0.95
    assert recall == pytest.approx(0.5, abs=0.03)


# -- digits split ---------------------------------------------------------------------------------
def test_split_is_deterministic_stratified_disjoint_and_scaled():
    s = load_digits_split()
    again = load_digits_split()
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(s, name), getattr(again, name))
    assert not torch.equal(load_digits_split(seed=1).test_y, s.test_y)
    assert s.train_x.shape[1:] == (1, 8, 8) and s.train_x.dtype == torch.float32 and s.test_y.dtype == torch.int64
    assert len(s.train_y) + len(s.test_y) == 1797 and 440 <= len(s.test_y) <= 460
    train_counts, test_counts = torch.bincount(s.train_y, minlength=10), torch.bincount(s.test_y, minlength=10)
    assert (test_counts > 0).all() and (train_counts > 0).all()
    share = test_counts / (train_counts + test_counts)
    assert (share - 0.25).abs().max() < 0.01
    # the 1,797 images are all distinct, so disjoint images mean disjoint parts
    all_x = torch.cat([s.train_x, s.test_x]).flatten(1)
    assert torch.unique(all_x, dim=0).shape[0] == 1797
    assert s.train_x.min() == -1 and s.train_x.max() == 1 and s.test_x.min() >= -1 and s.test_x.max() <= 1
    assert to_pixels(torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0])).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


# -- the committed classifier ---------------------------------------------------------------------
@pytest.fixture
def evaluator(one_thread):
    return DigitMetrics(load_classifier(), load_digits_split())


def test_committed_classifier_reproduces_its_recorded_metrics(evaluator):
    recorded = json.loads((ASSET_DIR / "classifier.json").read_text())["metrics"]
    split = evaluator.split
    accuracy = evaluator.evaluate(split.test_x, split.test_y)["accuracy"]
    assert accuracy == pytest.approx(recorded["held_out_accuracy"], abs=1e-6)
    assert accuracy >= 0.95
    floor = recorded["floor"]
    got = evaluator.floor(floor["n"], torch.Generator().manual_seed(floor["seed"]))
    assert got["fd"] == pytest.approx(floor["fd"], rel=1e-3)
    for key in ("accuracy", "precision", "recall"):
        assert got[key] == pytest.approx(floor[key], abs=1e-3)


def test_held_out_digits_against_themselves_and_with_shuffled_labels(evaluator):
    split = evaluator.split
    own = evaluator.evaluate(split.test_x, split.test_y)
    assert abs(own["fd"]) < 1e-6 and own["precision"] == own["recall"] == 1.0
    shuffled = split.test_y[torch.randperm(len(split.test_y), generator=torch.Generator().manual_seed(0))]
    assert evaluator.evaluate(split.test_x, shuffled)["accuracy"] == pytest.approx(0.1, abs=0.05)


def test_training_is_reproducible_with_the_seed():
    split = load_digits_split()
    a = train_classifier(split, steps=5, batch_size=16, seed=3, progress=False)
    b = train_classifier(split, steps=5, batch_size=16, seed=3, progress=False)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
