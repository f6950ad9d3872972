"""scikit-learn's bundled handwritten digits (8x8, 10 classes): the dataset that needs
no download. It has no official split, so a fixed stratified 20% is the test split
and 10% of the rest is the validation hold-out (both seeded, the same everywhere)."""

from __future__ import annotations

import numpy as np

from dlops.data import Dataset, Split

SPLIT_SEED = 0
TEST_FRACTION = 0.2
VAL_FRACTION = 0.1


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(keep, holdout)``: ``round(fraction * n_c)`` (at least 1) of each class
    ``c`` go to the hold-out, chosen by a seeded permutation; both sorted."""
    rng = np.random.default_rng(seed)
    holdout = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = max(1, int(round(fraction * len(idx))))
        holdout.append(rng.permutation(idx)[:k])
    held = np.sort(np.concatenate(holdout))
    keep = np.setdiff1d(np.arange(len(labels)), held)
    return keep, held


def load_digits_dataset() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    labels = bunch.target.astype(np.int64)
    rest, test = stratified_holdout(labels, TEST_FRACTION, SPLIT_SEED)
    train_pos, val_pos = stratified_holdout(labels[rest], VAL_FRACTION, SPLIT_SEED + 1)
    train, val = rest[train_pos], rest[val_pos]
    test_split = Split(images[test], labels[test])
    return Dataset(
        name="digits",
        class_ids=[str(i) for i in range(10)],
        class_names=[str(i) for i in range(10)],
        train=Split(images[train], labels[train]),
        val=Split(images[val], labels[val]),
        load_test=lambda: test_split,
        hflip=False,
        crop_padding=1,
    )
