"""What a dataset is: :class:`Split` and :class:`Dataset`, the guard that keeps studies off
the test split, and cheap subsets (the first classes, the first images of each)."""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dlops.errors import DlopsError
from dlops.text import plural


@dataclass
class Split:
    """One split: ``images`` uint8 (N, C, H, W), possibly a memmap; ``labels`` int64 (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


class TestSplitForbidden(RuntimeError):
    """The test split was read where it must not be (inside a study)."""


_test_forbidden: contextvars.ContextVar[bool] = contextvars.ContextVar("test_forbidden", default=False)


@contextlib.contextmanager
def forbid_test_split() -> Iterator[None]:
    """Within this block any :meth:`Dataset.test` call raises :class:`TestSplitForbidden`."""
    token = _test_forbidden.set(True)
    try:
        yield
    finally:
        _test_forbidden.reset(token)


@dataclass
class Dataset:
    name: str
    class_ids: list[str]
    class_names: list[str]
    train: Split
    val: Split
    load_test: Callable[[], Split] = field(repr=False)
    # Augmentations that keep the label: digits must not be mirrored.
    hflip: bool = True
    crop_padding: int = 4
    test_reads: int = 0
    # checks the stored test split (raises DatasetNotAvailable when damaged); None: nothing stored to check
    verify_test: Callable[[], object] | None = field(default=None, repr=False)
    # How a cached dataset was built, from its manifest (:func:`dlops.data.cache.open_dataset`):
    # the hold-out's fraction and seed, the split sizes, the source archive's md5. Empty for a
    # built-in dataset (digits: its split is fixed in the code).
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.train.images.shape[1:])  # type: ignore[return-value]

    def test(self) -> Split:
        """The test split. Raises inside :func:`forbid_test_split`; counts reads."""
        if _test_forbidden.get():
            raise TestSplitForbidden(f"the test split of {self.name} was read during a study")
        self.test_reads += 1
        return self.load_test()

    def check_test(self) -> None:
        """Check the test split's stored form (a cache: its labels and sizes) without
        evaluating anything on it: not a read, so a reference run finds a damaged test
        split before it trains, not after."""
        if self.verify_test is not None:
            self.verify_test()

    def channel_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and std of the training images in [0, 1] (from up to 10k images)."""
        images = self.train.images
        step = max(1, len(images) // 10_000)
        sample = np.asarray(images[::step], dtype=np.float32) / 255.0
        mean = sample.mean(axis=(0, 2, 3))
        std = sample.std(axis=(0, 2, 3)) + 1e-6
        return mean, std


def first_per_class(labels: np.ndarray, k: int) -> np.ndarray:
    """Positions of the first ``k`` items of each class, in their original order."""
    labels = np.asarray(labels)
    if len(labels) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    ranks = np.empty(len(labels), dtype=np.int64)
    ranks[order] = np.arange(len(labels)) - np.repeat(starts, counts)
    return np.flatnonzero(ranks < k)


def take_subset(ds: Dataset, num_classes: int | None = None, per_class: int | None = None) -> Dataset:
    """A cheaper dataset: the first ``num_classes`` classes and, in the training split,
    the first ``per_class`` images of each (validation keeps at most as many per class).

    Class indices stay 0..num_classes-1, so labels need no remapping.
    """
    if num_classes is None and per_class is None:
        return ds
    n = ds.num_classes if num_classes is None else num_classes
    if not 1 <= n <= ds.num_classes:
        raise DlopsError(f"subset of {plural(n, 'class')} asked for; {ds.name} has {ds.num_classes}")
    if per_class is not None and per_class < 1:
        raise DlopsError(f"subset per_class must be at least 1, got {per_class}")

    def restrict(split: Split, cap: int | None) -> Split:
        labels = np.asarray(split.labels)
        keep = np.flatnonzero(labels < n)
        if cap is not None:
            keep = keep[first_per_class(labels[keep], cap)]
        return Split(np.ascontiguousarray(split.images[keep]), labels[keep])

    load_test = ds.load_test
    return Dataset(
        name=ds.name,
        class_ids=ds.class_ids[:n],
        class_names=ds.class_names[:n],
        train=restrict(ds.train, per_class),
        val=restrict(ds.val, per_class),
        load_test=lambda: restrict(load_test(), None),
        hflip=ds.hflip,
        crop_padding=ds.crop_padding,
        provenance=ds.provenance,
    )


def check_subset_classes(ds: Dataset, n: int | None) -> int:
    """The number of classes a run on ``ds`` trains on with a subset of ``n`` classes (None:
    all). Fewer than 2 (every validation score is 1.0, a triplet batch has no negative) or
    more than ``ds`` has is a :class:`DlopsError` in one line."""
    if n is None:
        return ds.num_classes
    if n < 2:
        raise DlopsError(
            f"--subset-classes {n}: a run needs at least 2 classes (on one class every prediction is right "
            "and the triplet loss has no negatives)"
        )
    if n > ds.num_classes:
        raise DlopsError(f"--subset-classes {n}: {ds.name} has {ds.num_classes} classes")
    return n


def data_identity(ds: Dataset) -> dict[str, Any]:
    """What tells the data a study measures its values on from other data under the same
    name (``dataset``): the class count and list (a hash), the split sizes and, for a cached dataset, the
    validation hold-out's fraction and seed and the archive it was built from (its md5,
    None when the cache was prepared from a tree of unknown origin). JSON-ready."""
    identity: dict[str, Any] = {
        "dataset": ds.name,
        "classes": ds.num_classes,
        "class_ids_sha256": hashlib.sha256("\n".join(ds.class_ids).encode()).hexdigest()[:16],
        "splits": {"train": len(ds.train), "val": len(ds.val)},
    }
    return {**identity, **ds.provenance}


# What check_same_data compares: a label and the data_identity keys behind it.
DATA_FIELDS = {
    "validation hold-out": ("holdout_fraction", "holdout_seed"),
    "split sizes": ("splits",),
    "classes": ("classes", "class_ids_sha256"),
    "source archive": ("source_md5",),
}


def data_text(data: dict[str, Any], label: str) -> str:
    if label == "validation hold-out":
        return f"--val-fraction {data.get('holdout_fraction')} --seed {data.get('holdout_seed')}"
    if label == "split sizes":
        return ", ".join(f"{split} {count}" for split, count in (data.get("splits") or {}).items())
    if label == "classes":
        return f"{data.get('classes')} (list {data.get('class_ids_sha256')})"
    return f"md5 {data.get('source_md5')}"


def data_changes(recorded: Any, data: dict[str, Any] | None) -> list[str]:
    """What differs between the data a study recorded and ``data`` (labels of DATA_FIELDS;
    empty where either is unknown)."""
    if data is None or not isinstance(recorded, dict):
        return []
    return [
        label
        for label, keys in DATA_FIELDS.items()
        if any(recorded.get(k) is not None and data.get(k) is not None and recorded[k] != data[k] for k in keys)
    ]


def data_change_text(recorded: dict[str, Any], data: dict[str, Any], changed: list[str]) -> str:
    return "; ".join(f"{label}: {data_text(recorded, label)} then, {data_text(data, label)} now" for label in changed)
