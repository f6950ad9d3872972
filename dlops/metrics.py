"""Top-k accuracy from logits and from class centroids in embedding space; the mean and
standard deviation over seeds."""

from __future__ import annotations

import math

import numpy as np
import torch


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """How many rows have their label among the ``k`` highest scores, for each ``k``.

    ``k`` larger than the number of classes counts every row as correct.
    """
    kmax = min(max(ks), scores.shape[1])
    top = scores.topk(kmax, dim=1).indices
    hit = top == labels[:, None]
    return {k: int(hit[:, : min(k, kmax)].any(1).sum()) for k in ks}


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    n = max(1, len(labels))
    return {k: c / n for k, c in topk_correct(scores, labels, ks).items()}


def class_centroids(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean embedding per class (zeros for a class with no sample)."""
    sums = torch.zeros(num_classes, embeddings.shape[1], dtype=embeddings.dtype, device=embeddings.device)
    sums.index_add_(0, labels, embeddings)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).to(embeddings.dtype)
    return sums / counts[:, None]


def centroid_scores(embeddings: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Scores for top-k by nearest centroid: the negated Euclidean distance to each."""
    return -torch.cdist(embeddings.float(), centroids.float())


def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1; 0 for one value) of the finite values."""
    xs = [v for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return None, None
    arr = np.asarray(xs, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
