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


def _whole(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _check_hyperband(cfg: dict[str, Any]) -> None:
    """Optuna's HyperbandPruner checks its settings only when it first prunes, inside a
    trial (``max_resource = 0`` is a math domain error, ``reduction_factor = 1`` a division
    by zero): every trial would fail. Checked here, once, in one line."""
    low = cfg.get("min_resource", 1)
    if not _whole(low, 1):
        raise SpecError(f"[pruner]: hyperband min_resource = {low!r} should be an integer >= 1")
    high = cfg.get("max_resource", "auto")
    if high != "auto" and not _whole(high, low):
        raise SpecError(
            f"[pruner]: hyperband max_resource = {high!r} should be 'auto' or an integer >= min_resource ({low})"
        )
    factor = cfg.get("reduction_factor", 3)
    if not _whole(factor, 2):
        raise SpecError(f"[pruner]: hyperband reduction_factor = {factor!r} should be an integer >= 2")
    count = cfg.get("bootstrap_count", 0)
    if not _whole(count, 0):
        raise SpecError(f"[pruner]: hyperband bootstrap_count = {count!r} should be an integer >= 0")


# The settings of the other pruners that are whole numbers (Optuna compares them with
# ``<`` and counts with them: a string was "'<' not supported between instances of 'str'
# and 'int'", a 1.5 or a true was taken as it is). Their ranges Optuna checks itself.
_WHOLE_SETTINGS = {
    "median": ("n_startup_trials", "n_warmup_steps", "interval_steps", "n_min_trials"),
    "percentile": ("n_startup_trials", "n_warmup_steps", "interval_steps", "n_min_trials"),
    "successive_halving": ("min_resource", "reduction_factor", "min_early_stopping_rate", "bootstrap_count"),
}


def _check_types(kind: str, cfg: dict[str, Any]) -> None:
    """Every setting of a median, percentile or successive-halving pruner of its type, and
    the ones it needs there, in one line naming the setting (Optuna's own messages for
    these are about Python: a missing argument, two types that cannot be compared)."""
    required = [
        name
        for name, p in inspect.signature(PRUNER_CLASSES[kind]).parameters.items()
        if p.default is inspect.Parameter.empty and name not in cfg
    ]
    if required:
        raise SpecError(f"[pruner]: {kind} needs the setting {required[0]} (a number from 0 to 100)")
    for key in _WHOLE_SETTINGS.get(kind, ()):
        value = cfg.get(key, 0)
        if kind == "successive_halving" and key == "min_resource" and value == "auto":
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            also = " or 'auto'" if kind == "successive_halving" and key == "min_resource" else ""
            raise SpecError(f"[pruner]: {kind} {key} = {value!r} should be an integer{also}")
    if kind == "percentile":
        value = cfg["percentile"]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"[pruner]: percentile percentile = {value!r} should be a number from 0 to 100")


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
    if kind == "hyperband":
        _check_hyperband(cfg)
    else:
        _check_types(kind, cfg)
    try:
        return PRUNER_CLASSES[kind](**cfg)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"[pruner]: {exc}") from None
