"""Tiny ImageNet (CS231n): 200 classes of 64x64 images, 500 train and 50 val per class.

The official ``val/`` is labelled and is our **test** split (in the order of
``val_annotations.txt``); **val** is a stratified, seeded hold-out of the official
``train/`` (10% of each class by default) made once, when the cache is built, and
recorded in the manifest. The official ``test/`` has no labels and is not used.

Class ``i`` is line ``i`` of ``wnids.txt``; its name is the first synonym of its
``words.txt`` entry. JPEGs are decoded once, here (grayscale ones become RGB), across
a pool of processes that write each image straight into the cache files.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dlops.data.base import Dataset
from dlops.data.cache import CacheBuilder, ImageWriter, open_dataset
from dlops.data.fetch import count_progress, tree_candidates
from dlops.data.splits import stratified_holdout
from dlops.errors import DlopsError

NAME = "tiny-imagenet"
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
ARCHIVE = "tiny-imagenet-200.zip"
TREE = "tiny-imagenet-200"
SIZE = 64
IMAGE_SHAPE = (3, SIZE, SIZE)
# Random crops shift by up to 8 px of 64 (as CIFAR's 4 of 32); left-right mirroring keeps the label.
HFLIP = True
CROP_PADDING = 8
CHUNK = 256  # images per pool task


@dataclass
class Layout:
    """What an extracted tree holds, read from its index files (no image decoded yet)."""

    tree: Path
    wnids: list[str]
    names: list[str]
    train_files: list[str]  # relative to ``tree``, class by class in wnids order
    train_labels: np.ndarray
    test_files: list[str]  # official val, in val_annotations.txt order
    test_labels: np.ndarray


def find_tree(directory: Path) -> Path:
    """The Tiny ImageNet tree in ``directory``: itself, ``tiny-imagenet-200/`` or its only subdirectory."""
    candidates = tree_candidates(directory, TREE)
    for c in candidates:
        if (c / "wnids.txt").is_file():
            return c
    for c in candidates:
        if (c / "train").is_dir() or (c / "val").is_dir():
            raise DlopsError(f"{NAME}: wnids.txt missing in {c}: not a complete Tiny ImageNet tree")
    raise DlopsError(f"{NAME}: no Tiny ImageNet tree (wnids.txt, train/, val/) in {directory}")


def _image_sort_key(path: Path) -> tuple[int, str]:
    # <wnid>_<k>.JPEG in numeric order of k, so the first 50 by index come first
    stem = path.stem.rsplit("_", 1)[-1]
    return (int(stem), path.name) if stem.isdigit() else (1 << 62, path.name)


def _is_jpeg(path: Path) -> bool:
    return path.suffix.lower() in (".jpeg", ".jpg")


def _read_lines(path: Path, tree: Path) -> list[str]:
    """The lines of a text file of the tree (ASCII in every release), or a one-line DlopsError."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DlopsError(
            f"{NAME}: {path.relative_to(tree)} in {tree} is not text (byte {exc.start} is not UTF-8): "
            "a damaged or foreign file"
        ) from None


def read_layout(tree: Path) -> Layout:
    """Check the tree's layout and list its images; any problem is a one-line DlopsError."""
    tree = Path(tree)
    wnids_path = tree / "wnids.txt"
    if not wnids_path.is_file():
        raise DlopsError(f"{NAME}: wnids.txt missing in {tree}")
    wnids = [line.strip() for line in _read_lines(wnids_path, tree) if line.strip()]
    if not wnids:
        raise DlopsError(f"{NAME}: wnids.txt in {tree} is empty")
    if len(set(wnids)) != len(wnids):
        raise DlopsError(f"{NAME}: wnids.txt in {tree} lists a class twice")
    index = {w: i for i, w in enumerate(wnids)}

    words_path = tree / "words.txt"
    if not words_path.is_file():
        raise DlopsError(f"{NAME}: words.txt missing in {tree}")
    words: dict[str, str] = {}
    for line in words_path.read_text(errors="replace").splitlines():
        wnid, _, text = line.partition("\t")
        if wnid in index:
            words[wnid] = text.split(",")[0].strip() or wnid
    names = [words.get(w, w) for w in wnids]

    train_files: list[str] = []
    train_labels: list[int] = []
    for i, wnid in enumerate(wnids):
        folder = tree / "train" / wnid / "images"
        if not folder.is_dir():
            raise DlopsError(f"{NAME}: train/{wnid}/images missing in {tree} (class {i} of wnids.txt)")
        files = sorted((p for p in folder.iterdir() if _is_jpeg(p)), key=_image_sort_key)
        if not files:
            raise DlopsError(f"{NAME}: train/{wnid}/images in {tree} holds no JPEG")
        train_files += [str(p.relative_to(tree)) for p in files]
        train_labels += [i] * len(files)

    ann_path = tree / "val" / "val_annotations.txt"
    if not ann_path.is_file():
        raise DlopsError(f"{NAME}: val/val_annotations.txt missing in {tree}")
    test_files: list[str] = []
    test_labels: list[int] = []
    for n, line in enumerate(_read_lines(ann_path, tree), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise DlopsError(f"{NAME}: val/val_annotations.txt line {n} is not 'file<TAB>wnid...': {line[:60]!r}")
        file, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in index:
            raise DlopsError(f"{NAME}: val/val_annotations.txt line {n} names {wnid!r}, which is not in wnids.txt")
        rel = Path("val") / "images" / file
        if "/" in file or "\\" in file or not (tree / rel).is_file():
            raise DlopsError(f"{NAME}: val/val_annotations.txt line {n} names {file!r}, not found in val/images")
        test_files.append(str(rel))
        test_labels.append(index[wnid])
    if not test_files:
        raise DlopsError(f"{NAME}: val/val_annotations.txt in {tree} lists no image")
    return Layout(
        tree,
        wnids,
        names,
        train_files,
        np.asarray(train_labels, np.int64),
        test_files,
        np.asarray(test_labels, np.int64),
    )


# --------------------------------------------------------------------------- decoding


def decode_image(path: str | Path) -> np.ndarray:
    """One JPEG as uint8 (3, 64, 64), exactly as PIL decodes it (grayscale -> RGB)."""
    from PIL import Image

    with Image.open(path) as im:
        rgb = im.convert("RGB")  # forces the full decode: a truncated file raises here
    if rgb.size != (SIZE, SIZE):
        raise ValueError(f"is {rgb.size[0]}x{rgb.size[1]}, expected {SIZE}x{SIZE}")
    return np.asarray(rgb).transpose(2, 0, 1)


_writers: dict[str, ImageWriter] = {}


def _open_writers(writers: dict[str, ImageWriter]) -> None:
    _close_writers()
    _writers.update(writers)


def _start_worker(writers: dict[str, ImageWriter], parent: int) -> None:
    """A pool worker's start: open the split files, and end with the process that made the
    pool. Killed hard (SIGKILL), that process cannot stop its workers, and they would wait
    for work forever, each holding its memory. Ctrl-C is the parent's to handle (a terminal
    sends it to the workers too): it stops the pool, and an idle worker does not print the
    traceback of a KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _open_writers(writers)
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _close_writers() -> None:
    for w in _writers.values():
        w.close()
    _writers.clear()


def _decode_chunk(chunk: list[tuple[str, str, str, int]]) -> tuple[int, str | None]:
    """Decode ``(tree, relpath, split, index)`` jobs into the split files; ``(done, error)``."""
    done = 0
    for tree, rel, split, i in chunk:
        try:
            image = decode_image(os.path.join(tree, rel))
        except Exception as exc:  # noqa: BLE001 (any decoder failure names the file)
            return done, f"cannot decode {rel}: {exc}"
        _writers[split].write(i, image)  # a failed write (a full disk) is no fault of the image: it propagates
        done += 1
    return done, None


def _chunks(jobs: list, size: int) -> Iterator[list]:
    for start in range(0, len(jobs), size):
        yield jobs[start : start + size]


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def decode_all(
    jobs: list[tuple[str, str, str, int]], writers: dict[str, ImageWriter], *, workers: int, progress: bool, label: str
) -> None:
    """Decode every job into its split's file, in a pool when ``workers > 1``. The first
    undecodable image stops the work with a DlopsError."""
    if workers <= 1 or len(jobs) <= CHUNK:
        _open_writers(writers)
        try:
            with count_progress(progress) as bar:
                task = bar.add_task(label, total=len(jobs))
                for chunk in _chunks(jobs, CHUNK):
                    done, error = _decode_chunk(chunk)
                    if error:
                        raise DlopsError(f"{NAME}: {error}")
                    bar.advance(task, done)
        finally:
            _close_writers()
        return
    # fork starts a worker in milliseconds (spawn: a second or more here); the workers only
    # run PIL and numpy. On the first error the chunks not yet started are cancelled and
    # the running ones finish: no worker is killed, since killing pool workers mid-task
    # can deadlock multiprocessing's own queues (Pool.terminate hangs on Python 3.11).
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    executor = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context(method),
        initializer=_start_worker,
        initargs=(writers, os.getpid()),
    )
    try:
        futures = [executor.submit(_decode_chunk, chunk) for chunk in _chunks(jobs, CHUNK)]
        with count_progress(progress) as bar:
            task = bar.add_task(label, total=len(jobs))
            for future in as_completed(futures):
                done, error = future.result()
                if error:
                    raise DlopsError(f"{NAME}: {error}")
                bar.advance(task, done)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def build_cache(
    tree: Path,
    builder: CacheBuilder,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Decode the tree into ``builder``'s split files; returns the manifest entries it knows."""
    layout = read_layout(tree)
    keep, held = stratified_holdout(layout.train_labels, val_fraction, seed)
    splits = {
        "train": (keep, [layout.train_files[i] for i in keep], layout.train_labels[keep]),
        "val": (held, [layout.train_files[i] for i in held], layout.train_labels[held]),
        "test": (None, layout.test_files, layout.test_labels),
    }
    jobs: list[tuple[str, str, str, int]] = []
    writers: dict[str, ImageWriter] = {}
    tree_str = str(layout.tree)
    for split, (_, files, labels) in splits.items():
        writers[split] = builder.new_images(split, len(files), IMAGE_SHAPE)
        builder.save_labels(split, labels)
        jobs += [(tree_str, rel, split, i) for i, rel in enumerate(files)]
    builder.save_array("val_source_index.npy", held.astype(np.int64))

    workers = default_workers() if workers is None else workers
    start = time.perf_counter()
    decode_all(jobs, writers, workers=workers, progress=progress, label=f"decode {NAME}")
    seconds = time.perf_counter() - start
    return {
        "class_ids": layout.wnids,
        "class_names": layout.names,
        "holdout": {
            "from": "official train/",
            "fraction": val_fraction,
            "seed": seed,
            "count": len(held),
            "index_file": "val_source_index.npy",
        },
        "test_source": "official val/ (labelled), in val_annotations.txt order",
        "build": {
            "images": len(jobs),
            "seconds": round(seconds, 3),
            "workers": workers,
            "images_per_second": round(len(jobs) / max(seconds, 1e-9), 1),
        },
    }


def load(root: Path | None = None) -> Dataset:
    """The cached Tiny ImageNet: train/val memory-mapped, test opened when asked for."""
    return open_dataset(root, NAME, hflip=HFLIP, crop_padding=CROP_PADDING)
