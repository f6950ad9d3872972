"""``final.json``: what a reference run found (the test figures per seed, their mean and
standard deviation) and where it came from (settings, their source, data, device,
package versions, commit, time, study)."""

from __future__ import annotations

import json
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from dlops.io import json_safe, write_text_atomic
from dlops.metrics import mean_std
from dlops.params import ChosenParams
from dlops.spec import StudySpec
from dlops.trainers.base import FitResult, Trainer, TrainerConfig
from dlops.versions import git_commit, package_versions


def build_final(
    spec: StudySpec,
    trainer: Trainer,
    chosen: ChosenParams,
    seeds: list[int],
    configs: list[TrainerConfig],
    per_seed: list[dict[str, Any]],
    last: FitResult,
    wall_seconds: float,
    study: dict[str, str] | None,
) -> dict[str, Any]:
    """The contents of ``final.json`` (strict JSON: NaN stored as null). ``per_seed``: the
    seeds' records; ``last``: the last seed's fit result; ``study``: its name and
    (masked) storage, None without one."""
    ds = last.dataset
    figure_keys = [k for k, v in per_seed[0].items() if k.startswith("test_") and not isinstance(v, dict)]
    mean, std = {}, {}
    for k in figure_keys:
        mean[k], std[k] = mean_std([s[k] for s in per_seed])
    final = {
        "spec": spec.name,
        "trainer": spec.trainer,
        "description": spec.description,
        "metric": spec.metric,
        "params": chosen.params,
        "params_source": chosen.source,
        "dataset": {
            "name": configs[0].dataset or ds.name,
            "num_classes": ds.num_classes,
            "class_names": list(ds.class_names),
            "image_shape": list(ds.image_shape),
            "splits": per_seed[0]["split_sizes"],
            **trainer.data_record(last),
        },
        "epochs": configs[0].epochs,
        "seeds": seeds,
        "config": {k: v for k, v in configs[0].to_dict().items() if k != "seed"},
        "mean": mean,
        "std": std,
        "per_seed": per_seed,
        "wall_seconds": wall_seconds,
        "device": str(last.device),
        "device_name": (
            torch.cuda.get_device_name(last.device)
            if last.device.type == "cuda"
            else platform.processor() or platform.machine()
        ),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "study": study,
        **trainer.summary(per_seed),
    }
    return json_safe(final)


def write_final(final: dict[str, Any], path: Path) -> Path:
    return write_text_atomic(path, json.dumps(final, indent=2) + "\n")
