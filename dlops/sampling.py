"""The sampler and the pruner that a spec's ``[sampler]`` and ``[pruner]`` tables name.

Kept apart from the objective so that the spec loader can build (and so check) a pruner
when it loads a spec, and the pruning replay can build one, without importing a trainer.
"""

from __future__ import annotations

import hashlib
import inspect
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


PRUNER_CLASSES: dict[str, type[optuna.pruners.BasePruner]] = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "none": optuna.pruners.NopPruner,
}


def pruner_keys(kind: str) -> list[str]:
    """The settings a pruner of type ``kind`` takes (its Optuna class's arguments)."""
    return [name for name in inspect.signature(PRUNER_CLASSES[kind]).parameters if name != "self"]


def make_pruner(table: dict[str, Any]) -> optuna.pruners.BasePruner:
    """The pruner of a ``[pruner]`` table (``type`` median, percentile, hyperband,
    successive_halving or none; the other keys are the pruner's arguments). A key the
    type does not take is refused (``none`` takes none), not ignored."""
    cfg = dict(table)
    kind = cfg.pop("type", "median")
    if not isinstance(kind, str) or kind not in PRUNER_CLASSES:
        raise SpecError(f"[pruner]: unknown type {kind!r} ({', '.join(sorted(PRUNER_CLASSES))})")
    allowed = pruner_keys(kind)
    unknown = sorted(set(cfg) - set(allowed))
    if unknown:
        takes = f"takes {', '.join(allowed)}" if allowed else "takes no settings"
        raise SpecError(f"[pruner]: type {kind} does not take {unknown[0]!r} ({takes})")
    try:
        return PRUNER_CLASSES[kind](**cfg)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"[pruner]: {exc}") from None
