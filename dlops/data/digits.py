"""scikit-learn's bundled handwritten digits (8x8, 10 classes): the dataset that needs
no download. It has no official split, so a fixed stratified 20% is the test split
and 10% of the rest is the validation hold-out (both seeded, the same everywhere)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from dlops.data.base import Dataset, Split
from dlops.data.splits import stratified_holdout

SPLIT_SEED = 0
TEST_FRACTION = 0.2
VAL_FRACTION = 0.1


def _bundled_csv() -> Path | None:
    """scikit-learn's ``datasets/data/digits.csv.gz``, found without importing scikit-learn
    (its import costs more than a second on a laptop, the whole load 0.02 s)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    return path if path.is_file() else None


def read_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as (N, 8, 8) float pixel counts 0..16 and (N,) int labels: what
    ``sklearn.datasets.load_digits()`` returns as ``images`` and ``target``, read straight
    from its bundled CSV (64 pixels then the label per row); through scikit-learn where its
    layout differs."""
    path = _bundled_csv()
    if path is not None:
        rows = np.loadtxt(path, delimiter=",")
        if rows.shape == (1797, 65):
            return rows[:, :-1].reshape(-1, 8, 8), rows[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target.astype(np.int64)


def load_digits_dataset() -> Dataset:
    pixels, labels = read_digits()
    images = np.round(pixels * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
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
