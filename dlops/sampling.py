"""The sampler and the pruner that a spec's ``[sampler]`` and ``[pruner]`` tables name.

Kept apart from the objective so that the spec loader can build (and so check) a pruner
when it loads a spec, and the pruning replay can build one, without importing a trainer.
"""

from __future__ import annotations

import hashlib
from typing import Any

import optuna

from dlops.errors import SpecError


def make_sampler(table: dict[str, Any], seed: int | None = None) -> optuna.samplers.BaseSampler:
    """The sampler of a ``[sampler]`` table (``type`` tpe or random), seeded with ``seed``
    (default: the table's ``seed``, else 0)."""
    seed = table.get("seed", 0) if seed is None else seed
    if table.get("type", "tpe") == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    kwargs = {"n_startup_trials": table["n_startup_trials"]} if "n_startup_trials" in table else {}
    return optuna.samplers.TPESampler(seed=seed, **kwargs)


def sampler_seed(base_seed: int, worker: int, run_index: int) -> int:
    """The sampler seed of worker ``worker`` in the ``run_index``-th run to join a study.

    The run that starts a study (index 0) seeds worker k with base + k (modulo 2**32),
    so the same spec and seed reproduce a fresh study. A later run (a continuation, the
    continue command after Ctrl-C, a second machine) gets a seed of its own, derived from
    its index: it samples new points instead of replaying the first run's."""
    if run_index == 0:
        return (base_seed + worker) % 2**32  # samplers take 0..2**32-1: the top seed wraps
    digest = hashlib.sha256(f"dlops-sampler:{base_seed}:{worker}:{run_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def make_pruner(table: dict[str, Any]) -> optuna.pruners.BasePruner:
    """The pruner of a ``[pruner]`` table (``type`` median, percentile, hyperband,
    successive_halving or none; the other keys are the pruner's arguments)."""
    cfg = dict(table)
    kind = cfg.pop("type", "median")
    try:
        if kind == "median":
            return optuna.pruners.MedianPruner(**cfg)
        if kind == "percentile":
            return optuna.pruners.PercentilePruner(**cfg)
        if kind == "hyperband":
            return optuna.pruners.HyperbandPruner(**cfg)
        if kind == "successive_halving":
            return optuna.pruners.SuccessiveHalvingPruner(**cfg)
        return optuna.pruners.NopPruner()
    except (TypeError, ValueError) as exc:
        raise SpecError(f"[pruner]: {exc}") from None
