"""Seeded, stratified splits of a labelled dataset: the validation hold-out of every
dataset and the test split of those without an official one."""

from __future__ import annotations

import numpy as np

from dlops.errors import DlopsError


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(keep, holdout)``: ``round(fraction * n_c)`` (at least 1) of each class
    ``c`` go to the hold-out, chosen by a seeded permutation; both sorted. A fraction that
    would leave a class with nothing to keep is a :class:`DlopsError`."""
    rng = np.random.default_rng(seed)
    holdout = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = max(1, round(fraction * len(idx)))
        if k >= len(idx):
            raise DlopsError(
                f"a hold-out fraction of {fraction} takes all {len(idx)} images of class {c}, "
                "leaving none to train on: use a smaller fraction (e.g. --val-fraction 0.1)"
            )
        holdout.append(rng.permutation(idx)[:k])
    held = np.sort(np.concatenate(holdout))
    keep = np.setdiff1d(np.arange(len(labels)), held)
    return keep, held
