"""Study specs shared by several test modules, and the TOML writer that turns a spec
table (a built-in spec with explicit overrides, :func:`dlops.spec.spec_table`) into a
file for the CLI or a worker process."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("-inf" if value < 0 else "inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML form for {value!r}")


def _table_lines(table: Mapping[str, Any], path: tuple[str, ...], lines: list[str]) -> None:
    values = {k: v for k, v in table.items() if not isinstance(v, Mapping)}
    tables = {k: v for k, v in table.items() if isinstance(v, Mapping)}
    if path and (values or not tables):
        lines.append(f"[{'.'.join(_key(k) for k in path)}]")
    lines.extend(f"{_key(k)} = {_value(v)}" for k, v in values.items())
    for key, sub in tables.items():
        _table_lines(sub, (*path, key), lines)


def toml_text(table: Mapping[str, Any]) -> str:
    """TOML text that ``tomllib`` reads back as ``table`` (keys, tables, lists, scalars)."""
    lines: list[str] = []
    _table_lines(table, (), lines)
    return "\n".join(lines) + "\n"


def write_spec(path: Path, table: Mapping[str, Any]) -> Path:
    """Write the spec ``table`` to ``path`` as TOML; returns ``path``."""
    path.write_text(toml_text(table))
    return path


def tiny_workers_spec(
    tmp_path: Path, *, name: str = "tiny-workers", epochs: int = 1, per_class: int = 10, n_trials: int = 3
) -> Path:
    """A digits study small enough for many worker processes: ResNet18 width 8, no pruner."""
    return write_spec(
        tmp_path / f"{name}.toml",
        {
            "name": name,
            "trainer": "resnet18",
            "metric": "val_top5",
            "direction": "maximize",
            "n_trials": n_trials,
            "train": {
                "dataset": "digits",
                "loss": "ce",
                "width": 8,
                "subset_per_class": per_class,
                "epochs": epochs,
                "batch_size": 32,
                "eval_batch_size": 256,
                "lr": 1e-2,
            },
            "search": {"lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True}},
            "baseline": {"lr": 1e-2},
            "pruner": {"type": "none"},
            "sampler": {"type": "tpe", "seed": 0},
        },
    )
