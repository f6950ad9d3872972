"""STL-10: 96x96 colour images of 10 classes, 5,000 labelled train, 8,000 test and
100,000 unlabeled (for unsupervised pretraining).

The binary files (``stl10_binary/``) store each image channel-major and column-major:
read as ``(N, 3, 96, 96)`` they are transposed, so the last two axes are swapped when
the cache is built. Labels in ``*_y.bin`` are 1..10 and become 0..9.

``train`` minus a stratified, seeded hold-out (10% per class) is our train split, the
hold-out is ``val``, ``test`` is the official test set and ``unlabeled`` is cached too:
read it with :func:`load_unlabeled` (labels all -1).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from dlops.data.base import Dataset, Split
from dlops.data.cache import CacheBuilder, open_dataset, open_split, read_manifest
from dlops.data.fetch import count_progress, tree_candidates
from dlops.data.splits import stratified_holdout
from dlops.errors import DatasetNotAvailable, DlopsError

NAME = "stl10"
URL = "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"
MD5 = "91f7769df0f17e558f3565bffb0c7dfb"
ARCHIVE = "stl10_binary.tar.gz"
TREE = "stl10_binary"
SIZE = 96
IMAGE_SHAPE = (3, SIZE, SIZE)
IMAGE_BYTES = 3 * SIZE * SIZE  # 27,648
NUM_CLASSES = 10
HFLIP = True
CROP_PADDING = 12  # 1/8 of the side, as for Tiny ImageNet
FILES = {
    "train": ("train_X.bin", "train_y.bin"),
    "test": ("test_X.bin", "test_y.bin"),
    "unlabeled": ("unlabeled_X.bin", None),
}
CHUNK = 2048  # images converted per step (about 57 MB)


def find_tree(directory: Path) -> Path:
    """The ``stl10_binary`` tree in ``directory`` (itself, ``stl10_binary/`` or its only subdirectory)."""
    candidates = tree_candidates(directory, TREE)
    for c in candidates:
        if (c / "train_X.bin").is_file() or (c / "class_names.txt").is_file():
            return c
    raise DlopsError(f"{NAME}: no stl10_binary tree (train_X.bin, class_names.txt, ...) in {directory}")


def count_images(path: Path) -> int:
    """The number of images in an ``*_X.bin`` file; its size must be a multiple of 27,648."""
    if not path.is_file():
        raise DlopsError(f"{NAME}: {path.name} missing in {path.parent}")
    size = path.stat().st_size
    if size == 0 or size % IMAGE_BYTES:
        raise DlopsError(
            f"{NAME}: {path.name} has {size:,} bytes, not a multiple of {IMAGE_BYTES:,} (3x96x96): "
            "truncated or not STL-10"
        )
    return size // IMAGE_BYTES


def read_images(path: Path, start: int = 0, count: int | None = None) -> np.ndarray:
    """Images ``start .. start+count`` of an ``*_X.bin`` file as uint8 (n, 3, 96, 96), rows
    and columns in place (the file stores each channel column by column)."""
    total = count_images(path)
    count = total - start if count is None else min(count, total - start)
    raw = np.fromfile(path, dtype=np.uint8, count=count * IMAGE_BYTES, offset=start * IMAGE_BYTES)
    return raw.reshape(count, 3, SIZE, SIZE).swapaxes(2, 3)


def read_labels(path: Path, count: int) -> np.ndarray:
    if not path.is_file():
        raise DlopsError(f"{NAME}: {path.name} missing in {path.parent}")
    raw = np.fromfile(path, dtype=np.uint8)
    if len(raw) != count:
        raise DlopsError(f"{NAME}: {path.name} holds {len(raw):,} labels for {count:,} images")
    if len(raw) and (raw.min() < 1 or raw.max() > NUM_CLASSES):
        raise DlopsError(f"{NAME}: {path.name} has labels outside 1..{NUM_CLASSES}")
    return raw.astype(np.int64) - 1


def read_class_names(tree: Path) -> list[str]:
    path = tree / "class_names.txt"
    if not path.is_file():
        raise DlopsError(f"{NAME}: class_names.txt missing in {tree}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DlopsError(
            f"{NAME}: class_names.txt in {tree} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != NUM_CLASSES:
        raise DlopsError(f"{NAME}: class_names.txt in {tree} has {len(names)} names, expected {NUM_CLASSES}")
    return names


def build_cache(
    tree: Path,
    builder: CacheBuilder,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Convert the binary files into ``builder``'s split files (``workers`` unused: it is a copy)."""
    tree = Path(tree)
    names = read_class_names(tree)
    # Check every file before writing anything.
    counts = {split: count_images(tree / x) for split, (x, _) in FILES.items()}
    labels = {split: read_labels(tree / y, counts[split]) for split, (_, y) in FILES.items() if y}
    labels["unlabeled"] = np.full(counts["unlabeled"], -1, dtype=np.int64)
    missing = np.flatnonzero(np.bincount(labels["train"], minlength=NUM_CLASSES) == 0)
    if len(missing):  # such a class could be neither learned nor held out for validation
        which = ", ".join(f"{c + 1} ({names[c]})" for c in missing)
        raise DlopsError(
            f"{NAME}: train_y.bin in {tree} has no images of class {which}: "
            "every class needs training images (to learn it and to hold some out)"
        )

    keep, held = stratified_holdout(labels["train"], val_fraction, seed)
    total = sum(counts.values())
    start = time.perf_counter()
    with count_progress(progress) as bar:
        task = bar.add_task(f"convert {NAME}", total=total)
        # train (138 MB) is read whole and split; test and unlabeled are streamed in chunks,
        # so memory stays small even for the 2.8 GB of unlabeled images.
        train = read_images(tree / FILES["train"][0])
        for split, positions in (("train", keep), ("val", held)):
            with builder.new_images(split, len(positions), IMAGE_SHAPE) as writer:
                for a in range(0, len(positions), CHUNK):
                    writer.write(a, train[positions[a : a + CHUNK]])
                    bar.advance(task, len(positions[a : a + CHUNK]))
            builder.save_labels(split, labels["train"][positions])
        del train
        for split in ("test", "unlabeled"):
            with builder.new_images(split, counts[split], IMAGE_SHAPE) as writer:
                for a in range(0, counts[split], CHUNK):
                    chunk = read_images(tree / FILES[split][0], a, CHUNK)
                    writer.write(a, chunk)
                    bar.advance(task, len(chunk))
            builder.save_labels(split, labels[split])
    builder.save_array("val_source_index.npy", held.astype(np.int64))
    seconds = time.perf_counter() - start
    return {
        "class_ids": names,
        "class_names": names,
        "holdout": {
            "from": "official train",
            "fraction": val_fraction,
            "seed": seed,
            "count": len(held),
            "index_file": "val_source_index.npy",
        },
        "test_source": "official test",
        "build": {
            "images": total,
            "seconds": round(seconds, 3),
            "workers": 1,
            "images_per_second": round(total / max(seconds, 1e-9), 1),
        },
    }


def load(root: Path | None = None) -> Dataset:
    """The cached STL-10 labelled data: train/val memory-mapped, test opened when asked for."""
    return open_dataset(root, NAME, hflip=HFLIP, crop_padding=CROP_PADDING)


def load_unlabeled(root: Path | str | None = None) -> Split:
    """The 100,000 unlabeled images, uint8 (N, 3, 96, 96) memory-mapped; labels are all -1."""
    manifest = read_manifest(root, NAME)
    if "unlabeled" not in manifest["splits"]:
        raise DatasetNotAvailable(
            f"{NAME} cache has no unlabeled split: rebuild it with `dlops data prepare {NAME} --force`"
        )
    return open_split(root, NAME, "unlabeled")
