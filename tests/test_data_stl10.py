"""STL-10: the binary layout (column-major images, labels 1..10) read back pixel for pixel."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from data_trees import one_error_line, tar_tree, write_stl10
from dlops.cli import app
from dlops.data import get_dataset, load_split, stl10
from dlops.data.cache import read_manifest
from dlops.data.splits import stratified_holdout
from dlops.errors import DatasetNotAvailable, DlopsError

runner = CliRunner()


def dlops(*args: str):
    return runner.invoke(app, list(args))


@pytest.fixture
def stl_tree(tmp_path: Path) -> tuple[Path, dict]:
    tree, truth = write_stl10(tmp_path / "src")
    # an unmistakable orientation mark on train image 0: its top row is white, its left column black
    images = truth["train"][0]
    images[0, :, 0, :] = 255
    images[0, :, 1:, 0] = 0
    (tree / "train_X.bin").write_bytes(np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tobytes())
    return tree, truth


@pytest.fixture
def good_root(tmp_path: Path, stl_tree) -> Path:
    root = tmp_path / "data"
    archive = tar_tree(stl_tree[0], tmp_path / "stl10_binary.tar.gz")
    result = dlops("data", "fetch", "stl10", "--root", str(root), "--source", str(archive))
    assert result.exit_code == 0, result.output
    assert "not the official" in result.stdout
    return root


def snapshot(root: Path) -> dict[str, str]:
    return {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in sorted((root / "stl10" / "cache").iterdir())}


def test_pixel_exact_round_trip_from_the_tar_gz(good_root: Path, stl_tree) -> None:
    _, truth = stl_tree
    ds = get_dataset("stl10", good_root)
    assert ds.class_names[:3] == ["airplane", "bird", "car"] and ds.num_classes == 10
    assert ds.image_shape == (3, 96, 96) and (ds.hflip, ds.crop_padding) == (True, stl10.CROP_PADDING)
    assert isinstance(ds.train.images, np.memmap)
    # train + val = the official train; val is 10% of each class (at least one), as recorded
    held = np.load(good_root / "stl10" / "cache" / "val_source_index.npy")
    keep = np.setdiff1d(np.arange(30), held)
    np.testing.assert_array_equal(ds.val.images, truth["train"][0][held])
    np.testing.assert_array_equal(ds.train.images, truth["train"][0][keep])
    np.testing.assert_array_equal(ds.train.labels, truth["train"][1][keep])
    assert sorted(set(ds.train.labels.tolist()) | set(ds.val.labels.tolist())) == list(range(10))
    assert np.bincount(ds.val.labels, minlength=10).tolist() == [1] * 10
    # orientation: the top row of train image 0 is white, its left column (below it) black
    first = ds.train.images[list(keep).index(0)] if 0 in keep else ds.val.images[list(held).index(0)]
    assert (first[:, 0, :] == 255).all() and (first[:, 1:, 0] == 0).all()

    images, labels, _, names = load_split("stl10", "test", good_root)
    np.testing.assert_array_equal(images, truth["test"][0])
    np.testing.assert_array_equal(labels, truth["test"][1])
    assert labels.min() == 0 and labels.max() == 9 and names[9] == "truck"

    unlabeled = stl10.load_unlabeled(good_root)
    np.testing.assert_array_equal(unlabeled.images, truth["unlabeled"][0])
    assert isinstance(unlabeled.images, np.memmap) and (unlabeled.labels == -1).all()
    manifest = read_manifest(good_root, "stl10")
    assert manifest["splits"] == {"train": 20, "val": 10, "test": 20, "unlabeled": 7}


def test_info_json_and_prepare_from_the_extracted_tree(good_root: Path) -> None:
    import json

    info = json.loads(dlops("data", "info", "stl10", "--root", str(good_root), "--json").stdout)
    assert info["classes"] == 10 and info["image_shape"] == [3, 96, 96]
    assert info["splits"]["unlabeled"] == 7
    result = dlops("data", "prepare", "stl10", "--root", str(good_root), "--force", "--seed", "1")
    assert result.exit_code == 0, result.output
    assert read_manifest(good_root, "stl10")["holdout"]["seed"] == 1


def test_missing_cache_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotAvailable, match=r"dlops data fetch stl10.*--dataset digits"):
        get_dataset("stl10", tmp_path)
    with pytest.raises(DatasetNotAvailable, match=r"dlops data fetch stl10"):
        stl10.load_unlabeled(tmp_path)


def _bad_size(tree: Path) -> None:
    with open(tree / "test_X.bin", "ab") as f:
        f.write(b"\0" * 100)


def _bad_label(tree: Path) -> None:
    labels = bytearray((tree / "train_y.bin").read_bytes())
    labels[3] = 11
    (tree / "train_y.bin").write_bytes(bytes(labels))


def _missing_labels(tree: Path) -> None:
    (tree / "test_y.bin").write_bytes((tree / "test_y.bin").read_bytes()[:-1])


BAD_TREES = {
    "X file size not a multiple of 27,648": (_bad_size, "test_X.bin has 553,060 bytes, not a multiple of 27,648"),
    "label outside 1..10": (_bad_label, "train_y.bin has labels outside 1..10"),
    "fewer labels than images": (_missing_labels, "test_y.bin holds 19 labels for 20 images"),
}


@pytest.mark.parametrize("case", list(BAD_TREES))
def test_bad_binary_files_are_one_error_line_and_the_good_cache_survives(
    case: str, good_root: Path, tmp_path: Path
) -> None:
    edit, message = BAD_TREES[case]
    tree, _ = write_stl10(tmp_path / "bad")
    edit(tree)
    before = snapshot(good_root)
    result = dlops(
        "data",
        "fetch",
        "stl10",
        "--root",
        str(good_root),
        "--force",
        "--source",
        str(tar_tree(tree, tmp_path / "bad.tar.gz")),
    )
    assert message in one_error_line(result)
    assert snapshot(good_root) == before
    assert [p.name for p in (good_root / "stl10").iterdir() if p.name.startswith(".")] == []
    assert len(get_dataset("stl10", good_root).train) == 20


@pytest.mark.parametrize("member", ["../../evil.txt", "link"])
def test_tar_members_that_would_escape_are_refused(member: str, good_root: Path, tmp_path: Path) -> None:
    tree, _ = write_stl10(tmp_path / "bad")
    archive = tmp_path / "bad.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tree, arcname=tree.name)
        if member == "link":  # a symbolic link to outside, then a file written through it
            info = tarfile.TarInfo("stl10_binary/escape")
            info.type, info.linkname = tarfile.SYMTYPE, str(tmp_path)
            tf.addfile(info)
        else:
            evil = tmp_path / "payload"
            evil.write_bytes(b"gotcha")
            tf.add(evil, arcname=member)
    before = snapshot(good_root)
    line = one_error_line(
        dlops("data", "fetch", "stl10", "--root", str(good_root), "--force", "--source", str(archive))
    )
    assert "unsafe archive bad.tar.gz" in line
    assert snapshot(good_root) == before
    assert list(tmp_path.rglob("evil.txt")) == []


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("one_per_class", "class 0 has only 1 training image: a hold-out takes at least one image of every class"),
        ("class_missing", "train_y.bin in {tree} has no images of class 10 (truck): every class needs training"),
        ("names_not_utf8", "stl10: class_names.txt in {tree} is not UTF-8 text"),
        ("source_not_json", "{tree}/source.json is not readable JSON"),
        ("source_a_list", "{tree}/source.json holds a JSON list, not an object"),
    ],
)
def test_a_tree_prepare_cannot_use_is_one_line_that_says_why(damage: str, expected: str, tmp_path: Path) -> None:
    tree, _ = write_stl10(tmp_path / "src", train=10 if damage == "one_per_class" else 30)
    if damage == "class_missing":
        (tree / "train_y.bin").write_bytes((np.arange(30) % 9 + 1).astype(np.uint8).tobytes())
    elif damage == "names_not_utf8":
        (tree / "class_names.txt").write_bytes("\n".join(["avion"] * 9 + ["cami\xf3n"]).encode("latin-1"))
    elif damage == "source_not_json":
        (tree / "source.json").write_text('{"archive": "stl10_binary.tar.gz",')
    elif damage == "source_a_list":
        (tree / "source.json").write_text('["stl10_binary.tar.gz"]')
    root = tmp_path / "data"
    line = one_error_line(dlops("data", "prepare", "stl10", "--root", str(root), "--raw", str(tree)))
    assert expected.format(tree=tree) in line, line
    assert "--val-fraction 0.1" not in line  # not the fraction that has just failed
    with pytest.raises(DatasetNotAvailable):
        read_manifest(root, "stl10")
    assert not (root / "stl10").exists() or list((root / "stl10").iterdir()) == []


def test_a_fraction_too_large_for_the_smallest_class_says_which_fraction_works() -> None:
    labels = np.repeat([0, 1, 2], [40, 4, 40])  # class 1 has 4 images: at most 3 can be held out
    with pytest.raises(DlopsError) as info:
        stratified_holdout(labels, 0.9, 0)
    assert "takes all 4 images of class 1" in str(info.value)
    assert "use --val-fraction 0.75 or less (the smallest class, 1, has 4 training images)" in str(info.value)
    keep, held = stratified_holdout(labels, 0.75, 0)
    assert np.bincount(labels[held]).tolist() == [30, 3, 30] and len(keep) + len(held) == len(labels)
