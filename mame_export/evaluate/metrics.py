"""What ``eval`` computes from the outputs: fidelity to the unmerged model (cosines,
top-1 agreement), accuracy on labels (top-1/top-5), and, for encoders, 1-NN and
linear-probe accuracy on the features. Every sum is over images, batch by batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

MIN_PER_CLASS = 2  # a probe / 1-NN needs one training and one scored image per class
PROBE_WEIGHT_DECAY = 1e-3
PROBE_MAX_ITER = 300


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-item cosine of two (B, ...) tensors."""
    return F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1, eps=1e-12)


def pooled_tokens(features: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """(B, N, C) tokens and their (B, N, 1) sizes -> the size-weighted mean token (B, C):
    merged tokens weigh as many patches as they hold, so no MaRe is needed to compare a
    merged sequence with the unmerged one's plain mean (all sizes 1)."""
    return (features * sizes).sum(1) / sizes.sum(1).clamp_min(1e-12)


@dataclass
class Tally:
    """A variant's running sums against the reference, batch by batch."""

    count: int = 0
    cos_outputs: float = 0.0
    cos_features: float = 0.0
    features_seen: bool = True  # False once a batch had no features (a graph classifier)
    agree: float = 0.0
    top1: float = 0.0
    top5: float = 0.0
    kept: list[torch.Tensor] = field(default_factory=list)  # features for 1-NN / probe

    def add(self, ref_out: torch.Tensor, out: torch.Tensor, ref_feat: torch.Tensor | None,
            feat: torch.Tensor | None, labels: torch.Tensor | None, class_scores: bool,
            keep_features: bool) -> None:
        self.count += len(out)
        self.cos_outputs += float(cosines(out, ref_out).sum())
        if feat is None or ref_feat is None:
            self.features_seen = False
        else:
            self.cos_features += float(cosines(feat, ref_feat).sum())
            if keep_features:
                self.kept.append(feat.double())
        if not class_scores:
            return
        pred = out.argmax(dim=1)
        self.agree += float((pred == ref_out.argmax(dim=1)).sum())
        if labels is not None:
            self.top1 += float((pred == labels).sum())
            k = min(5, out.shape[1])
            self.top5 += float((out.topk(k, dim=1).indices == labels[:, None]).any(1).sum())

    def metrics(self, class_scores: bool, labelled: bool) -> dict[str, float | None]:
        """Means over the items: the JSON keys of each eval row."""
        n = max(self.count, 1)
        return {
            "cosine_outputs": self.cos_outputs / n,
            "cosine_features": self.cos_features / n if self.features_seen else None,
            "top1_agreement": self.agree / n if class_scores else None,
            "top1": self.top1 / n if class_scores and labelled else None,
            "top5": self.top5 / n if class_scores and labelled else None,
        }


def probe_split(labels: Sequence[int]) -> tuple[torch.Tensor, str | None]:
    """A fixed, stratified half: within each class, items 0, 2, 4, ... (in the folder's
    order) train the probe and are the 1-NN bank, items 1, 3, 5, ... are scored. Returns
    the training mask and, below the minimum, why nothing is computed."""
    y = torch.tensor(list(labels))
    train = torch.zeros(len(y), dtype=torch.bool)
    counts = {}
    for c in sorted(set(y.tolist())):
        idx = (y == c).nonzero().flatten()
        train[idx[0::2]] = True
        counts[c] = len(idx)
    if len(counts) < 2:
        return train, "the folder has one class"
    few = min(counts.values())
    if few < MIN_PER_CLASS:
        return train, f"a class has {few} image(s), fewer than {MIN_PER_CLASS}"
    return train, None


def fit_probe(features: torch.Tensor, labels: torch.Tensor,
              classes: int) -> torch.nn.Linear:
    """A softmax classifier (multinomial logistic regression) on standardised features:
    L-BFGS from zero weights, weight decay 1e-3, float64; deterministic."""
    probe = torch.nn.Linear(features.shape[1], classes, dtype=torch.float64)
    torch.nn.init.zeros_(probe.weight)
    torch.nn.init.zeros_(probe.bias)
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=PROBE_MAX_ITER,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (F.cross_entropy(probe(features), labels)
                + PROBE_WEIGHT_DECAY * probe.weight.square().sum())
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return probe


class FeatureScorer:
    """1-NN (cosine) and a linear probe, both fitted on the reference (unmerged) model's
    features of the training half and scored on the other half for every variant."""

    def __init__(self, ref_features: torch.Tensor, labels: Sequence[int],
                 train: torch.Tensor) -> None:
        y_all = torch.tensor(list(labels))
        classes, y = torch.unique(y_all, return_inverse=True)
        self.train, self.y = train, y
        f = ref_features[train]
        self.mean, self.std = f.mean(0), f.std(0) + 1e-6
        self.probe = fit_probe((f - self.mean) / self.std, y[train], len(classes))
        self.bank = F.normalize(f, dim=1)
        self.ref = self._predict(ref_features)

    @torch.no_grad()
    def _predict(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        test = features[~self.train]
        nearest = (F.normalize(test, dim=1) @ self.bank.T).argmax(1)
        knn = self.y[self.train][nearest]
        probe = self.probe((test - self.mean) / self.std).argmax(1)
        return knn, probe

    def score(self, features: torch.Tensor) -> dict[str, float]:
        knn, probe = self._predict(features)
        y = self.y[~self.train]
        return {"knn_accuracy": float((knn == y).double().mean()),
                "knn_agreement": float((knn == self.ref[0]).double().mean()),
                "probe_accuracy": float((probe == y).double().mean()),
                "probe_agreement": float((probe == self.ref[1]).double().mean())}
