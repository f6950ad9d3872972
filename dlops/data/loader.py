"""The batch loader every trial uses: batches sliced from uint8 arrays, augmented on
uint8 (a quarter of the bytes of float) and normalised on the device. No JPEG decoding
or PIL work happens in a training loop.

* On a GPU, a split that fits is uploaded once; each batch is gathered, cropped,
  flipped and normalised there with whole-batch tensor ops.
* On the CPU, each image's crop (and mirror) is one slice copy straight from the
  memory-mapped cache (:func:`crop_flip`), about 5x faster here than gathering the
  batch and indexing a padded copy; chunks of images are normalised in place while
  they are still in the CPU cache.
  Both paths draw the same random numbers and give identical batches.

Two ways to draw a training epoch:

* shuffled: a seeded permutation cut into batches;
* P x K (:class:`PKSampler`): each batch holds ``P`` classes with ``K`` images each,
  as batch-hard triplet mining needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from dlops.data.base import Split
from dlops.text import plural

CPU_CHUNK = 32  # images cropped and normalised together on the CPU (about 1.9 MB of float)


class PKSampler:
    """Batches of ``P`` distinct classes x ``K`` images of each.

    Classes are drawn without replacement within a batch; images without replacement
    within a class when it has at least ``K`` (with replacement otherwise). An epoch
    has ``len(labels) // (P * K)`` batches, at most one batch fewer than a shuffled epoch, but each
    batch is drawn on its own, so an epoch is not one pass over the data: it sees about
    63% (1 - 1/e) of the images at least once, some several times. Every index of a
    batch is grouped by class: ``K`` of class ``c_1``, then ``K`` of ``c_2``, ...
    """

    def __init__(self, labels: np.ndarray, p: int, k: int, seed: int = 0):
        labels = np.asarray(labels)
        self.classes = np.unique(labels)
        if p > len(self.classes):
            raise ValueError(f"P={p} classes per batch, but only {plural(len(self.classes), 'class')}")
        if p < 1 or k < 1:
            raise ValueError("P and K must be at least 1")
        self.p, self.k = p, k
        self.by_class = [np.flatnonzero(labels == c) for c in self.classes]
        self.num_batches = max(1, len(labels) // (p * k))
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[np.ndarray]:
        for _ in range(self.num_batches):
            chosen = self.rng.choice(len(self.classes), size=self.p, replace=False)
            parts = []
            for c in chosen:
                pool = self.by_class[c]
                parts.append(self.rng.choice(pool, size=self.k, replace=len(pool) < self.k))
            yield np.concatenate(parts)

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


def pk_shape(batch_size: int, num_classes: int, k: int) -> tuple[int, int]:
    """``(P, K)`` for a P x K batch near ``batch_size``: ``P = batch_size // k`` capped at
    the number of classes; with fewer classes, ``K`` grows to keep the batch size."""
    p = max(2, min(num_classes, batch_size // k))
    return p, max(k, batch_size // p)


def crop_flip(
    images: np.ndarray,
    idx: np.ndarray,
    dy: np.ndarray | None,
    dx: np.ndarray | None,
    flip: np.ndarray | None,
    padding: int,
) -> np.ndarray:
    """``images[idx]`` (uint8, N x C x H x W), each cropped from its black-padded self and
    optionally mirrored: image ``i`` of the batch is the ``H x W`` window at offset
    ``(dy[i], dx[i])`` of ``images[idx[i]]`` padded by ``padding`` pixels, flipped
    left-right where ``flip[i]`` (``dy``/``dx`` ``None``: no crop; ``flip`` ``None``: no
    flip). One slice copy per image, read straight from ``images`` (a memmap is fine);
    the same result as padding, gathering and flipping the whole batch."""
    b = len(idx)
    c, h, w = images.shape[1:]
    out = np.zeros((b, c, h, w), dtype=images.dtype)
    for i in range(b):
        oy = int(dy[i]) - padding if dy is not None else 0
        ox = int(dx[i]) - padding if dx is not None else 0
        r0, r1 = max(0, -oy), min(h, h - oy)  # the output rows and columns the image covers
        c0, c1 = max(0, -ox), min(w, w - ox)
        if r0 >= r1 or c0 >= c1:
            continue  # the window lies wholly in the padding: black
        window = images[idx[i], :, r0 + oy : r1 + oy, c0 + ox : c1 + ox]
        if flip is not None and flip[i]:
            out[i, :, r0:r1, w - c1 : w - c0] = window[..., ::-1]
        else:
            out[i, :, r0:r1, c0:c1] = window
    return out


class BatchLoader:
    """Yields ``(images, labels)`` on ``device``: float, normalised, optionally augmented.

    ``augment`` applies a random crop from a black-padded image (``crop_padding`` pixels
    each side) and, when ``hflip``, a random horizontal flip; both per image, computed
    for the whole batch at once. Random numbers come from a CPU generator seeded by
    ``seed``, so a run is reproducible whatever the device.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        mean: np.ndarray,
        std: np.ndarray,
        device: torch.device | str = "cpu",
        shuffle: bool = False,
        augment: bool = False,
        hflip: bool = True,
        crop_padding: int = 4,
        seed: int = 0,
        pk: tuple[int, int] | None = None,
        drop_last: bool = False,
        channels_last: bool = False,
        device_cache_bytes: int = 4 << 30,
    ):
        self.split = split
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.shuffle, self.augment, self.hflip = shuffle, augment, hflip
        self.crop_padding = crop_padding
        self.drop_last = drop_last
        self.channels_last = channels_last
        self.generator = torch.Generator().manual_seed(seed)
        self.sampler = PKSampler(split.labels, pk[0], pk[1], seed) if pk else None
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1) * 255.0
        self.std = torch.as_tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1) * 255.0
        self._pin = self.device.type == "cuda"
        # On a GPU a split that fits is uploaded once as uint8 and batches are gathered
        # there: no host work per step at all.
        self._device_images: torch.Tensor | None = None
        self._device_labels: torch.Tensor | None = None
        if self.device.type == "cuda" and split.images.nbytes <= device_cache_bytes:
            self._device_images = torch.from_numpy(np.ascontiguousarray(split.images)).to(self.device)
            self._device_labels = torch.from_numpy(np.asarray(split.labels, dtype=np.int64)).to(self.device)

    def __len__(self) -> int:
        if self.sampler is not None:
            return len(self.sampler)
        n = len(self.split)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batch_indices(self) -> Iterator[np.ndarray]:
        if self.sampler is not None:
            yield from self.sampler
            return
        n = len(self.split)
        order = torch.randperm(n, generator=self.generator).numpy() if self.shuffle else np.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            if self.drop_last and len(idx) < self.batch_size:
                break
            yield idx

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images, labels = self.split.images, self.split.labels
        for idx in self.batch_indices():
            # sorted reads are sequential in a memmap; order inside a batch is irrelevant.
            # Both paths sort, so that image i of a batch gets the same crop on every device.
            idx = np.sort(idx) if self.sampler is None else idx
            if self._device_images is not None and self._device_labels is not None:
                index = torch.from_numpy(idx).to(self.device, non_blocking=True)
                x = self._device_images.index_select(0, index)
                y = self._device_labels.index_select(0, index)
                yield self._finish(x, y)
                continue
            y = torch.from_numpy(np.asarray(labels[idx], dtype=np.int64))
            if self.augment and self.device.type == "cpu":
                yield self._cpu_batch(images, idx), y
                continue
            x = torch.from_numpy(np.ascontiguousarray(images[idx]))
            if self._pin:
                x, y = x.pin_memory(), y.pin_memory()
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            yield self._finish(x, y)

    def _finish(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.augment:  # on uint8: a quarter of the bytes of float
            x = self._augment(x)
        return self._normalise(x), y

    def _cpu_batch(self, images: np.ndarray, idx: np.ndarray) -> torch.Tensor:
        """Crop, flip and normalise on the CPU, :data:`CPU_CHUNK` images at a time so that
        each chunk's uint8 and float copies stay in the CPU cache between the steps."""
        if isinstance(images, np.memmap):  # the memmap subclass makes every slice slow
            images = images.view(np.ndarray)
        dy, dx, flip = self._draw(len(idx))
        out = torch.empty((len(idx), *images.shape[1:]), dtype=torch.float32)
        for a in range(0, len(idx), CPU_CHUNK):
            b = a + CPU_CHUNK
            chunk = crop_flip(
                images,
                idx[a:b],
                None if dy is None else dy[a:b],
                None if dx is None else dx[a:b],
                None if flip is None else flip[a:b],
                self.crop_padding,
            )
            part = out[a:b]
            part.copy_(torch.from_numpy(chunk))
            part.sub_(self.mean).div_(self.std)
        if self.channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()  # a new tensor: the in-place steps below never touch the cache
        x.sub_(self.mean).div_(self.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _draw(self, b: int) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """This batch's crop offsets ``dy``, ``dx`` (in ``0..2p``; ``None`` without
        padding) and mirror flags (``None`` without flips), from the loader's generator."""
        dy = dx = flip = None
        if self.crop_padding > 0:
            dy = torch.randint(0, 2 * self.crop_padding + 1, (b,), generator=self.generator).numpy()
            dx = torch.randint(0, 2 * self.crop_padding + 1, (b,), generator=self.generator).numpy()
        if self.hflip:
            flip = (torch.rand(b, generator=self.generator) < 0.5).numpy()
        return dy, dx, flip

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        """Crop and flip a uint8 batch with whole-batch tensor ops (the device path)."""
        b, _, h, w = x.shape
        p = self.crop_padding
        dy, dx, flip = self._draw(b)
        if dy is not None:
            # black padding, as torchvision's RandomCrop(padding=p)
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            ty, tx = torch.from_numpy(dy).to(x.device), torch.from_numpy(dx).to(x.device)
            rows = (ty[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
            cols = (tx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
            batch = torch.arange(b, device=x.device)[:, None, None]
            x = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
        if flip is not None:
            x = torch.where(torch.from_numpy(flip).to(x.device)[:, None, None, None], x.flip(3), x)
        return x.contiguous()

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"generator": self.generator.get_state()}
        if self.sampler is not None:
            state["sampler"] = self.sampler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        if self.sampler is not None and "sampler" in state:
            self.sampler.load_state_dict(state["sampler"])
