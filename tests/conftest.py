"""Shared fixtures: every test writes under its own $DLOPS_HOME."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# The real Tiny ImageNet sample (README, "Tests"): $DLOPS_TINY_IMAGENET_SAMPLE, else the
# project's shared copy next to the checkout.
TINY_IMAGENET_SAMPLE_VAR = "DLOPS_TINY_IMAGENET_SAMPLE"
TINY_IMAGENET_SAMPLE = (
    Path(os.environ.get(TINY_IMAGENET_SAMPLE_VAR) or SHARED_DATA / "tiny-imagenet-200-sample.zip")
    .expanduser()
    .absolute()
)
TINY_IMAGENET_SAMPLE_MISSING = (
    f"real Tiny ImageNet sample not found at {TINY_IMAGENET_SAMPLE}: set {TINY_IMAGENET_SAMPLE_VAR} to the path of "
    "tiny-imagenet-200-sample.zip to run this test (see the README, Tests)"
)

# Two cores: one intra-op thread per test process keeps timings steady.
torch.set_num_threads(1)
# The data lives under each test's $DLOPS_HOME (or the root a test names), never under a
# $DLOPS_DATA of the machine's.
os.environ.pop("DLOPS_DATA", None)


@pytest.fixture
def dlops_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "dlops-home"
    monkeypatch.setenv("DLOPS_HOME", str(home))
    monkeypatch.delenv("DLOPS_STORAGE", raising=False)
    return home


def requires_tiny_imagenet_sample():
    return pytest.mark.skipif(
        not TINY_IMAGENET_SAMPLE.exists(),
        reason=TINY_IMAGENET_SAMPLE_MISSING,
    )


class StopAfterFirstEpoch(Exception):
    pass


def checkpoint_after_one_epoch(config, path: Path) -> None:
    """Train ``config`` with its checkpoint at ``path`` and stop after the first epoch, as
    an interruption would."""
    from dlops.trainers.resnet import fit

    def stop(epoch: int, metrics: dict) -> None:
        if epoch == 0:
            raise StopAfterFirstEpoch

    with pytest.raises(StopAfterFirstEpoch):
        fit(config, report=stop, checkpoint_path=path)
