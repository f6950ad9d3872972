"""The tests' own setup: where the real Tiny ImageNet sample is looked for."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _pytest(env_value: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DLOPS_TINY_IMAGENET_SAMPLE": env_value, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args],
                          cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=600)


def test_the_sample_path_comes_from_dlops_tiny_imagenet_sample(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "sample.zip"
    done = _pytest(str(missing), "tests/test_data_tinyimagenet.py", "tests/test_data_fetch.py",
                   "-k", "documented_splits or subset_study_runs or fetch_the_sample")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    skips = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(skips) == 3, done.stdout[-3000:]
    for line in skips:  # the reason names the variable and where it looked
        assert "DLOPS_TINY_IMAGENET_SAMPLE" in line and str(missing) in line, line
    code = "import conftest; print(conftest.TINY_IMAGENET_SAMPLE)"
    env = {**os.environ, "DLOPS_TINY_IMAGENET_SAMPLE": "~/my-data/sample.zip"}
    out = subprocess.run([sys.executable, "-c", code], cwd=TESTS, env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == str(Path("~/my-data/sample.zip").expanduser()), out.stderr[-2000:]
