"""Seeded, stratified splits of a labelled dataset: the validation hold-out of every
dataset and the test split of those without an official one."""

from __future__ import annotations

import numpy as np


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(keep, holdout)``: ``round(fraction * n_c)`` (at least 1) of each class
    ``c`` go to the hold-out, chosen by a seeded permutation; both sorted."""
    rng = np.random.default_rng(seed)
    holdout = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = max(1, round(fraction * len(idx)))
        holdout.append(rng.permutation(idx)[:k])
    held = np.sort(np.concatenate(holdout))
    keep = np.setdiff1d(np.arange(len(labels)), held)
    return keep, held
