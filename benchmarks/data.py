"""Images/s of the study loader against a JPEG-per-image pipeline, on the same images.

Both read the training images of one fetched Tiny ImageNet tree and produce
normalised, augmented (random crop with padding 8, horizontal flip) float batches:

* the study loader (``dlops.data.loader.BatchLoader``): uint8 batches sliced from the
  memory-mapped cache, normalised and augmented as whole tensors on the device;
* torchvision ``ImageFolder`` + PIL transforms + ``DataLoader`` with 2 worker
  processes, over the extracted JPEGs (``ROOT/tiny-imagenet/raw/.../train``).

The data is fetched first if the root has no cache (``--source``, default: the
project's Tiny ImageNet sample). The last line is ``speedup_vs_imagefolder: <float>``.

    python benchmarks/data.py                                  # the sample, in a scratch root
    python benchmarks/data.py --root storage/data --device cuda
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from dlops.data import get_dataset
from dlops.data.cache import dataset_dir, is_prepared
from dlops.data.loader import BatchLoader
from dlops.data.manage import fetch_dataset
from dlops.data.tinyimagenet import CROP_PADDING, find_tree
from dlops.trainers.base import resolve_device

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny-imagenet-200-sample.zip"


def endless(loader) -> Iterator:
    while True:  # epoch after epoch, when a split is smaller than the images to time
        yield from loader


def time_loader(batches: Iterator, limit: int, device: torch.device) -> tuple[int, float]:
    """Images and seconds to draw at least ``limit`` images (after one warm-up batch)."""
    iterator = iter(batches)
    next(iterator)
    seen, start = 0, time.perf_counter()
    for x, _ in iterator:
        seen += len(x)
        if seen >= limit:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen, time.perf_counter() - start


def study_loader_rate(root: Path, batch_size: int, limit: int, device: torch.device) -> tuple[int, float]:
    ds = get_dataset("tiny-imagenet", root)
    mean, std = ds.channel_stats()
    loader = BatchLoader(
        ds.train,
        batch_size,
        mean,
        std,
        device,
        shuffle=True,
        augment=True,
        hflip=ds.hflip,
        crop_padding=ds.crop_padding,
        seed=0,
    )
    return time_loader(endless(loader), limit, device)


def tensor_path_rate(root: Path, batch_size: int, limit: int) -> tuple[int, float]:
    """The same loader driven through its whole-batch tensor path (gather the batch, pad,
    index, flip), which the GPU uses, on the CPU: what the per-image slice path replaced."""
    ds = get_dataset("tiny-imagenet", root)
    mean, std = ds.channel_stats()
    loader = BatchLoader(
        ds.train,
        batch_size,
        mean,
        std,
        "cpu",
        shuffle=True,
        augment=True,
        hflip=ds.hflip,
        crop_padding=ds.crop_padding,
        seed=0,
    )
    images, labels = ds.train.images, ds.train.labels

    def batches() -> Iterator:
        while True:
            for idx in loader.batch_indices():
                idx = np.sort(idx)
                yield loader._finish(torch.from_numpy(np.ascontiguousarray(images[idx])), torch.from_numpy(labels[idx]))

    return time_loader(batches(), limit, torch.device("cpu"))


def imagefolder_rate(root: Path, batch_size: int, limit: int, workers: int, device: torch.device) -> tuple[int, float]:
    from torchvision import datasets, transforms

    train_dir = find_tree(dataset_dir(root, "tiny-imagenet") / "raw") / "train"
    ds = get_dataset("tiny-imagenet", root)
    mean, std = (m.tolist() for m in ds.channel_stats())
    transform = transforms.Compose(
        [
            transforms.RandomCrop(64, padding=CROP_PADDING),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    folder = datasets.ImageFolder(str(train_dir), transform=transform)
    loader = torch.utils.data.DataLoader(
        folder,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )
    moved = ((x.to(device, non_blocking=True), y) for x, y in endless(loader))
    return time_loader(moved, limit, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, help="data root holding a Tiny ImageNet cache (default: a scratch dir)")
    parser.add_argument("--source", default=str(SAMPLE), help="archive to fetch when ROOT has no cache")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=4096, help="images timed per pipeline (after one warm-up batch)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes for ImageFolder")
    args = parser.parse_args()

    scratch = None
    root = args.root
    if root is None:
        scratch = tempfile.TemporaryDirectory(prefix="dlops-bench-data-")
        root = Path(scratch.name)
    if not is_prepared(root, "tiny-imagenet"):
        print(f"fetching {args.source} into {root}")
        fetch_dataset("tiny-imagenet", root, args.source, progress=False, say=print)
    device = resolve_device(args.device)
    print(
        f"device {device}, batch {args.batch_size}, {args.images} images per pipeline, torch threads "
        f"{torch.get_num_threads()}"
    )

    n, s = study_loader_rate(root, args.batch_size, args.images, device)
    study = n / s
    if device.type == "cpu":
        tn, ts = tensor_path_rate(root, args.batch_size, args.images)
        print(
            f"study loader's batches through its whole-batch tensor path (the GPU's): {tn / ts:,.0f} images/s "
            f"(the CPU slice path below is {study / (tn / ts):.2f}x)"
        )
    print(f"study loader (uint8 cache, batch augment): {study:,.0f} images/s ({n} images in {s:.2f}s)")
    n, s = imagefolder_rate(root, args.batch_size, args.images, args.workers, device)
    folder = n / s
    print(f"ImageFolder + PIL + DataLoader ({args.workers} workers): {folder:,.0f} images/s ({n} images in {s:.2f}s)")
    if scratch is not None:
        scratch.cleanup()
    print(f"speedup_vs_imagefolder: {study / folder:.2f}")


if __name__ == "__main__":
    main()
