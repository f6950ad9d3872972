"""The tests' own setup: where the real Tiny ImageNet sample is looked for."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parent


def _pytest(env_value: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DLOPS_TINY_IMAGENET_SAMPLE": env_value, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args],
        cwd=TESTS.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_sample_path_comes_from_dlops_tiny_imagenet_sample(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "sample.zip"
    done = _pytest(
        str(missing),
        "tests/test_data_tinyimagenet.py",
        "tests/test_data_fetch.py",
        "-k",
        "documented_splits or subset_study_runs or fetch_the_sample",
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    skips = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(skips) == 3, done.stdout[-3000:]
    for line in skips:  # the reason names the variable and where it looked
        assert "DLOPS_TINY_IMAGENET_SAMPLE" in line and str(missing) in line, line
    code = "import conftest; print(conftest.TINY_IMAGENET_SAMPLE)"
    env = {**os.environ, "DLOPS_TINY_IMAGENET_SAMPLE": "~/my-data/sample.zip"}
    out = subprocess.run([sys.executable, "-c", code], cwd=TESTS, env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == str(Path("~/my-data/sample.zip").expanduser()), out.stderr[-2000:]


def test_the_sample_maker_keeps_the_official_layout(tmp_path: Path) -> None:
    from data_trees import write_tiny_imagenet, zip_tree
    from dlops.data import get_dataset
    from dlops.data.manage import fetch_dataset
    from make_tiny_imagenet_sample import make_sample

    tree = write_tiny_imagenet(tmp_path / "src", classes=4, train_per_class=12, val_per_class=3)
    (tree / "test" / "images" / "test_1.JPEG").write_bytes((tree / "test" / "images" / "test_0.JPEG").read_bytes())
    official = zip_tree(tree, tmp_path / "official.zip")
    kept = make_sample(official, tmp_path / "sample.zip", train_per_class=10, val_per_class=2, test_images=1)
    assert kept == {"train": 40, "val": 8, "test": 1}
    manifest = fetch_dataset(
        "tiny-imagenet", tmp_path / "data", str(tmp_path / "sample.zip"), workers=1, progress=False
    )
    assert manifest["splits"] == {"train": 36, "val": 4, "test": 8}
    ds = get_dataset("tiny-imagenet", tmp_path / "data")
    assert np.bincount(ds.test().labels, minlength=4).tolist() == [2, 2, 2, 2]
