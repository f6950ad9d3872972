"""The batch loader every trial uses: batches sliced from uint8 arrays, moved to the
device as uint8 (4x fewer bytes than float), then normalised and augmented as whole
batches with tensor ops. No per-image Python or PIL work happens in a training loop.

Two ways to draw a training epoch:

* shuffled: a seeded permutation cut into batches;
* P x K (:class:`PKSampler`): each batch holds ``P`` classes with ``K`` images each,
  as batch-hard triplet mining needs.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from dlops.data import Split


class PKSampler:
    """Batches of ``P`` distinct classes x ``K`` images of each.

    Classes are drawn without replacement within a batch; images without replacement
    within a class when it has at least ``K`` (with replacement otherwise). An epoch
    has ``len(labels) // (P * K)`` batches, so it sees about as many images as a
    shuffled epoch. Every index of a batch is grouped by class: ``K`` of class
    ``c_1``, then ``K`` of ``c_2``, ...
    """

    def __init__(self, labels: np.ndarray, p: int, k: int, seed: int = 0):
        labels = np.asarray(labels)
        self.classes = np.unique(labels)
        if p > len(self.classes):
            raise ValueError(f"P={p} classes per batch, but only {len(self.classes)} classes")
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
            if self._device_images is not None:
                index = torch.from_numpy(idx).to(self.device, non_blocking=True)
                x = self._device_images.index_select(0, index)
                y = self._device_labels.index_select(0, index)
                yield self._finish(x, y)
                continue
            # sorted reads are sequential in a memmap; order inside a batch is irrelevant
            idx = np.sort(idx) if self.sampler is None else idx
            x = torch.from_numpy(np.ascontiguousarray(images[idx]))
            y = torch.from_numpy(np.asarray(labels[idx], dtype=np.int64))
            if self._pin:
                x, y = x.pin_memory(), y.pin_memory()
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            yield self._finish(x, y)

    def _finish(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.augment:  # on uint8: a quarter of the bytes of float
            x = self._augment(x)
        x = (x.float() - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        p = self.crop_padding
        if p > 0:
            # black padding, as torchvision's RandomCrop(padding=p)
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (b,), generator=self.generator).to(x.device)
            dx = torch.randint(0, 2 * p + 1, (b,), generator=self.generator).to(x.device)
            rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
            cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
            batch = torch.arange(b, device=x.device)[:, None, None]
            x = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
        if self.hflip:
            flip = (torch.rand(b, generator=self.generator) < 0.5).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x.contiguous()

    def state_dict(self) -> dict:
        state = {"generator": self.generator.get_state()}
        if self.sampler is not None:
            state["sampler"] = self.sampler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        if self.sampler is not None and "sampler" in state:
            self.sampler.load_state_dict(state["sampler"])
