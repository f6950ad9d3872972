"""The decoded-image cache: one directory per dataset, memory-mappable ``.npy`` arrays
plus ``manifest.json``.

Layout under the data root (default ``$DLOPS_DATA``, else ``$DLOPS_HOME/data``)::

    <root>/<dataset>/cache/manifest.json          written last: no manifest, no cache
    <root>/<dataset>/cache/<split>_images.npy     uint8 (N, 3, H, W)
    <root>/<dataset>/cache/<split>_labels.npy     int64 (N,)
    <root>/<dataset>/cache/val_source_index.npy   positions of the hold-out in the official train order

A cache is built in a scratch directory next to it and swapped in by renames only once
complete (:func:`replace_dirs`: atomic where the system can, else rolled back on an error,
with Ctrl-C held), so a failed or interrupted build leaves the previous cache as it was.
Readers open the arrays with ``np.load(mmap_mode="r")``: several processes share one
copy through the page cache.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import uuid
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

import numpy as np

from dlops.data.base import Dataset, Split
from dlops.errors import DatasetNotAvailable
from dlops.io import exchange_paths, process_gone, process_stat, signals_held
from dlops.paths import data_root

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def resolve_root(root: Path | str | None) -> Path:
    return Path(root).expanduser().absolute() if root is not None else data_root()


def dataset_dir(root: Path | str | None, name: str) -> Path:
    return resolve_root(root) / name


def cache_dir(root: Path | str | None, name: str) -> Path:
    return dataset_dir(root, name) / "cache"


def images_file(split: str) -> str:
    return f"{split}_images.npy"


def labels_file(split: str) -> str:
    return f"{split}_labels.npy"


def how_to_get(name: str) -> str:
    return f"get it with `dlops data fetch {name}` (or `--source FILE_OR_URL`); `--dataset digits` works now"


def read_manifest(root: Path | str | None, name: str) -> dict[str, Any]:
    """The manifest of a complete cache of the current format; else :class:`DatasetNotAvailable`."""
    directory = cache_dir(root, name)
    path = directory / MANIFEST
    if not path.is_file() and not (restore_previous(directory) and path.is_file()):
        raise DatasetNotAvailable(f"{name} is not prepared under {resolve_root(root)}: {how_to_get(name)}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetNotAvailable(
            f"{name} cache manifest {path} is unreadable ({exc}): rebuild it with `dlops data prepare {name} --force`"
        ) from None
    if not isinstance(manifest, dict):
        raise DatasetNotAvailable(_damaged(name, directory, f"{MANIFEST} is not a JSON object"))
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise DatasetNotAvailable(
            f"{name} cache at {directory} has format version {version}, this dlops reads {FORMAT_VERSION}: "
            f"rebuild it with `dlops data prepare {name} --force`"
        )
    problem = _manifest_problem(manifest)
    if problem:
        raise DatasetNotAvailable(_damaged(name, directory, f"{MANIFEST} {problem}"))
    for split, count in manifest["splits"].items():
        expected: dict[str, tuple[np.dtype, tuple[int, ...]]] = {
            images_file(split): (np.dtype(np.uint8), (count, *manifest["image_shape"])),
            labels_file(split): (np.dtype(np.int64), (int(count),)),
        }
        for file, (dtype, shape) in expected.items():
            problem = _array_file_problem(directory / file, dtype, shape)
            if problem:
                raise DatasetNotAvailable(_damaged(name, directory, f"{file} {problem}"))
    return manifest


def _damaged(name: str, directory: Path, problem: str) -> str:
    return f"{name} cache at {directory}: {problem}: rebuild it with `dlops data prepare {name} --force`"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _manifest_problem(manifest: dict[str, Any]) -> str | None:
    """What is missing or wrong in a manifest's fields that dlops reads, or None."""
    splits, shape = manifest.get("splits"), manifest.get("image_shape")
    ids, names = manifest.get("class_ids"), manifest.get("class_names")
    if not isinstance(splits, dict) or not {"train", "val", "test"} <= set(splits):
        return "has no train, val and test counts in 'splits'"
    if not all(_is_int(n) and n >= 0 for n in splits.values()):
        return f"has split counts that are not whole numbers: {splits}"
    if not isinstance(shape, list) or len(shape) != 3 or not all(_is_int(n) and n > 0 for n in shape):
        return f"has image_shape {shape!r}, not [channels, height, width]"
    for key, value in (("class_ids", ids), ("class_names", names)):
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            return f"has no list of {key}"
    assert isinstance(ids, list) and isinstance(names, list)
    if len(names) != len(ids) or manifest.get("classes") != len(ids):
        return f"has {len(ids)} class_ids, {len(names)} class_names and classes = {manifest.get('classes')!r}"
    return None


def _array_file_problem(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> str | None:
    """What is wrong with the ``.npy`` file ``path`` for an array of ``dtype`` and ``shape``
    (missing, unreadable header, other dtype or shape, fewer or more bytes), or None.
    Reads the header only: cheap enough for every load."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            header = read_header(f)  # (shape, fortran_order, dtype)
            offset = f.tell()
    except FileNotFoundError:
        return "is missing"
    except (OSError, ValueError) as exc:
        return f"is unreadable ({exc})"
    found_shape, _, found_dtype = header
    if np.dtype(found_dtype) != dtype or tuple(found_shape) != tuple(shape):
        return f"holds {found_dtype} {tuple(found_shape)}, the manifest says {dtype} {tuple(shape)}"
    want = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size != want:
        return f"has {size:,} bytes, {want:,} expected (truncated or damaged)"
    return None


def is_prepared(root: Path | str | None, name: str) -> bool:
    try:
        read_manifest(root, name)
        return True
    except DatasetNotAvailable:
        return False


def open_split(root: Path | str | None, name: str, split: str, num_classes: int | None = None) -> Split:
    """One cached split: images memory-mapped read-only, labels in memory (checked to be
    class indices below ``num_classes`` when given)."""
    directory = cache_dir(root, name)
    images = np.load(directory / images_file(split), mmap_mode="r")
    labels = np.load(directory / labels_file(split))
    if num_classes is not None and len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetNotAvailable(
            _damaged(
                name,
                directory,
                f"{labels_file(split)} holds labels {labels.min()}..{labels.max()}, "
                f"not class indices 0..{num_classes - 1}",
            )
        )
    return Split(images, labels)


def open_dataset(root: Path | str | None, name: str, *, hflip: bool, crop_padding: int) -> Dataset:
    """A :class:`Dataset` over the cache of ``name``; the test split is opened when asked for."""
    manifest = read_manifest(root, name)
    root_path = resolve_root(root)
    classes = len(manifest["class_ids"])
    holdout, source = (v if isinstance(v := manifest.get(k), dict) else {} for k in ("holdout", "source"))
    provenance = {
        "splits": {split: count for split, count in manifest["splits"].items() if split != "test"},
        "holdout_fraction": holdout.get("fraction"),
        "holdout_seed": holdout.get("seed"),
        "source_md5": source.get("md5"),
    }

    def load_test() -> Split:
        return open_split(root_path, name, "test", classes)

    return Dataset(
        name=name,
        class_ids=list(manifest["class_ids"]),
        class_names=list(manifest["class_names"]),
        train=open_split(root_path, name, "train", classes),
        val=open_split(root_path, name, "val", classes),
        load_test=load_test,
        verify_test=load_test,  # opening it checks its labels and sizes
        hflip=hflip,
        crop_padding=crop_padding,
        provenance=provenance,
    )


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _previous_name(final: Path) -> str:
    return f".{final.name}-old-"


def _put(scratch: Path, final: Path) -> Path | None:
    """Put ``scratch`` where ``final`` is; where the previous ``final`` is now (None: there
    was none). On an error nothing has moved."""
    if not final.exists():
        os.rename(scratch, final)
        return None
    if exchange_paths(scratch, final):
        return scratch
    old = final.with_name(_previous_name(final) + uuid.uuid4().hex[:8])
    os.rename(final, old)
    try:
        os.rename(scratch, final)
    except BaseException:
        os.rename(old, final)
        raise
    return old


def _take_back(scratch: Path, final: Path, old: Path | None) -> None:
    """Undo :func:`_put`: the new folder goes back to ``scratch``, the previous one to ``final``."""
    if old == scratch:
        exchange_paths(scratch, final)
        return
    os.rename(final, scratch)
    if old is not None:
        os.rename(old, final)


def replace_dirs(pairs: Sequence[tuple[Path, Path]]) -> None:
    """Put each ``scratch`` folder where its ``final`` one is, all or none: an exception
    (or Ctrl-C, held until the swap is done) puts back every folder already moved. The
    previous folders are removed after."""
    done: list[tuple[Path, Path, Path | None]] = []
    pending: list[int] = []
    try:
        try:
            with signals_held() as pending:
                try:
                    for scratch, final in pairs:
                        done.append((scratch, final, _put(scratch, final)))
                except BaseException:
                    for scratch, final, old in reversed(done):
                        _take_back(scratch, final, old)
                    done.clear()
                    raise
        finally:
            if pending:  # a held Ctrl-C arrives as it would have, once the swap is done or undone
                signal.raise_signal(pending[0])
    finally:  # the previous folders go once the swap is done
        for _, _, old in done:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)


def restore_previous(final: Path) -> bool:
    """Where ``final`` is missing but a swap interrupted by a crash left the previous one
    in a hidden ``.NAME-old-*`` folder beside it, put that one back; True if it did."""
    if final.exists():
        return False
    leftovers = sorted(final.parent.glob(_previous_name(final) + "*"), key=lambda p: p.stat().st_mtime)
    for old in reversed(leftovers):
        with suppress(OSError):  # another process may be restoring it too
            os.rename(old, final)
            return True
    return False


def settle_previous(final: Path) -> None:
    """Before a swap: restore a previous ``final`` left aside by an interrupted swap
    (:func:`restore_previous`), and remove such leftovers where ``final`` is whole."""
    restore_previous(final)
    for old in final.parent.glob(_previous_name(final) + "*"):
        shutil.rmtree(old, ignore_errors=True)


# Scratch folders (``.cache-tmp-*``, ``.extract-tmp-*``, ``.download-tmp-*``) carry their
# maker in their name, ``<prefix><random>-<pid>-<start>-<host>``, so a later fetch or prepare
# can tell one left by a process that is gone (killed hard: SIGKILL, a power cut) from one
# that another process is still filling, and remove only the first.
CACHE_SCRATCH, EXTRACT_SCRATCH, DOWNLOAD_SCRATCH = ".cache-tmp-", ".extract-tmp-", ".download-tmp-"


def scratch_path(parent: Path, prefix: str) -> Path:
    """A new scratch name under ``parent`` (not created) that names this process."""
    pid, stat = os.getpid(), process_stat(os.getpid())
    started = stat[1] if stat else "0"
    return parent / f"{prefix}{uuid.uuid4().hex[:8]}-{pid}-{started}-{socket.gethostname()}"


def _maker_gone(name: str, prefix: str) -> bool:
    """Whether the process named in the scratch name ``name`` is provably gone (False for
    one of another host, a name without a maker, or a process that runs)."""
    parts = name[len(prefix) :].split("-", 3)
    if len(parts) != 4 or not parts[1].isdigit() or parts[3] != socket.gethostname():
        return False
    pid, started = int(parts[1]), parts[2]
    return process_gone(pid, None if started == "0" else started)


def remove_stale_scratch(parent: Path, *prefixes: str) -> None:
    """Remove the scratch folders ``parent/<prefix>*`` whose maker is gone."""
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for entry in entries:
        prefix = next((p for p in prefixes if entry.name.startswith(p)), None)
        if prefix is not None and _maker_gone(entry.name, prefix):
            shutil.rmtree(entry, ignore_errors=True)


class ImageWriter:
    """Writes images into an existing ``.npy`` file at their index with ``pwrite``: no
    memory map, so writing a 2.8 GB split does not fill this process's resident memory."""

    def __init__(self, path: str, offset: int, image_bytes: int):
        self.path, self.offset, self.image_bytes = path, offset, image_bytes
        self._fd: int | None = None

    def write(self, index: int, images: np.ndarray) -> None:
        """Write ``images`` (uint8, one image or a batch) starting at image ``index``."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY)
        data = np.ascontiguousarray(images, dtype=np.uint8).data.cast("B")
        position = self.offset + index * self.image_bytes
        while data:
            written = os.pwrite(self._fd, data, position)
            data, position = data[written:], position + written

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ImageWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:  # sent to pool workers without its descriptor
        return {**self.__dict__, "_fd": None}


class CacheBuilder:
    """Writes a new cache for ``name`` in a scratch directory; :meth:`commit` swaps it in.

    Use as a context manager: leaving the block by an exception (or without a commit)
    deletes the scratch directory and leaves any existing cache untouched.
    """

    def __init__(self, root: Path | str | None, name: str):
        self.name = name
        self.final = cache_dir(root, name)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        settle_previous(self.final)
        remove_stale_scratch(self.final.parent, CACHE_SCRATCH)
        self.dir = scratch_path(self.final.parent, CACHE_SCRATCH)
        self.dir.mkdir()
        self.splits: dict[str, int] = {}
        self.image_shape: tuple[int, ...] | None = None
        self.committed = False

    def __enter__(self) -> CacheBuilder:
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.committed:
            shutil.rmtree(self.dir, ignore_errors=True)

    def images_path(self, split: str) -> Path:
        return self.dir / images_file(split)

    def new_images(self, split: str, count: int, shape: tuple[int, int, int]) -> ImageWriter:
        """Create the split's uint8 ``(count, *shape)`` ``.npy`` file (zero-filled) and return
        a writer for it; :class:`ImageWriter` can be reopened by path in another process."""
        if self.image_shape is None:
            self.image_shape = tuple(shape)
        elif tuple(shape) != self.image_shape:
            raise ValueError(f"split {split} has shape {shape}, others {self.image_shape}")
        self.splits[split] = count
        array = np.lib.format.open_memmap(self.images_path(split), mode="w+", dtype=np.uint8, shape=(count, *shape))
        offset = int(array.offset)
        del array
        return ImageWriter(str(self.images_path(split)), offset, int(np.prod(shape)))

    def save_labels(self, split: str, labels: np.ndarray) -> None:
        np.save(self.dir / labels_file(split), np.asarray(labels, dtype=np.int64))

    def save_array(self, filename: str, array: np.ndarray) -> None:
        np.save(self.dir / filename, array)

    def commit(self, manifest: dict[str, Any], also: Sequence[tuple[Path, Path]] = ()) -> dict[str, Any]:
        """Write ``manifest.json`` (with format version, splits, image shape) and swap in,
        together with the folders ``also`` (scratch, final), all or none."""
        for split, count in self.splits.items():
            labels = np.load(self.dir / labels_file(split), mmap_mode="r")
            if len(labels) != count:
                raise ValueError(f"split {split}: {count} images but {len(labels)} labels")
        full = {
            "format_version": FORMAT_VERSION,
            "dataset": self.name,
            "image_shape": list(self.image_shape or ()),
            "splits": dict(self.splits),
            **manifest,
        }
        full["cache_bytes"] = directory_bytes(self.dir)
        tmp = self.dir / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(full, indent=2) + "\n")
        os.replace(tmp, self.dir / MANIFEST)
        replace_dirs([(self.dir, self.final), *also])
        self.committed = True
        return full
