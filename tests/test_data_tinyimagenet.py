"""Tiny ImageNet: fetch, cache, splits, the loader, and one clear error per kind of bad input."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import re
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import TINY_IMAGENET_SAMPLE, TINY_IMAGENET_SAMPLE_MISSING, requires_tiny_imagenet_sample
from data_trees import one_error_line, write_tiny_imagenet, zip_tree
from dlops.cli import app
from dlops.data import DATASETS, cache, get_dataset, load_split, take_subset, tinyimagenet
from dlops.data.base import data_identity
from dlops.data.cache import read_manifest
from dlops.data.manage import fetch_dataset
from dlops.data.splits import stratified_holdout
from dlops.errors import DatasetNotAvailable, DlopsError
from dlops.spec import Add, spec_table
from specs import write_spec

runner = CliRunner()


def dlops(*args: str):
    return runner.invoke(app, list(args))


def pil_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB")).transpose(2, 0, 1)


def snapshot(root: Path) -> dict[str, str]:
    """md5 of every file of the cache and of the extracted tree's index files."""
    home = root / "tiny-imagenet"
    files = [*sorted((home / "cache").iterdir()), home / "raw" / "tiny-imagenet-200" / "wnids.txt"]
    return {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in files}


def assert_survived(root: Path, before: dict[str, str]) -> None:
    assert snapshot(root) == before
    leftovers = [p.name for p in (root / "tiny-imagenet").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    ds = get_dataset("tiny-imagenet", root)
    assert len(ds.train) + len(ds.val) == 30


# --------------------------------------------------------------------------- the real sample


@pytest.fixture(scope="module")
def sample_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """$DLOPS_HOME with the real Tiny ImageNet sample fetched into its data root."""
    if not TINY_IMAGENET_SAMPLE.exists():
        pytest.skip(TINY_IMAGENET_SAMPLE_MISSING)
    home = tmp_path_factory.mktemp("sample-home")
    result = dlops(
        "data", "fetch", "tiny-imagenet", "--root", str(home / "data"), "--source", str(TINY_IMAGENET_SAMPLE)
    )
    assert result.exit_code == 0, result.output
    assert "not the official" in result.stdout  # the sample's md5 differs: said, then used
    return home


@requires_tiny_imagenet_sample()
def test_sample_fetch_gives_the_documented_splits_and_pixels(sample_home: Path) -> None:
    root = sample_home / "data"
    result = dlops("data", "info", "tiny-imagenet", "--root", str(root), "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["classes"] == 200
    assert info["splits"]["train"] + info["splits"]["val"] == 10_000
    assert info["splits"] == {"train": 9_000, "val": 1_000, "test": 2_000}
    assert info["image_shape"] == [3, 64, 64]

    with zipfile.ZipFile(TINY_IMAGENET_SAMPLE) as zf:
        wnids = zf.read("tiny-imagenet-200/wnids.txt").decode().split()
        val_0 = pil_rgb(zf.read("tiny-imagenet-200/val/images/val_0.JPEG"))
        images, labels, class_ids, class_names = load_split("tiny-imagenet", "test", root)
        assert isinstance(images, np.memmap) and images.dtype == np.uint8 and labels.dtype == np.int64
        np.testing.assert_array_equal(images[0], val_0)
        assert labels[0] == wnids.index("n03444034") and class_ids == wnids
        # test = official val in val_annotations.txt order, every label by its wnid
        annotations = zf.read("tiny-imagenet-200/val/val_annotations.txt").decode().splitlines()
        expected = [wnids.index(line.split("\t")[1]) for line in annotations]
        np.testing.assert_array_equal(labels, expected)
        np.testing.assert_array_equal(
            images[1999], pil_rgb(zf.read(f"tiny-imagenet-200/val/images/{annotations[1999].split()[0]}"))
        )

        # val: 5 of each class's 50 (stratified), the ones the manifest records
        ds = get_dataset("tiny-imagenet", root)
        assert np.bincount(ds.val.labels, minlength=200).tolist() == [5] * 200
        assert np.bincount(ds.train.labels, minlength=200).tolist() == [45] * 200
        manifest = read_manifest(root, "tiny-imagenet")
        assert manifest["holdout"] == {**manifest["holdout"], "fraction": 0.1, "seed": 0, "count": 1000}
        held = np.load(root / "tiny-imagenet" / "cache" / "val_source_index.npy")
        official_labels = np.repeat(np.arange(200), 50)
        np.testing.assert_array_equal(held, stratified_holdout(official_labels, 0.1, 0)[1])
        k = int(held[7])  # official train image k = class k // 50, file <wnid>_<k % 50>
        w = wnids[k // 50]
        np.testing.assert_array_equal(
            ds.val.images[7], pil_rgb(zf.read(f"tiny-imagenet-200/train/{w}/images/{w}_{k % 50}.JPEG"))
        )
        assert class_names[labels[0]] == "go-kart"  # the first name of its words.txt entry

        # a grayscale JPEG of the official data becomes RGB with three equal channels
        gray = next(
            i
            for i, line in enumerate(annotations)
            if Image.open(io.BytesIO(zf.read(f"tiny-imagenet-200/val/images/{line.split()[0]}"))).mode == "L"
        )
        assert (images[gray][0] == images[gray][1]).all() and (images[gray][1] == images[gray][2]).all()
        np.testing.assert_array_equal(
            images[gray], pil_rgb(zf.read(f"tiny-imagenet-200/val/images/{annotations[gray].split()[0]}"))
        )


@requires_tiny_imagenet_sample()
def test_a_subset_study_runs_on_the_sample(sample_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the built-in spec at width 8 (the CPU cost of width 64 does not belong in a test)
    table = spec_table("resnet18-ce", {"name": "tin-ce", "train": {"width": Add(8)}})
    assert table["train"]["dataset"] == "tiny-imagenet"
    spec = write_spec(tmp_path / "tin-ce.toml", table)
    monkeypatch.setenv("DLOPS_HOME", str(sample_home))
    monkeypatch.delenv("DLOPS_STORAGE", raising=False)
    result = dlops(
        "study",
        "run",
        str(spec),
        "--dataset",
        "tiny-imagenet",
        "--subset-classes",
        "10",
        "--subset-per-class",
        "8",
        "--n-trials",
        "2",
        "--epochs",
        "1",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    assert "complete" in result.stdout and "trial   1  epoch   1" in result.stdout
    import optuna

    study = optuna.load_study(study_name="tin-ce", storage=f"sqlite:///{sample_home / 'dlops.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    config = study.trials[1].user_attrs["config"]
    assert (config["dataset"], config["subset_classes"], config["subset_per_class"]) == ("tiny-imagenet", 10, 8)


# --------------------------------------------------------------------------- a small generated tree


@pytest.fixture
def mini_zip(tmp_path: Path) -> Path:
    return zip_tree(write_tiny_imagenet(tmp_path / "src"), tmp_path / "mini.zip")


@pytest.fixture
def good_root(tmp_path: Path, mini_zip: Path) -> Path:
    """A data root holding a good cache of the mini tree."""
    root = tmp_path / "data"
    result = dlops("data", "fetch", "tiny-imagenet", "--root", str(root), "--source", str(mini_zip), "--workers", "1")
    assert result.exit_code == 0, result.output
    return root


def test_mini_tree_round_trip(good_root: Path, tmp_path: Path) -> None:
    tree = tmp_path / "src" / "tiny-imagenet-200"
    ds = get_dataset("tiny-imagenet", good_root)
    assert ds.class_ids == [f"n{90000000 + i:08d}" for i in range(3)]
    assert ds.class_names == ["thing 0", "thing 1", "thing 2"]
    assert (ds.hflip, ds.crop_padding) == (True, tinyimagenet.CROP_PADDING)
    assert isinstance(ds.train.images, np.memmap) and ds.train.images.shape == (27, 3, 64, 64)
    # 10 per class: one (10%) held out of each
    held = np.load(good_root / "tiny-imagenet" / "cache" / "val_source_index.npy")
    keep = np.setdiff1d(np.arange(30), held)
    assert np.bincount(ds.val.labels).tolist() == [1, 1, 1]
    for split, positions in ((ds.train, keep), (ds.val, held)):
        for j, k in enumerate(positions):
            w = ds.class_ids[k // 10]
            np.testing.assert_array_equal(
                split.images[j], pil_rgb((tree / "train" / w / "images" / f"{w}_{k % 10}.JPEG").read_bytes())
            )
            assert split.labels[j] == k // 10
    gray = ds.train.images[list(keep).index(1)]  # class 0's image 1 is a grayscale JPEG
    assert (gray[0] == gray[1]).all() and (gray[0] == gray[2]).all()
    test = ds.test()
    for k, line in enumerate((tree / "val" / "val_annotations.txt").read_text().splitlines()):
        file, w = line.split("\t")[:2]
        np.testing.assert_array_equal(test.images[k], pil_rgb((tree / "val" / "images" / file).read_bytes()))
        assert test.labels[k] == ds.class_ids.index(w)
    # what a subset study reads
    sub = take_subset(ds, 2, 4)
    assert np.bincount(sub.train.labels).tolist() == [4, 4]


def test_pool_decoding_matches_in_process_decoding(good_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = {s: np.array(getattr(get_dataset("tiny-imagenet", good_root), s).images) for s in ("train", "val")}
    monkeypatch.setattr(tinyimagenet, "CHUNK", 4)  # 36 images -> 9 pool tasks
    result = dlops("data", "prepare", "tiny-imagenet", "--root", str(good_root), "--force", "--workers", "2")
    assert result.exit_code == 0, result.output
    assert "2 decoding processes" in result.stdout and "cached 36 images" in result.stdout
    ds = get_dataset("tiny-imagenet", good_root)
    for s in ("train", "val"):
        np.testing.assert_array_equal(getattr(ds, s).images, before[s])


POOL_ERROR_LOOP = """
import faulthandler, sys
faulthandler.dump_traceback_later(120, exit=True)  # a watchdog thread, as a CLI or test runner has
from pathlib import Path
from dlops.data import tinyimagenet
from dlops.data.cache import CacheBuilder
from dlops.errors import DlopsError
tinyimagenet.CHUNK = 4
tree, cache = Path(sys.argv[1]), Path(sys.argv[2])
for _ in range(int(sys.argv[3])):
    with CacheBuilder(cache, "tiny-imagenet") as builder:
        try:
            tinyimagenet.build_cache(tree, builder, workers=2, progress=False)
        except DlopsError as exc:
            assert "cannot decode" in str(exc), exc
        else:
            raise SystemExit("a truncated JPEG was decoded")
print("ok")
"""


def test_a_decoding_error_in_the_pool_never_hangs(tmp_path: Path) -> None:
    """Stopping the pool at the first bad image, over and over: a pool torn down by killing
    its workers (multiprocessing.Pool.terminate) deadlocked within ~150 tries here."""
    tree = write_tiny_imagenet(tmp_path / "raw")
    jpeg = tree / "train" / "n90000002" / "images" / "n90000002_5.JPEG"
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    try:
        done = subprocess.run(
            [sys.executable, "-c", POOL_ERROR_LOOP, str(tree), str(tmp_path / "cache"), "200"],
            capture_output=True,
            text=True,
            timeout=180,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the decoding pool hung after an error")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
    assert not any((tmp_path / "cache").rglob("*.npy"))  # every failed build removed its scratch files


def test_fetch_and_prepare_leave_a_good_cache_alone(good_root: Path, mini_zip: Path) -> None:
    before = snapshot(good_root)
    result = dlops("data", "fetch", "tiny-imagenet", "--root", str(good_root), "--source", str(mini_zip))
    assert result.exit_code == 0 and "already prepared" in result.stdout
    result = dlops("data", "prepare", "tiny-imagenet", "--root", str(good_root))
    assert result.exit_code == 0 and "already prepared" in result.stdout and "cached" not in result.stdout
    assert snapshot(good_root) == before


def test_prepare_rebuilds_from_the_extracted_tree_with_another_holdout(good_root: Path) -> None:
    result = dlops(
        "data", "prepare", "tiny-imagenet", "--root", str(good_root), "--force", "--val-fraction", "0.2", "--seed", "3"
    )
    assert result.exit_code == 0, result.output
    manifest = read_manifest(good_root, "tiny-imagenet")
    assert manifest["splits"] == {"train": 24, "val": 6, "test": 6}
    assert manifest["holdout"]["seed"] == 3 and manifest["source"]["archive"] == "mini.zip"


def holdout_of(root: Path) -> tuple[float, int, list[int]]:
    manifest = read_manifest(root, "tiny-imagenet")
    index = np.load(root / "tiny-imagenet" / "cache" / "val_source_index.npy").tolist()
    return manifest["holdout"]["fraction"], manifest["holdout"]["seed"], index


def test_a_forced_rebuild_keeps_the_hold_out_of_the_cache_it_replaces(good_root: Path, mini_zip: Path) -> None:
    """A study records the hold-out it is measured on: `--force` (to repair a cache, say)
    without --val-fraction/--seed must not quietly go back to the default split."""
    root = str(good_root)
    result = dlops(
        "data", "prepare", "tiny-imagenet", "--root", root, "--force", "--val-fraction", "0.2", "--seed", "3"
    )
    assert result.exit_code == 0, result.output
    built = holdout_of(good_root)
    assert built[:2] == (0.2, 3) and len(built[2]) == 6
    identity = data_identity(get_dataset("tiny-imagenet", good_root))
    for args in (
        ("prepare", "tiny-imagenet", "--force"),
        ("fetch", "tiny-imagenet", "--force", "--source", str(mini_zip)),
        ("prepare", "tiny-imagenet", "--force", "--seed", "3"),  # the fraction not given is kept too
    ):
        result = dlops("data", *args, "--root", root, "--workers", "1")
        assert result.exit_code == 0, result.output
        assert "keeping the validation hold-out of the present cache (fraction 0.2, seed 3)" in result.stdout
        assert holdout_of(good_root) == built
        assert data_identity(get_dataset("tiny-imagenet", good_root)) == identity
    # Only the part given changes; the other is the present cache's.
    result = dlops("data", "prepare", "tiny-imagenet", "--root", root, "--force", "--seed", "4", "--workers", "1")
    assert result.exit_code == 0, result.output
    line = " ".join(result.stdout.split())
    assert "changes from fraction 0.2, seed 3 to fraction 0.2, seed 4" in line and "will not continue" in line
    fraction, seed, index = holdout_of(good_root)
    assert (fraction, seed) == (0.2, 4) and len(index) == 6 and index != built[2]


def test_rebuilding_a_damaged_cache_keeps_the_hold_out_its_manifest_records(good_root: Path) -> None:
    root = str(good_root)
    result = dlops(
        "data", "prepare", "tiny-imagenet", "--root", root, "--force", "--val-fraction", "0.2", "--seed", "3"
    )
    assert result.exit_code == 0, result.output
    built = holdout_of(good_root)
    images = good_root / "tiny-imagenet" / "cache" / "train_images.npy"
    images.write_bytes(images.read_bytes()[:1000])  # cut short: the cache no longer reads
    assert "dlops data prepare tiny-imagenet --force" in one_error_line(
        dlops("data", "info", "tiny-imagenet", "--root", root)
    )
    result = dlops("data", "prepare", "tiny-imagenet", "--root", root, "--force", "--workers", "1")
    assert result.exit_code == 0, result.output
    assert holdout_of(good_root) == built


@pytest.mark.parametrize("command", ["prepare", "fetch"])
def test_a_hold_out_given_without_force_is_refused_not_ignored(good_root: Path, mini_zip: Path, command: str) -> None:
    """Without --force a present cache is kept, so another hold-out asked for would be
    silently dropped: it is one line saying --force, and the cache is as it was."""
    source = ("--source", str(mini_zip)) if command == "fetch" else ()
    before = snapshot(good_root)
    line = one_error_line(
        dlops("data", command, "tiny-imagenet", "--root", str(good_root), *source, "--val-fraction", "0.3")
    )
    assert "already prepared with the validation hold-out fraction 0.1, seed 0" in line, line
    assert "add --force to rebuild it with fraction 0.3, seed 0" in line, line
    assert_survived(good_root, before)
    # The hold-out it has, asked for again, is no change: the cache is reused.
    result = dlops(
        "data", command, "tiny-imagenet", "--root", str(good_root), *source, "--val-fraction", "0.1", "--seed", "0"
    )
    assert result.exit_code == 0 and "already prepared" in result.stdout, result.output
    assert snapshot(good_root) == before


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_a_hold_out_seed_out_of_range_is_one_line_and_the_cache_survives(good_root: Path, seed: str) -> None:
    before = snapshot(good_root)
    line = one_error_line(
        dlops("data", "prepare", "tiny-imagenet", "--root", str(good_root), "--force", "--seed", seed)
    )
    assert "Invalid value for '--seed'" in line, line
    assert_survived(good_root, before)


def test_missing_cache_says_how_to_get_it(tmp_path: Path, dlops_home: Path) -> None:
    with pytest.raises(DatasetNotAvailable, match=r"dlops data fetch tiny-imagenet.*--dataset digits"):
        get_dataset("tiny-imagenet", tmp_path / "empty")
    assert "tiny-imagenet" in DATASETS
    line = one_error_line(dlops("data", "info", "tiny-imagenet"))
    assert "dlops data fetch tiny-imagenet" in line and str(dlops_home / "data") in line
    line = one_error_line(dlops("study", "run", "--loss", "ce", "--dataset", "tiny-imagenet", "--n-trials", "1"))
    assert "dlops data fetch tiny-imagenet" in line and "--dataset digits" in line
    line = one_error_line(dlops("data", "prepare", "tiny-imagenet"))
    assert "dlops data fetch tiny-imagenet" in line


def test_an_old_cache_format_is_refused_with_the_fix(good_root: Path) -> None:
    path = good_root / "tiny-imagenet" / "cache" / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "format_version": 0}))
    with pytest.raises(DatasetNotAvailable, match=r"format version 0.*prepare tiny-imagenet --force"):
        get_dataset("tiny-imagenet", good_root)


def test_show_writes_a_grid_and_histogram_png(good_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "show.png"
    result = dlops("data", "show", "tiny-imagenet", "--root", str(good_root), "--out", str(out), "--count", "6")
    assert result.exit_code == 0, result.output
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 600 and im.size[1] > 400


def test_show_out_takes_a_folder_and_refuses_another_format(good_root: Path, tmp_path: Path) -> None:
    """``--out`` a folder writes NAME.png in it (and says so); a path matplotlib would save
    under another name or format is one line, before any work."""
    folder = tmp_path / "figures"
    folder.mkdir()
    result = dlops("data", "show", "tiny-imagenet", "--root", str(good_root), "--out", str(folder), "--count", "4")
    assert result.exit_code == 0, result.output
    written = folder / "tiny-imagenet.png"
    assert str(written) in result.output.replace("\n", "")
    with Image.open(written) as im:
        assert im.format == "PNG"
    for bad in (tmp_path / "x.txt", tmp_path / "no-suffix"):
        result = dlops("data", "show", "tiny-imagenet", "--root", str(good_root), "--out", str(bad))
        assert result.exit_code != 0
        assert result.output.strip().splitlines() == [
            f"error: --out {bad}: give a .png path or an existing folder (the figure is a PNG)"
        ]
        assert not bad.exists() and not bad.with_suffix(".png").exists()


def test_the_data_benchmark_prints_its_speedup_last(
    good_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    script = Path(__file__).parents[1] / "benchmarks" / "data.py"
    spec = importlib.util.spec_from_file_location("benchmark_data", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "data.py",
            "--root",
            str(good_root),
            "--images",
            "48",
            "--batch-size",
            "8",
            "--workers",
            "0",
            "--device",
            "cpu",
        ],
    )
    module.main()
    lines = capsys.readouterr().out.strip().splitlines()
    assert "study loader" in lines[-3] and "ImageFolder" in lines[-2]
    assert re.fullmatch(r"speedup_vs_imagefolder: \d+\.\d+", lines[-1])
    assert float(lines[-1].split()[1]) > 0


# --------------------------------------------------------------------------- bad input


def _rewrite(tmp_path: Path, edit) -> Path:
    tree = write_tiny_imagenet(tmp_path / "bad")
    edit(tree)
    return zip_tree(tree, tmp_path / "bad.zip")


def corrupt_bytes(tmp_path: Path, mini_zip: Path) -> Path:
    data = bytearray(mini_zip.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)  # inside some member's compressed data
    path = tmp_path / "bad.zip"
    path.write_bytes(bytes(data))
    return path


def truncated_zip(tmp_path: Path, mini_zip: Path) -> Path:
    path = tmp_path / "bad.zip"
    path.write_bytes(mini_zip.read_bytes()[: mini_zip.stat().st_size // 2])
    return path


def truncated_jpeg(tmp_path: Path, mini_zip: Path) -> Path:
    def edit(tree: Path) -> None:
        jpeg = tree / "train" / "n90000002" / "images" / "n90000002_5.JPEG"
        jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])

    return _rewrite(tmp_path, edit)


def missing_wnids(tmp_path: Path, mini_zip: Path) -> Path:
    return _rewrite(tmp_path, lambda tree: (tree / "wnids.txt").unlink())


def unknown_wnid(tmp_path: Path, mini_zip: Path) -> Path:
    def edit(tree: Path) -> None:
        ann = tree / "val" / "val_annotations.txt"
        ann.write_text(ann.read_text() + "val_0.JPEG\tn99999999\t0\t0\t10\t10\n")

    return _rewrite(tmp_path, edit)


def binary_annotations(tmp_path: Path, mini_zip: Path) -> Path:
    def edit(tree: Path) -> None:
        ann = tree / "val" / "val_annotations.txt"
        ann.write_bytes(ann.read_bytes() + b"val_\xff.JPEG\tn90000001\n")

    return _rewrite(tmp_path, edit)


def escaping_member(tmp_path: Path, mini_zip: Path) -> Path:
    tree = write_tiny_imagenet(tmp_path / "bad")
    return zip_tree(tree, tmp_path / "bad.zip", extra={"tiny-imagenet-200/../../evil.txt": b"gotcha"})


def absolute_member(tmp_path: Path, mini_zip: Path) -> Path:
    path = tmp_path / "bad.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("tiny-imagenet-200/wnids.txt", "n1\n")
        info = zipfile.ZipInfo("x")
        info.filename = str(tmp_path / "evil.txt")  # an absolute name, as a hostile zip can hold
        zf.writestr(info, b"gotcha")
    return path


BAD_INPUTS = {  # case: (archive maker, decoding processes, what the error line says)
    "corrupt zip": (corrupt_bytes, 1, "corrupt archive"),
    "truncated zip": (truncated_zip, 1, "not a readable zip or tar archive"),
    "truncated JPEG": (truncated_jpeg, 1, "cannot decode train/n90000002/images/n90000002_5.JPEG"),
    "truncated JPEG, pool": (truncated_jpeg, 2, "cannot decode train/n90000002/images/n90000002_5.JPEG"),
    "missing wnids.txt": (missing_wnids, 1, "wnids.txt missing"),
    "unknown wnid in val_annotations.txt": (unknown_wnid, 1, "line 7 names 'n99999999', which is not in wnids.txt"),
    "val_annotations.txt not text": (binary_annotations, 1, "is not text (byte"),
    "member escaping the root": (escaping_member, 1, "would be written outside the target directory"),
    "absolute member": (absolute_member, 1, "would be written outside the target directory"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_error_line_and_the_good_cache_survives(
    case: str, good_root: Path, tmp_path: Path, mini_zip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tinyimagenet, "CHUNK", 4)  # several pool tasks even for 36 images
    make, workers, message = BAD_INPUTS[case]
    bad = make(tmp_path, mini_zip)
    before = snapshot(good_root)
    result = dlops(
        "data",
        "fetch",
        "tiny-imagenet",
        "--root",
        str(good_root),
        "--source",
        str(bad),
        "--force",
        "--workers",
        str(workers),
    )
    assert message in one_error_line(result)
    assert_survived(good_root, before)
    assert list(tmp_path.rglob("evil.txt")) == []


def test_prepare_from_a_bad_tree_keeps_the_good_cache(good_root: Path, tmp_path: Path) -> None:
    tree = write_tiny_imagenet(tmp_path / "other")
    (tree / "wnids.txt").unlink()
    before = snapshot(good_root)
    line = one_error_line(
        dlops("data", "prepare", "tiny-imagenet", "--root", str(good_root), "--raw", str(tmp_path / "other"), "--force")
    )
    assert "wnids.txt missing" in line
    assert_survived(good_root, before)


@pytest.mark.parametrize(
    ("file", "damage"),
    [
        ("train_images.npy", "truncate"),
        ("val_labels.npy", "truncate"),
        ("test_images.npy", "append"),
        ("train_images.npy", "reshape"),
    ],
)
def test_a_damaged_cache_file_is_one_line_everywhere_with_the_fix(
    file: str, damage: str, good_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = good_root / "tiny-imagenet" / "cache" / file
    if damage == "truncate":
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 3)
    elif damage == "append":
        with open(path, "ab") as f:
            f.write(b"\0" * 100)
    else:  # a file of the right size whose header says another shape
        array = np.load(path)
        np.save(path, array.reshape(array.shape[0], 3, -1))
    fix = "dlops data prepare tiny-imagenet --force"
    line = one_error_line(dlops("data", "info", "tiny-imagenet", "--root", str(good_root)))
    assert file in line and fix in line
    with pytest.raises(DatasetNotAvailable, match=re.escape(fix)):
        get_dataset("tiny-imagenet", good_root)
    monkeypatch.setenv("DLOPS_HOME", str(tmp_path))  # its data root is good_root
    monkeypatch.delenv("DLOPS_STORAGE", raising=False)
    line = one_error_line(
        dlops("study", "run", "--loss", "ce", "--dataset", "tiny-imagenet", "--n-trials", "1", "--epochs", "1")
    )
    assert file in line and fix in line
    result = dlops("data", "prepare", "tiny-imagenet", "--root", str(good_root), "--force")
    assert result.exit_code == 0, result.output
    assert len(get_dataset("tiny-imagenet", good_root).train) == 27


def test_fetch_of_another_source_over_a_prepared_cache_is_refused_without_force(
    good_root: Path, mini_zip: Path, tmp_path: Path
) -> None:
    before = snapshot(good_root)
    other = zip_tree(write_tiny_imagenet(tmp_path / "other", classes=4), tmp_path / "other.zip")
    for source in ("/etc/passwd", str(other), "https://127.0.0.1:9/tiny-imagenet-200.zip"):
        line = one_error_line(dlops("data", "fetch", "tiny-imagenet", "--root", str(good_root), "--source", source))
        assert "already prepared from mini.zip" in line and "--force" in line, line
    line = one_error_line(
        dlops("data", "fetch", "tiny-imagenet", "--root", str(good_root), "--source", str(tmp_path / "nope.zip"))
    )
    assert "not found" in line
    assert_survived(good_root, before)
    copy = tmp_path / "elsewhere" / "same.zip"  # the same archive under another name: nothing to do
    copy.parent.mkdir()
    copy.write_bytes(mini_zip.read_bytes())
    result = dlops("data", "fetch", "tiny-imagenet", "--root", str(good_root), "--source", str(copy))
    assert result.exit_code == 0 and "already prepared" in result.stdout, result.output
    result = dlops(
        "data", "fetch", "tiny-imagenet", "--root", str(good_root), "--source", str(other), "--force", "--workers", "1"
    )
    assert result.exit_code == 0, result.output
    assert read_manifest(good_root, "tiny-imagenet")["source"]["archive"] == "other.zip"


# --------------------------------------------------------------------------- the swap


def _fail_when_moving(monkeypatch: pytest.MonkeyPatch, prefix: str, error: BaseException) -> None:
    """Rename without the atomic exchange, and fail when a folder named ``prefix*`` is
    moved into place, between the swap's two renames."""
    monkeypatch.setattr(cache, "exchange_paths", lambda a, b: False, raising=False)
    real_rename, real_replace = os.rename, os.replace

    def failing(real):
        def move(src, dst):
            if Path(src).name.startswith(prefix) and Path(dst).name in ("cache", "raw"):
                raise error
            return real(src, dst)

        return move

    monkeypatch.setattr(os, "rename", failing(real_rename))
    monkeypatch.setattr(os, "replace", failing(real_replace))


@pytest.mark.parametrize("prefix", [".cache-tmp-", ".extract-tmp-"])
@pytest.mark.parametrize("error", [KeyboardInterrupt(), OSError("disk trouble")], ids=["ctrl-c", "oserror"])
def test_a_failure_between_the_renames_of_the_swap_keeps_cache_and_tree(
    prefix: str, error: BaseException, good_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = zip_tree(write_tiny_imagenet(tmp_path / "other", classes=4), tmp_path / "other.zip")
    before = snapshot(good_root)
    _fail_when_moving(monkeypatch, prefix, error)
    with pytest.raises(type(error)):
        fetch_dataset("tiny-imagenet", good_root, str(other), force=True, workers=1, progress=False)
    monkeypatch.undo()
    assert_survived(good_root, before)  # the old cache beside the old tree, no hidden leftovers


def test_ctrl_c_during_the_swap_waits_until_it_is_done(
    good_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = zip_tree(write_tiny_imagenet(tmp_path / "other", classes=4), tmp_path / "other.zip")
    monkeypatch.setattr(cache, "exchange_paths", lambda a, b: False, raising=False)
    real_rename = os.rename

    def interrupted(src, dst):
        if Path(src).name == "cache":  # the old cache goes aside: Ctrl-C right then
            os.kill(os.getpid(), signal.SIGINT)
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fetch_dataset("tiny-imagenet", good_root, str(other), force=True, workers=1, progress=False)
    monkeypatch.undo()
    assert read_manifest(good_root, "tiny-imagenet")["source"]["archive"] == "other.zip"
    assert (good_root / "tiny-imagenet" / "raw" / "tiny-imagenet-200" / "wnids.txt").read_text().count("\n") == 4
    assert [p.name for p in (good_root / "tiny-imagenet").iterdir() if p.name.startswith(".")] == []


def test_a_cache_left_aside_by_a_crashed_swap_is_put_back(good_root: Path) -> None:
    home = good_root / "tiny-imagenet"
    before = snapshot(good_root)
    (home / "cache").rename(home / ".cache-old-0123abcd")  # what a crash between the renames left
    result = dlops("data", "info", "tiny-imagenet", "--root", str(good_root))
    assert result.exit_code == 0, result.output
    assert_survived(good_root, before)


def test_a_failed_exchange_of_the_tree_puts_the_exchanged_cache_back(
    good_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = zip_tree(write_tiny_imagenet(tmp_path / "other", classes=4), tmp_path / "other.zip")
    before = snapshot(good_root)
    real_exchange = cache.exchange_paths

    def exchange(a: Path, b: Path) -> bool:
        if a.name.startswith(".extract-tmp-"):
            raise OSError("disk trouble")
        return real_exchange(a, b)

    monkeypatch.setattr(cache, "exchange_paths", exchange)
    with pytest.raises(OSError, match="disk trouble"):
        fetch_dataset("tiny-imagenet", good_root, str(other), force=True, workers=1, progress=False)
    assert_survived(good_root, before)


def test_a_val_fraction_that_leaves_a_class_nothing_to_train_on_is_refused(good_root: Path) -> None:
    before = snapshot(good_root)
    for fraction in ("0.99", "0.96"):  # 10 images a class: round(9.6) is all of them too
        line = one_error_line(
            dlops("data", "prepare", "tiny-imagenet", "--root", str(good_root), "--force", "--val-fraction", fraction)
        )
        assert f"hold-out fraction of {fraction} takes all 10 images of class 0" in line, line
    assert_survived(good_root, before)
    with pytest.raises(DlopsError, match="leaving none to train on"):
        stratified_holdout(np.array([0, 0, 1]), 0.1, 0)  # one image of class 1: it cannot be held out


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda m: m.pop("class_names"), "has no list of class_names"),
        (lambda m: m.update(classes=5), "has 3 class_ids, 3 class_names and classes = 5"),
        (lambda m: m["splits"].pop("test"), "has no train, val and test counts"),
        (lambda m: m.update(image_shape="64x64"), "has image_shape '64x64'"),
        (lambda m: m["splits"].update(train="27"), "has split counts that are not whole numbers"),
    ],
    ids=["no class_names", "classes", "no test count", "image_shape", "count as text"],
)
def test_a_hand_edited_manifest_is_one_line_with_the_fix(good_root: Path, edit, problem: str) -> None:
    path = good_root / "tiny-imagenet" / "cache" / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    fix = "dlops data prepare tiny-imagenet --force"
    for command in ("info", "show"):
        line = one_error_line(dlops("data", command, "tiny-imagenet", "--root", str(good_root)))
        assert f"manifest.json {problem}" in line and fix in line, line
    with pytest.raises(DatasetNotAvailable, match=re.escape(fix)):
        get_dataset("tiny-imagenet", good_root)


@pytest.mark.parametrize(("split", "label"), [("train", 3), ("val", -1), ("test", 99)])
def test_labels_out_of_range_are_one_line_with_the_fix(good_root: Path, tmp_path: Path, split: str, label: int) -> None:
    path = good_root / "tiny-imagenet" / "cache" / f"{split}_labels.npy"
    labels = np.load(path)
    labels[0] = label
    np.save(path, labels)
    for command in (("show", "--out", str(tmp_path / "x.png")), ("info",), ("info", "--json")):
        line = one_error_line(dlops("data", *command, "tiny-imagenet", "--root", str(good_root)))
        assert f"{split}_labels.npy holds labels" in line and "not class indices 0..2" in line, line
        assert "dlops data prepare tiny-imagenet --force" in line


def test_a_reference_run_finds_a_damaged_test_split_before_it_trains(
    good_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The test split is evaluated once, after training; its cache is checked before: a
    damaged one is one line at the start, not after the seeds have trained."""
    path = good_root / "tiny-imagenet" / "cache" / "test_labels.npy"
    labels = np.load(path)
    labels[0] = -5
    np.save(path, labels)
    monkeypatch.setenv("DLOPS_HOME", str(tmp_path))  # its data/ is good_root
    monkeypatch.delenv("DLOPS_STORAGE", raising=False)
    result = dlops(
        "final", "--loss", "ce", "--params", "baseline", "--dataset", "tiny-imagenet", "--device", "cpu",
        "--epochs", "1", "--subset-classes", "2", "--subset-per-class", "2",
    )  # fmt: skip
    line = one_error_line(result)
    assert "test_labels.npy holds labels -5.." in line and "dlops data prepare tiny-imagenet --force" in line, line
    assert "epoch" not in result.output
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "reports").exists()


def test_info_gives_a_small_hold_out_fraction_as_it_is(good_root: Path) -> None:
    """A fraction under 0.5% printed as "0% of each class" read as no hold-out at all."""
    result = dlops("data", "prepare", "tiny-imagenet", "--root", str(good_root), "--force", "--val-fraction", "0.001")
    assert result.exit_code == 0, result.output
    info = " ".join(dlops("data", "info", "tiny-imagenet", "--root", str(good_root)).output.split())
    assert "(0.1% of each class, at least 1;" in info, info
