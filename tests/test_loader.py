"""The P x K sampler and the batch loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dlops.data import Split, get_dataset, take_subset
from dlops.data import loader as loader_module
from dlops.data.loader import BatchLoader, PKSampler, pk_shape


def test_pk_sampler_gives_p_classes_with_k_images_each_in_every_batch() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 12, size=600)
    labels[:3] = 11  # a class with few images still works (sampled with replacement)
    labels[labels == 11] = 7
    labels[:2] = 11
    sampler = PKSampler(labels, p=6, k=4, seed=1)
    batches = list(sampler)
    assert len(batches) == 600 // 24
    for batch in batches:
        assert len(batch) == 24
        batch_labels = labels[batch]
        classes, counts = np.unique(batch_labels, return_counts=True)
        assert len(classes) == 6 and (counts == 4).all()
        # grouped by class: K of one class, then K of the next
        assert all(len(set(batch_labels[i : i + 4])) == 1 for i in range(0, 24, 4))
        for c in classes:  # no repeated image unless the class is too small
            idx = batch[batch_labels == c]
            if (labels == c).sum() >= 4:
                assert len(set(idx)) == 4


def test_pk_sampler_is_reproducible_and_resumable() -> None:
    labels = np.repeat(np.arange(10), 20)
    a = PKSampler(labels, 5, 4, seed=3)
    first = next(iter(a))
    state = a.state_dict()
    rest = [b.tolist() for b in a]
    b = PKSampler(labels, 5, 4, seed=3)
    assert next(iter(b)).tolist() == first.tolist()
    c = PKSampler(labels, 5, 4, seed=99)
    c.load_state_dict(state)
    assert [x.tolist() for x in c] == rest


def test_pk_shape_keeps_the_batch_size_with_few_classes() -> None:
    assert pk_shape(128, 200, 4) == (32, 4)
    assert pk_shape(128, 10, 4) == (10, 12)


def test_pk_sampler_rejects_more_classes_than_exist() -> None:
    with pytest.raises(ValueError):
        PKSampler(np.array([0, 0, 1, 1]), p=3, k=2)


def _split(n: int = 10, h: int = 6) -> Split:
    images = np.arange(n * 3 * h * h, dtype=np.int64).reshape(n, 3, h, h) % 251
    return Split(images.astype(np.uint8), np.arange(n, dtype=np.int64) % 3)


def test_loader_normalises_and_keeps_order_without_shuffle() -> None:
    split = _split()
    mean, std = np.array([0.5, 0.5, 0.5]), np.array([0.25, 0.25, 0.25])
    batches = list(BatchLoader(split, 4, mean, std))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    x = torch.cat([b[0] for b in batches])
    expected = (torch.from_numpy(split.images).float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(x, expected)
    assert torch.cat([b[1] for b in batches]).tolist() == split.labels.tolist()


def test_augmentation_is_a_shifted_crop_or_its_mirror() -> None:
    split = _split(n=32, h=8)
    loader = BatchLoader(split, 32, np.zeros(3), np.ones(3), augment=True, crop_padding=2, seed=0)
    x, _ = next(iter(loader))  # no shuffle: x[i] comes from image i
    padded = torch.nn.functional.pad(torch.from_numpy(split.images).float() / 255, (2, 2, 2, 2))
    seen_shift, seen_flip = set(), set()
    for i in range(len(split)):
        found = [
            (dy, dx, flip)
            for dy in range(5)
            for dx in range(5)
            for flip in (False, True)
            if torch.equal(
                x[i], padded[i, :, dy : dy + 8, dx : dx + 8].flip(2) if flip else padded[i, :, dy : dy + 8, dx : dx + 8]
            )
        ]
        assert found, f"image {i} is not a padded crop (or its mirror) of input {i}"
        seen_shift.add(found[0][:2])
        seen_flip.add(found[0][2])
    assert len(seen_shift) > 5 and seen_flip == {False, True}  # really random, per image


@pytest.mark.parametrize(
    "padding,hflip,shape",
    [(2, True, (3, 8, 8)), (4, True, (3, 5, 7)), (0, True, (1, 6, 6)), (3, False, (2, 6, 9)), (12, True, (3, 10, 10))],
)
def test_cpu_slice_crop_equals_the_whole_batch_tensor_crop(
    padding: int, hflip: bool, shape: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CPU path (one slice copy per image, in chunks) and the device path (pad, gather,
    flip the whole batch) give identical batches from the same random numbers, padding
    larger than the image included."""
    monkeypatch.setattr(loader_module, "CPU_CHUNK", 5)  # batches of 16: chunks of 5, 5, 5, 1
    rng = np.random.default_rng(1)
    split = Split(rng.integers(0, 256, size=(40, *shape), dtype=np.uint8), np.arange(40, dtype=np.int64) % 4)
    mean, std = np.full(shape[0], 0.4), np.full(shape[0], 0.2)
    kw = dict(shuffle=True, augment=True, hflip=hflip, crop_padding=padding, seed=3)
    fast = BatchLoader(split, 16, mean, std, **kw)
    reference = BatchLoader(split, 16, mean, std, **kw)  # driven by hand through the tensor path
    batches = 0
    for (xa, ya), idx in zip(fast, reference.batch_indices()):
        idx = np.sort(idx)
        x_ref, y_ref = reference._finish(torch.from_numpy(split.images[idx]), torch.from_numpy(split.labels[idx]))
        assert torch.equal(xa, x_ref) and torch.equal(ya, y_ref)
        batches += 1
    assert batches == 3


def test_digits_splits_are_stratified_and_disjoint() -> None:
    ds = get_dataset("digits")
    assert ds.image_shape == (1, 8, 8) and ds.num_classes == 10
    test = ds.test()
    sizes = [len(ds.train), len(ds.val), len(test)]
    assert sum(sizes) == 1797
    assert set(np.unique(ds.val.labels)) == set(range(10))
    # no image shared between splits (digits has a few exact duplicates; compare counts)
    assert len(ds.val) == pytest.approx(0.1 * (1797 - len(test)), abs=10)
    sub = take_subset(ds, num_classes=4, per_class=5)
    assert sub.num_classes == 4 and len(sub.train) == 20
    assert np.bincount(sub.train.labels).tolist() == [5, 5, 5, 5]
    assert sub.val.labels.max() < 4 and sub.test().labels.max() < 4


@pytest.mark.parametrize("pk", [None, (4, 4)], ids=["shuffled", "pk"])
def test_the_device_resident_path_gives_the_cpu_paths_batches(pk: tuple[int, int] | None) -> None:
    """On a GPU a split that fits is kept on the device and each batch is gathered there
    (``_device_images``). Driven here with CPU tensors in its place: for the same seed it
    gives the slice path's batches, image for image (same order, same crop and flip)."""
    rng = np.random.default_rng(2)
    split = Split(rng.integers(0, 256, size=(60, 3, 12, 12), dtype=np.uint8), np.arange(60, dtype=np.int64) % 6)
    mean, std = np.full(3, 0.4), np.full(3, 0.2)
    kw = dict(shuffle=True, augment=True, hflip=True, crop_padding=3, seed=7, pk=pk)
    cpu = BatchLoader(split, 16, mean, std, **kw)
    resident = BatchLoader(split, 16, mean, std, **kw)
    resident._device_images = torch.from_numpy(split.images.copy())
    resident._device_labels = torch.from_numpy(split.labels.copy())
    batches = 0
    for _ in range(2):
        for (xa, ya), (xb, yb) in zip(cpu, resident, strict=True):
            assert torch.equal(ya, yb) and torch.equal(xa, xb)
            batches += 1
    assert batches == 2 * len(cpu) >= 6
