"""The Optuna side: a study from a spec, its objective, sampler, pruner and storage.

Training itself happens in the spec's trainer (``dlops.train.fit`` for ResNet18); it
calls back after every epoch and this module turns that into ``trial.report`` and,
when the pruner says so, :class:`optuna.TrialPruned`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from dlops.data import forbid_test_split, get_dataset
from dlops.errors import DlopsError
from dlops.paths import default_storage_url
from dlops.spec import ParamSpec, StudySpec
from dlops.storage import open_storage
from dlops.trainers import get_trainer
from dlops.train import NonFiniteLossError

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

EpochCallback = Callable[[int, int, dict[str, float]], None]  # (trial number, epoch, metrics)


def make_sampler(spec: StudySpec, seed: int | None = None) -> optuna.samplers.BaseSampler:
    cfg = spec.sampler
    seed = cfg.get("seed", 0) if seed is None else seed
    if cfg.get("type", "tpe") == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    kwargs = {"n_startup_trials": cfg["n_startup_trials"]} if "n_startup_trials" in cfg else {}
    return optuna.samplers.TPESampler(seed=seed, **kwargs)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    cfg = dict(spec.pruner)
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
    except TypeError as exc:
        raise DlopsError(f"[pruner] of {spec.name}: {exc}") from None


def suggest(trial: optuna.Trial, p: ParamSpec) -> Any:
    if p.type == "float":
        return trial.suggest_float(p.name, p.low, p.high, log=p.log, step=p.step)
    if p.type == "int":
        return trial.suggest_int(p.name, int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
    return trial.suggest_categorical(p.name, list(p.choices))


def json_safe(history: dict[str, list[float]]) -> dict[str, list[float | None]]:
    """NaN is not JSON (the dashboard could not parse it): store it as null."""
    return {k: [None if isinstance(v, float) and not math.isfinite(v) else v for v in vs] for k, vs in history.items()}


@dataclass
class RunOptions:
    """What ``dlops study run`` may override in a spec."""

    dataset: str | None = None
    n_trials: int | None = None
    timeout: float | None = None
    epochs: int | None = None
    storage: str | None = None
    study_name: str | None = None
    seed: int | None = None
    device: str | None = None
    train_overrides: dict[str, Any] = field(default_factory=dict)


def trial_config(spec: StudySpec, options: RunOptions, params: dict[str, Any], trial_number: int) -> Any:
    """The config of one trial: the spec, the dataset override, the trial's params, and
    a per-trial seed (base seed + trial number, so reruns reproduce each trial)."""
    base_seed = options.seed if options.seed is not None else spec.sampler.get("seed", 0)
    return spec.config(
        options.dataset,
        params,
        epochs=options.epochs,
        device=options.device,
        seed=base_seed + trial_number,
        **options.train_overrides,
    )


def make_objective(
    spec: StudySpec, options: RunOptions, on_epoch: EpochCallback | None = None
) -> Callable[[optuna.Trial], float]:
    trainer = get_trainer(spec.trainer)

    def objective(trial: optuna.Trial) -> float:
        params = {name: suggest(trial, p) for name, p in spec.search.items()}
        config = trial_config(spec, options, params, trial.number)
        trial.set_user_attr("config", config.to_dict())
        history_so_far: dict[str, list[float]] = {}

        def report(epoch: int, metrics: dict[str, float]) -> None:
            for k, v in metrics.items():
                history_so_far.setdefault(k, []).append(v)
            trial.set_user_attr("history", json_safe(history_so_far))
            if on_epoch is not None:
                on_epoch(trial.number, epoch, metrics)
            value = metrics[spec.metric]
            trial.report(value, epoch)
            if trial.should_prune():
                trial.set_user_attr("stopped_reason", f"pruned after epoch {epoch} ({spec.metric}={value:.4f})")
                raise optuna.TrialPruned()

        try:
            result = trainer.fit(config, report=report)
        except NonFiniteLossError as exc:
            # A diverging lr is a result about the search space, not a crash: prune, so
            # the sampler learns from it and the study goes on.
            trial.set_user_attr("stopped_reason", str(exc))
            raise optuna.TrialPruned(str(exc)) from None
        trial.set_user_attr("history", json_safe(result.history))
        return float(result.metrics[spec.metric])

    return objective


def open_study(spec: StudySpec, options: RunOptions) -> optuna.Study:
    storage = open_storage(options.storage or default_storage_url())
    study = optuna.create_study(
        study_name=options.study_name or spec.name,
        storage=storage,
        sampler=make_sampler(spec, options.seed),
        pruner=make_pruner(spec),
        direction=spec.direction,
        load_if_exists=True,
    )
    return study


def enqueue_baseline(study: optuna.Study, spec: StudySpec) -> bool:
    """Make the baseline trial 0 of a new study. Returns whether it was enqueued."""
    if study.get_trials(deepcopy=False):
        return False
    study.enqueue_trial(spec.baseline_params(), user_attrs={"baseline": True})
    return True


def state_counts(study: optuna.Study) -> dict[str, int]:
    counts = {s.name: 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] += 1
    return counts


class _StopAt:
    """Stop once the study has ``target`` finished trials, or after ``max_failures``
    failed trials in this run (a broken setup should not loop forever)."""

    def __init__(self, target: int, max_failures: int):
        self.target, self.max_failures, self.failures = target, max_failures, 0

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == TrialState.FAIL:
            self.failures += 1
        finished = len(study.get_trials(deepcopy=False, states=FINISHED))
        if finished >= self.target or self.failures >= self.max_failures:
            study.stop()


@dataclass
class StudyResult:
    study: optuna.Study
    counts: dict[str, int]
    best: dict[str, Any] | None


def summarize(study: optuna.Study) -> dict[str, Any]:
    """JSON-ready summary: name, direction, states, best trial."""
    counts = state_counts(study)
    best = None
    try:
        b = study.best_trial
        best = {"number": b.number, "value": b.value, "params": b.params, "user_attrs": {"baseline": b.user_attrs.get("baseline", False)}}
    except ValueError:
        pass
    return {
        "name": study.study_name,
        "direction": study.direction.name.lower(),
        "metric": (study.metric_names or [None])[0],
        "n_trials": sum(counts.values()),
        "states": {k: v for k, v in counts.items() if v},
        "best": best,
        "user_attrs": study.user_attrs,
    }


def run_study(spec: StudySpec, options: RunOptions, on_epoch: EpochCallback | None = None) -> StudyResult:
    """Run ``n_trials`` more finished trials (COMPLETE or PRUNED) of ``spec``'s study.

    The test split is off limits inside: any read raises.
    """
    # Check the configuration and the data before touching storage.
    config = trial_config(spec, options, spec.baseline_params(), 0)
    if getattr(config, "dataset", None):
        get_dataset(config.dataset, Path(config.data_root) if getattr(config, "data_root", None) else None)
    study = open_study(spec, options)
    study.set_metric_names([spec.metric])
    study.set_user_attr("spec", spec.name)
    study.set_user_attr("trainer", spec.trainer)
    study.set_user_attr("dataset", options.dataset or spec.train.get("dataset"))
    enqueue_baseline(study, spec)
    n_trials = options.n_trials or spec.n_trials
    already = len(study.get_trials(deepcopy=False, states=FINISHED))
    stop = _StopAt(already + n_trials, max_failures=n_trials)
    with forbid_test_split(), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.optimize(
            make_objective(spec, options, on_epoch),
            timeout=options.timeout if options.timeout is not None else spec.timeout,
            callbacks=[stop],
            catch=(Exception,),
            gc_after_trial=True,
        )
    return StudyResult(study=study, counts=state_counts(study), best=summarize(study)["best"])
