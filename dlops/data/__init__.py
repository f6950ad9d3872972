"""Datasets as uint8 arrays in memory or memory-mapped from the cache: the registry.

Every dataset is a :class:`Dataset` with ``train`` and ``val`` splits (validation is
a stratified hold-out from the official training data) and a ``test`` split that is
read through :meth:`Dataset.test`, so that studies can be proven never to touch it
(see :func:`forbid_test_split`).

``DATASETS`` maps a dataset name to a function ``(root) -> Dataset``. The built-in ones
are the ``load(root)`` of a module each, imported on first use (they pull in PIL etc.).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

import numpy as np

from dlops.data.base import Dataset, Split, TestSplitForbidden, first_per_class, forbid_test_split, take_subset
from dlops.errors import DatasetNotAvailable, DlopsError


def _builtin(module: str) -> Callable[[Path | None], Dataset]:
    def load(root: Path | None = None) -> Dataset:
        return importlib.import_module(module).load(root)

    return load


DATASETS: dict[str, Callable[[Path | None], Dataset]] = {
    "digits": _builtin("dlops.data.digits"),
    "stl10": _builtin("dlops.data.stl10"),
    "tiny-imagenet": _builtin("dlops.data.tinyimagenet"),
}


def get_dataset(name: str, root: Path | None = None) -> Dataset:
    """Load a registered dataset; an unknown or unprepared one is a one-line error."""
    if name not in DATASETS:
        known = ", ".join(sorted(DATASETS))
        raise DlopsError(f"unknown dataset {name!r} (known: {known})")
    return DATASETS[name](root)


def load_split(name: str, split: str, root: Path | None = None) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """``(images, labels, class_ids, class_names)`` of one split, as a study reads it."""
    ds = get_dataset(name, root)
    if split == "train":
        s = ds.train
    elif split == "val":
        s = ds.val
    elif split == "test":
        s = ds.test()
    else:
        raise DlopsError(f"unknown split {split!r} (train, val, test)")
    return s.images, s.labels, ds.class_ids, ds.class_names


__all__ = [
    "DATASETS",
    "Dataset",
    "DatasetNotAvailable",
    "Split",
    "TestSplitForbidden",
    "first_per_class",
    "forbid_test_split",
    "get_dataset",
    "load_split",
    "take_subset",
]
