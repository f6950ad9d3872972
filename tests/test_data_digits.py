"""The digits dataset: read from scikit-learn's bundled CSV without importing scikit-learn,
the same pixels and labels as ``load_digits()``."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from dlops.data import digits


def test_read_digits_matches_load_digits() -> None:
    assert digits._bundled_csv() is not None, "the CSV path is not found: the fast read is not taken"
    pixels, labels = digits.read_digits()
    bunch = load_digits()
    assert pixels.shape == (1797, 8, 8)
    np.testing.assert_array_equal(pixels, bunch.images)
    np.testing.assert_array_equal(labels, bunch.target)
    assert labels.dtype == np.int64


@pytest.mark.parametrize("layout", ["missing", "other shape"])
def test_read_digits_falls_back_to_scikit_learn(layout: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if layout == "missing":
        monkeypatch.setattr(digits, "_bundled_csv", lambda: None)
    else:
        odd = tmp_path / "digits.csv.gz"
        with gzip.open(odd, "wt") as f:
            f.write("1,2,3\n4,5,6\n")
        monkeypatch.setattr(digits, "_bundled_csv", lambda: odd)
    pixels, labels = digits.read_digits()
    bunch = load_digits()
    np.testing.assert_array_equal(pixels, bunch.images)
    np.testing.assert_array_equal(labels, bunch.target)


def test_digits_dataset_loads_without_importing_scikit_learn() -> None:
    code = (
        "import sys\n"
        "from dlops.data import get_dataset\n"
        "ds = get_dataset('digits')\n"
        "assert len(ds.train) + len(ds.val) + len(ds.load_test()) == 1797\n"
        "print(sorted(m for m in sys.modules if m == 'sklearn' or m.startswith('sklearn.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
