"""Seeded, stratified splits of a labelled dataset: the validation hold-out of every
dataset and the test split of those without an official one."""

from __future__ import annotations

import math

import numpy as np

from dlops.errors import DlopsError


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(keep, holdout)``: ``round(fraction * n_c)`` (at least 1) of each class
    ``c`` go to the hold-out, chosen by a seeded permutation; both sorted. A fraction that
    would leave a class with nothing to keep is a :class:`DlopsError` that says what would work."""
    classes, counts = np.unique(labels, return_counts=True)
    for c, n in zip(classes, counts, strict=True):
        if max(1, round(fraction * n)) >= n:
            raise DlopsError(_too_few(fraction, int(c), int(n), int(classes[counts.argmin()]), int(counts.min())))
    rng = np.random.default_rng(seed)
    holdout = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        holdout.append(rng.permutation(idx)[: max(1, round(fraction * len(idx)))])
    held = np.sort(np.concatenate(holdout))
    keep = np.setdiff1d(np.arange(len(labels)), held)
    return keep, held


def _too_few(fraction: float, c: int, n: int, smallest: int, fewest: int) -> str:
    """Why a hold-out of ``fraction`` takes every image of class ``c`` (``n`` images), and what
    would work given the smallest class ``smallest`` (``fewest`` images)."""
    if fewest < 2:
        return (
            f"class {smallest} has only 1 training image: a hold-out takes at least one image of every class, "
            "leaving none to train on, whatever the fraction (every class needs 2 or more training images)"
        )
    # round(fraction * n) <= n - 1 for every fraction up to (n - 1) / n, rounded down here
    most = math.floor((fewest - 1) / fewest * 100) / 100
    return (
        f"a hold-out fraction of {fraction} takes all {n} images of class {c}, leaving none to train on: "
        f"use --val-fraction {most} or less (the smallest class, {smallest}, has {fewest} training images)"
    )
