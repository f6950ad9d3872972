"""Shared fixtures: every test writes under its own $DLOPS_HOME."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# $DLOPS_TINY_IMAGENET_SAMPLE points elsewhere (the GPU machine gets a copy in device/).
TINY_IMAGENET_SAMPLE = Path(os.environ.get("DLOPS_TINY_IMAGENET_SAMPLE") or SHARED_DATA / "tiny-imagenet-200-sample.zip")

# Two cores: one intra-op thread per test process keeps timings steady.
torch.set_num_threads(1)


@pytest.fixture
def dlops_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "dlops-home"
    monkeypatch.setenv("DLOPS_HOME", str(home))
    monkeypatch.delenv("DLOPS_STORAGE", raising=False)
    return home


def requires_tiny_imagenet_sample():
    return pytest.mark.skipif(
        not TINY_IMAGENET_SAMPLE.exists(),
        reason=f"real Tiny ImageNet sample not found at {TINY_IMAGENET_SAMPLE} (present in CI, not in a user's clone)",
    )
