"""Image metrics in the digit classifier's feature space: Fréchet distance, conditional accuracy,
precision and recall.

The Fréchet distance here is computed on the 64-d features of `DigitClassifier`, not on
Inception-v3's 2048-d pool features, so its values are not comparable with published FIDs.
"""

from __future__ import annotations

import functools

import torch

from ..families.digits.data import DigitsSplit
from .classifier import DigitClassifier
from .image_metrics import frechet_distance


def _covered(x: torch.Tensor, ref: torch.Tensor, k: int) -> torch.Tensor:
    """Share of `x` inside the k-NN manifold of `ref`: within the k-th-neighbour radius of some ref point."""
    d_ref = torch.cdist(ref, ref, compute_mode="donot_use_mm_for_euclid_dist")
    radius = d_ref.kthvalue(k + 1, dim=1).values  # k + 1: each point is its own nearest neighbour
    d = torch.cdist(x, ref, compute_mode="donot_use_mm_for_euclid_dist")
    return (d <= radius).any(1).double().mean()


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds.

    precision: share of fake samples inside the real manifold (fidelity); recall: share of real
    samples inside the fake manifold (coverage).
    """
    real, fake = real.double().flatten(1), fake.double().flatten(1)
    return _covered(fake, real, k).item(), _covered(real, fake, k).item()


class DigitMetrics:
    """Compares generated digits with the full held-out set in the classifier's feature space.

    FD and precision/recall depend on the sample count, so compare sample sets of equal size only,
    against `floor(n)`: real training images at that same count.
    """

    def __init__(self, classifier: DigitClassifier, split: DigitsSplit, k: int = 3, batch_size: int = 1024):
        self.classifier = classifier.eval()
        self.split = split
        self.k = k                              # neighbour rank of the precision/recall radii
        self.batch_size = batch_size            # images per classifier call
        self.real_features, _ = self._embed(split.test_x)

    @torch.no_grad()
    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and predicted classes, on the CPU."""
        device = next(self.classifier.parameters()).device
        feats = torch.cat([self.classifier.features(b.to(device).float()).cpu() for b in x.split(self.batch_size)])
        return feats, self.classifier.head(feats.to(device)).argmax(-1).cpu()

    def evaluate(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """`fd`, `accuracy` (prediction equals the conditioning label), `precision`, `recall` of images in [-1, 1]."""
        f, pred = self._embed(x)
        precision, recall = precision_recall(self.real_features, f, self.k)
        return {"fd": frechet_distance(f, self.real_features),
                "accuracy": (pred == labels.cpu()).double().mean().item(),
                "precision": precision, "recall": recall}

    def floor(self, n: int, generator: torch.Generator) -> dict[str, float]:
        """The metrics of `n` real training images with the held-out class shares: the best a sampler can
        reach at `n`."""
        train_y, test_y = self.split.train_y, self.split.test_y
        share = torch.bincount(test_y, minlength=int(train_y.max()) + 1).double() / len(test_y)
        count = (n * share).floor().long()
        rest = n - int(count.sum())             # largest remainders take the leftover images
        count[(n * share - count).argsort(descending=True, stable=True)[:rest]] += 1
        idx = []
        for c, n_c in enumerate(count.tolist()):
            members = (train_y == c).nonzero().squeeze(1)
            if n_c > len(members):
                raise ValueError(f"floor({n}) needs {n_c} training images of class {c}; there are {len(members)}")
            idx.append(members[torch.randperm(len(members), generator=generator)[:n_c]])
        idx = torch.cat(idx)
        return self.evaluate(self.split.train_x[idx], train_y[idx])


@functools.cache
def digit_metrics() -> DigitMetrics:
    """The committed classifier on the committed split, built once per process on first use (evaluation only)."""
    from ..families.digits.data import load_digits_split
    from .classifier import load_classifier

    return DigitMetrics(load_classifier(), load_digits_split())
