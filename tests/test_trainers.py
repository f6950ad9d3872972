"""The trainer registry, the protocol every trainer meets, and the one checkpoint rule.
(What trainers may import: tests/test_architecture.py.)"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

import dlops
from dlops.errors import SpecError
from dlops.trainers import TRAINER_MODULES, get_trainer
from dlops.trainers.base import RESUMABLE_DIFFERENCES, Trainer, config_matches

PACKAGE = Path(dlops.__file__).parent


def test_importing_the_registry_loads_no_trainer_and_no_torch() -> None:
    code = (
        "import sys, dlops.trainers\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('dlops.trainers.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", sorted(TRAINER_MODULES))
def test_every_registered_trainer_meets_the_protocol(name: str) -> None:
    trainer = get_trainer(name)
    assert isinstance(trainer, Trainer) and trainer.name == name
    assert dataclasses.is_dataclass(trainer.config_class)
    config = trainer.config_class()
    trainer.validate(config)
    for key in ("to_dict", "replace"):
        assert callable(getattr(config, key))
    assert {"train_loss", "val_top1", "val_top5"} <= set(trainer.metrics)


def test_an_unknown_trainer_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match=r"unknown trainer 'gpt'.*autoencoder, resnet18"):
        get_trainer("gpt")


def test_a_checkpoint_matches_a_config_that_differs_only_in_where_and_how_fast_it_runs() -> None:
    saved = {
        "lr": 0.1,
        "epochs": 3,
        "device": "cuda",
        "eval_batch_size": 512,
        "data_root": "/a",
        "compile": True,
        "cudnn_benchmark": True,
    }
    assert {"device", "eval_batch_size", "data_root", "compile", "cudnn_benchmark"} == RESUMABLE_DIFFERENCES
    moved = {
        **saved,
        "device": "cpu",
        "eval_batch_size": 64,
        "data_root": None,
        "compile": False,
        "cudnn_benchmark": False,
    }
    assert config_matches(saved, moved)
    assert not config_matches(saved, {**saved, "lr": 0.2})
    assert not config_matches(saved, {**saved, "seed": 1})  # a key only one side has


# --------------------------------------------------------------------------- import rules
