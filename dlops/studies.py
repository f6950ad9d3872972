"""The read side of the study storage: states, summaries, listing and describing studies.

Imports no torch and no trainer: ``dlops study list`` and ``dlops study show`` answer in
the time it takes to open the storage.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from dlops.errors import DlopsError
from dlops.run_data import positive_int, subset_of
from dlops.storage import NoStorageYet, mask_url, open_storage

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
SETTINGS_KEY = "settings"  # study user attr: the config of the run that prepared it first (its fixed settings)
DATA_KEY = "data"  # study user attr: the data its values are measured on (dlops.data.data_identity)


def state_counts(study: optuna.Study) -> dict[str, int]:
    """Trials of ``study`` by state name (every state, zeros included)."""
    counts = {s.name: 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] += 1
    return counts


def not_dlops_reason(directions: Sequence[optuna.study.StudyDirection]) -> str | None:
    """Why a study with these directions is not one dlops can read (a dlops study has one
    objective), or None."""
    if len(directions) == 1:
        return None
    return f"{len(directions)} objectives ({', '.join(d.name.lower() for d in directions)}), not a dlops study"


def require_dlops_study(study: optuna.Study) -> optuna.Study:
    """``study``, or one line saying why dlops cannot read it (a multi-objective study)."""
    reason = not_dlops_reason(study.directions)
    if reason is not None:
        raise DlopsError(f"study {study.study_name!r} has {reason} (dlops studies have one objective)")
    return study


def recorded_config(study: optuna.Study) -> dict[str, Any] | None:
    """The config a study records its trials train with: its own record (:data:`SETTINGS_KEY`),
    else (a study of an older dlops) its latest trial's; None where it records neither."""
    settings = study.user_attrs.get(SETTINGS_KEY)
    if isinstance(settings, dict):
        return settings
    configs = [t.user_attrs.get("config") for t in study.get_trials(deepcopy=False)]
    return next((c for c in reversed(configs) if isinstance(c, dict)), None)


def trains_on(study: optuna.Study) -> dict[str, Any] | None:
    """What a study's trials train on, from what it records: the dataset, its classes (those
    of the subset, where there is one), the subset (``--subset-classes``,
    ``--subset-per-class``; None for all) and the epochs a trial trains; each None where
    unrecorded, the whole None where it records none of it (a study of plain Optuna)."""
    config = recorded_config(study) or {}
    data = study.user_attrs.get(DATA_KEY)
    data = data if isinstance(data, dict) else {}
    names = (config.get("dataset"), study.user_attrs.get("dataset"), data.get("dataset"))
    dataset = next((d for d in names if isinstance(d, str) and d), None)
    if not config and dataset is None:
        return None
    subset_classes, subset_per_class = subset_of(config)
    return {
        "dataset": dataset,
        "classes": subset_classes or positive_int(data.get("classes")),
        "subset_classes": subset_classes,
        "subset_per_class": subset_per_class,
        "epochs_per_trial": positive_int(config.get("epochs")),
    }


def summarize(study: optuna.Study) -> dict[str, Any]:
    """JSON-ready summary: name, direction, metric, what it trains on (:func:`trains_on`),
    states, best trial, user attrs."""
    require_dlops_study(study)
    counts = state_counts(study)
    best = None
    try:
        b = study.best_trial
        best = {
            "number": b.number,
            "value": b.value,
            "params": b.params,
            "user_attrs": {"baseline": b.user_attrs.get("baseline", False)},
        }
    except ValueError:
        pass
    return {
        "name": study.study_name,
        "direction": study.direction.name.lower(),
        "metric": study.metric_names[0] if study.metric_names else None,
        "trains_on": trains_on(study),
        "n_trials": sum(counts.values()),
        "states": {k: v for k, v in counts.items() if v},
        "best": best,
        "user_attrs": study.user_attrs,
    }


@dataclass
class StudyResult:
    """Where a study stands when a run ends."""

    study: optuna.Study
    counts: dict[str, int]
    best: dict[str, Any] | None
    interrupted: int | None = None  # the signal that stopped the run (SIGINT 2, SIGTERM 15)
    target: int | None = None  # finished trials the study was to reach (at least, with --n-trials)
    n_trials: int | None = None  # finished trials this run was to add (--n-trials), None with --total-trials
    added: int = 0  # finished trials this run added

    @property
    def finished(self) -> int:
        return sum(self.counts.get(s.name, 0) for s in FINISHED)


def pruned_by_pruner(trial: FrozenTrial) -> bool:
    """A PRUNED trial stopped by the study's pruner (not by a non-finite loss, which dlops
    also records as PRUNED, with its reason in the ``stopped_reason`` user attr)."""
    if trial.state != TrialState.PRUNED:
        return False
    reason = str(trial.user_attrs.get("stopped_reason") or "")
    return not reason or reason.startswith("pruned after")


def _planned_epochs(trial: FrozenTrial) -> int | None:
    """The epochs a trial's recorded config planned, or None where it records none that
    makes sense (a study made by plain Optuna may hold any ``config`` attr, or none)."""
    config = trial.user_attrs.get("config")
    return positive_int(config.get("epochs")) if isinstance(config, dict) else None


@dataclass(frozen=True)
class TrialEnding:
    """How a finished trial ended, for the line ``dlops study run`` prints after it and the
    sentence its dashboard note starts with."""

    kind: str  # complete, diverged, pruned, interrupted, failed; else the state's name in lower case
    epochs: int  # epochs it trained (its history's rows, else its reported values)
    planned: int | None  # epochs its config planned
    last: float | None  # its last reported value
    reason: str  # diverged, interrupted: the recorded reason; failed: the error ('' where none is known)


def trial_ending(trial: FrozenTrial) -> TrialEnding:
    history = trial.user_attrs.get("history") or {}
    values = trial.intermediate_values
    epochs = max((len(v) for v in history.values() if isinstance(v, list)), default=len(values))
    last = values[max(values)] if values else None
    reason = str(trial.user_attrs.get("stopped_reason") or "")
    kind = trial.state.name.lower()
    if trial.state == TrialState.PRUNED and reason.startswith("non-finite"):
        kind = "diverged"
    elif trial.state == TrialState.FAIL:
        if reason.startswith("interrupted"):
            kind = "interrupted"
        else:
            kind = "failed"
            fail = str(trial.system_attrs.get("fail_reason") or "").strip()  # Optuna's, where dlops recorded none
            reason = reason.removeprefix("failed: ") or (fail.splitlines()[-1] if fail else "")
    return TrialEnding(kind, epochs, _planned_epochs(trial), last, reason)


def epochs_summary(trials: Iterable[FrozenTrial]) -> dict[str, Any] | None:
    """Epochs the finished trials trained against what the same trials would have trained
    unpruned (a trial its pruner stopped counted at its config's ``epochs``, else at the
    longest complete trial), and the epoch each pruned trial stopped after."""
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    if not finished:
        return None
    longest = max((len(t.intermediate_values) for t in finished if t.state == TrialState.COMPLETE), default=0)
    trained = unpruned = 0
    stops: dict[int, int] = {}
    for t in finished:
        n = len(t.intermediate_values)
        trained += n
        if pruned_by_pruner(t):
            unpruned += max(_planned_epochs(t) or longest, n)
            stops[t.number] = n
        else:
            unpruned += n
    return {
        "trained": trained,
        "unpruned": unpruned,
        "share": trained / unpruned if unpruned else None,
        "pruned_stop_epochs": stops,
    }


def list_studies(url: str) -> list[dict[str, Any]]:
    """One row per study in the storage ``url``: name, what it trains on (:func:`trains_on`),
    trial count, states, best value (none where its file does not exist yet; nothing is created)."""
    return study_listing(url)[0]


def study_listing(url: str) -> tuple[list[dict[str, Any]], str | None]:
    """:func:`list_studies`, and where the storage does not exist, the line that says so
    (naming the file, made absolute: a mistyped or relative ``--storage`` path is seen)."""
    try:
        storage = open_storage(url, create=False)
    except NoStorageYet as exc:
        return [], str(exc)
    return _rows(storage), None


def _rows(storage: optuna.storages.BaseStorage) -> list[dict[str, Any]]:
    rows = []
    for s in optuna.get_all_study_summaries(storage, include_best_trial=False):
        study = optuna.load_study(study_name=s.study_name, storage=storage)
        reason = not_dlops_reason(s.directions)
        if reason is not None:  # another tool's study: its counts, no single best value
            counts = state_counts(study)
            rows.append(
                {
                    "name": s.study_name,
                    "trains_on": trains_on(study),
                    "n_trials": sum(counts.values()),
                    "states": {k: v for k, v in counts.items() if v},
                    "best_value": None,
                    "note": reason,
                }
            )
            continue
        summary = summarize(study)
        rows.append(
            {
                "name": s.study_name,
                "trains_on": summary["trains_on"],
                "n_trials": summary["n_trials"],
                "states": summary["states"],
                "best_value": summary["best"]["value"] if summary["best"] else None,
            }
        )
    return rows


def _names(storage: optuna.storages.BaseStorage) -> list[str]:
    return [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]


def study_still_there(study: optuna.Study) -> bool:
    """Whether ``study`` is still in its storage, not deleted since it was opened (a study
    made again under its name counts as another one where the storage gives it a new id)."""
    try:
        return study._storage.get_study_id_from_name(study.study_name) == study._study_id
    except KeyError:
        return False


def find_study(url: str, name: str) -> optuna.Study | None:
    """The study ``name`` in the storage at ``url``, or ``None`` when there is none (also
    when the storage's file does not exist: it is not created)."""
    try:
        storage = open_storage(url, create=False)
    except NoStorageYet:
        return None
    if name not in _names(storage):
        return None
    return require_dlops_study(optuna.load_study(study_name=name, storage=storage))


def load_existing_study(name: str, url: str) -> optuna.Study:
    """The study ``name`` in the storage ``url``; one line naming the studies there if it has
    none of that name, or naming the file if the storage does not exist (nothing is created)."""
    storage = open_storage(url, create=False)
    names = _names(storage)
    if name not in names:
        raise DlopsError(f"no study named {name!r} in {mask_url(url)} (studies: {', '.join(names) or 'none'})")
    return optuna.load_study(study_name=name, storage=storage)


def describe_study(name: str, url: str) -> dict[str, Any]:
    """:func:`summarize`, the epochs trained against unpruned, and every trial (``dlops study show``)."""
    study = require_dlops_study(load_existing_study(name, url))
    info = summarize(study)
    info["epochs"] = epochs_summary(study.get_trials(deepcopy=False))
    info["trials"] = [
        {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "params": t.params,
            "epochs": len(t.intermediate_values),
            "stop_epoch": len(t.intermediate_values) if pruned_by_pruner(t) else None,
            "baseline": bool(t.user_attrs.get("baseline", False)),
            "stopped_reason": t.user_attrs.get("stopped_reason"),
            "duration_s": t.duration.total_seconds() if t.duration else None,
        }
        for t in study.get_trials(deepcopy=False)
    ]
    return info
