"""Datasets as uint8 arrays in memory or memory-mapped from the cache.

Every dataset is a :class:`Dataset` with ``train`` and ``val`` splits (validation is
a stratified hold-out from the official training data) and a ``test`` split that is
read through :meth:`Dataset.test`, so that studies can be proven never to touch it
(see :func:`forbid_test_split`).

``DATASETS`` maps a dataset name to a function ``(root) -> Dataset``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dlops.data.base import (
    Dataset,
    Split,
    TestSplitForbidden,
    check_subset_classes,
    data_change_text,
    data_changes,
    data_identity,
    first_per_class,
    forbid_test_split,
    take_subset,
)
from dlops.errors import DatasetNotAvailable, DlopsError


def _load_digits(root: Path | None = None) -> Dataset:
    from dlops.data.digits import load_digits_dataset

    return load_digits_dataset()


def _load_tiny_imagenet(root: Path | None = None) -> Dataset:
    from dlops.data import tinyimagenet  # PIL and the cache: loaded only when asked for

    return tinyimagenet.load(root)


def _load_stl10(root: Path | None = None) -> Dataset:
    from dlops.data import stl10

    return stl10.load(root)


DATASETS: dict[str, Callable[[Path | None], Dataset]] = {
    "digits": _load_digits,
    "tiny-imagenet": _load_tiny_imagenet,
    "stl10": _load_stl10,
}


def register_dataset(name: str, loader: Callable[[Path | None], Dataset]) -> None:
    DATASETS[name] = loader


def check_dataset_name(name: str) -> None:
    """An unknown dataset name is a one-line error naming the known ones."""
    if name not in DATASETS:
        known = ", ".join(sorted(DATASETS))
        raise DlopsError(f"unknown dataset {name!r} (known: {known})")


def get_dataset(name: str, root: Path | None = None) -> Dataset:
    """Load a registered dataset; an unknown or unprepared one is a one-line error."""
    check_dataset_name(name)
    return DATASETS[name](root)


def load_split(name: str, split: str, root: Path | None = None):
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
    "check_subset_classes",
    "data_change_text",
    "data_changes",
    "data_identity",
    "first_per_class",
    "forbid_test_split",
    "get_dataset",
    "load_split",
    "register_dataset",
    "take_subset",
]
