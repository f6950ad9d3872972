"""The Optuna side: a study from a spec, its objective, sampler, pruner and storage.

Training itself happens in the spec's trainer (``dlops.train.fit`` for ResNet18); it
calls back after every epoch and this module turns that into ``trial.report`` and,
when the pruner says so, :class:`optuna.TrialPruned`.

Every trial checkpoints each epoch under ``$DLOPS_HOME/checkpoints/<study>/trial-<n>.pt``
(``n``: the trial's number, or for a retried trial the number of the trial it retries), so
a trial whose worker died resumes where it stopped; the file goes when the trial finishes.
Workers of one study share a target count of finished trials (see :func:`run_study`).
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from dlops.data import forbid_test_split, get_dataset
from dlops.errors import DlopsError
from dlops.paths import checkpoints_dir, default_storage_url
from dlops.spec import ParamSpec, StudySpec
from dlops.storage import StudyStorage, connect
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


def suggest_params(trial: optuna.Trial, spec: StudySpec) -> dict[str, Any]:
    """A trial's values for the search space, in spec order; a conditional parameter
    (``when``) is suggested only where it is live."""
    params: dict[str, Any] = {}
    for name, p in spec.search.items():
        if p.active(params):
            params[name] = suggest(trial, p)
    return params


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
    heartbeat_interval: int | None = 60  # RDB storages (not SQLite): a dead worker's trial is
    grace_period: int | None = None  # failed and retried after grace_period s (default 2x interval)


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


class TrialInterrupted(Exception):
    """SIGINT/SIGTERM reached a trial at an epoch end: it stops there, its checkpoint stays."""


def checkpoint_path(study_name: str, trial_key: int) -> Path:
    return checkpoints_dir() / re.sub(r"[^A-Za-z0-9._-]", "_", study_name) / f"trial-{trial_key}.pt"


def remove_checkpoint(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".tmp")):
        p.unlink(missing_ok=True)
    try:
        path.parent.rmdir()  # the study's folder, once its last trial is done
    except OSError:
        pass


_RESUME_IGNORES = {"device", "eval_batch_size", "data_root"}  # may differ between machines; results do not


def checkpointed_epochs(path: Path, config: Any) -> int | None:
    """Epochs saved in the checkpoint at ``path`` (None without a usable one). A checkpoint
    written for another configuration (a deleted study of the same name) is removed."""
    if not path.exists():
        return None
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # noqa: BLE001 - not ours to judge: the trainer loads (or rejects) it
        return None
    if not isinstance(state, dict):
        return None
    saved, now = state.get("config"), getattr(config, "to_dict", lambda: None)()
    if isinstance(saved, dict) and isinstance(now, dict):
        if any(saved.get(k) != now.get(k) for k in set(saved) | set(now) if k not in _RESUME_IGNORES):
            remove_checkpoint(path)
            return None
    epoch = state.get("epoch")
    return int(epoch) + 1 if isinstance(epoch, int) else 0


def make_objective(
    spec: StudySpec,
    options: RunOptions,
    on_epoch: EpochCallback | None = None,
    *,
    stop: Any = None,
    on_trial_start: Callable[[optuna.Trial], None] | None = None,
    say: Callable[[str], None] | None = None,
) -> Callable[[optuna.Trial], float]:
    """The objective of ``spec``. ``on_trial_start(trial)`` runs first (the worker loop
    records the trial's owner there); ``stop.requested`` ends a trial at its next epoch."""
    trainer = get_trainer(spec.trainer)

    def objective(trial: optuna.Trial) -> float:
        # A retry (RetryHeartbeatStaleTrialCallback, or dlops after a dead worker or a
        # signal) carries the original number: it trains with that trial's seed and resumes
        # from that trial's checkpoint.
        origin = trial.storage.get_trial_system_attrs(trial._trial_id).get("failed_trial")
        key = trial.number if origin is None else int(origin)
        if on_trial_start is not None:
            on_trial_start(trial)
        params = suggest_params(trial, spec)
        config = trial_config(spec, options, params, key)
        trial.set_user_attr("config", config.to_dict())
        for inherited in ("stopped_reason", "resumed_from"):  # copied from the failed trial by a retry
            if trial.user_attrs.get(inherited) is not None:
                trial.set_user_attr(inherited, None)
        ckpt = checkpoint_path(trial.study.study_name, key)
        resumed = checkpointed_epochs(ckpt, config)
        if resumed is not None:
            trial.set_user_attr("resumed_from", {"trial": key, "epoch": resumed})
            if say is not None:
                say(f"trial {trial.number} retries trial {key}: resuming from its checkpoint ({resumed} epoch(s) done)")
        last_epoch = getattr(config, "epochs", None)
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
            if stop is not None and stop.requested and (last_epoch is None or epoch + 1 < last_epoch):
                _INTERRUPTED_LOG.numbers.add(trial.number)
                trial.set_user_attr("stopped_reason", f"interrupted after epoch {epoch + 1}; queued again to resume "
                                                      "from its checkpoint")
                raise TrialInterrupted(f"interrupted after epoch {epoch + 1}")

        keep_checkpoint = False
        try:
            result = trainer.fit(config, report=report, checkpoint_path=ckpt)
        except NonFiniteLossError as exc:
            # A diverging lr is a result about the search space, not a crash: prune, so
            # the sampler learns from it and the study goes on.
            trial.set_user_attr("stopped_reason", str(exc))
            raise optuna.TrialPruned(str(exc)) from None
        except (TrialInterrupted, KeyboardInterrupt):
            keep_checkpoint = True  # the retry resumes from it
            raise
        finally:
            if not keep_checkpoint:
                remove_checkpoint(ckpt)
        trial.set_user_attr("history", json_safe(result.history))
        # A trainer may hand over more per-trial results (the autoencoder's layer curves).
        for key, value in getattr(result, "extra_user_attrs", {}).items():
            trial.set_user_attr(key, value)
        return float(result.metrics[spec.metric])

    return objective


def open_study(spec: StudySpec, options: RunOptions, storage: StudyStorage | None = None, worker: int = 0) -> optuna.Study:
    """Create or load the study. Worker ``k`` of a many-worker run seeds its sampler with
    seed + k, so workers do not propose the same random start-up trials."""
    storage = storage or connect(options.storage or default_storage_url())
    base_seed = options.seed if options.seed is not None else spec.sampler.get("seed", 0)
    study = optuna.create_study(
        study_name=options.study_name or spec.name,
        storage=storage.optuna,
        sampler=make_sampler(spec, base_seed + worker),
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


class _InterruptedTrialLog(logging.Filter):
    """Optuna logs a failed trial with its traceback; an interrupted trial is no error."""

    def __init__(self) -> None:
        super().__init__()
        self.numbers: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(msg.startswith(f"Trial {n} failed") for n in self.numbers)


_INTERRUPTED_LOG = _InterruptedTrialLog()
logging.getLogger("optuna.study._optimize").addFilter(_INTERRUPTED_LOG)


class _TrialGate:
    """Holds the study lock from "how many trials are left?" until the new trial is RUNNING
    and carries its owner (the objective's first step): workers never start more trials
    than asked for, and no RUNNING trial is ever seen without its owner."""

    def __init__(self) -> None:
        from dlops.workers import worker_identity

        self.identity = worker_identity()
        self.lock: Any = None
        self.trial_number: int | None = None
        self.trial_id: int | None = None

    def __call__(self, trial: optuna.Trial) -> None:
        from dlops.workers import OWNER_KEY

        trial.storage.set_trial_system_attr(trial._trial_id, OWNER_KEY, self.identity)
        self.trial_number, self.trial_id = trial.number, trial._trial_id
        if self.lock is not None:
            self.lock.release()
            self.lock = None


@dataclass
class StudyResult:
    study: optuna.Study
    counts: dict[str, int]
    best: dict[str, Any] | None
    interrupted: int | None = None  # the signal that stopped the run (SIGINT 2, SIGTERM 15)
    target: int | None = None  # finished trials the study was to reach

    @property
    def finished(self) -> int:
        return sum(self.counts.get(s.name, 0) for s in FINISHED)


def check_run(spec: StudySpec, options: RunOptions) -> None:
    """Check the configuration and the data before touching storage."""
    config = trial_config(spec, options, spec.baseline_params(), 0)
    if getattr(config, "dataset", None):
        get_dataset(config.dataset, Path(config.data_root) if getattr(config, "data_root", None) else None)


def check_same_objective(study: optuna.Study, spec: StudySpec, options: RunOptions) -> None:
    """One study, one objective: a run never adds trials of another dataset or metric to
    an existing study (their values would not compare)."""
    dataset = options.dataset or spec.train.get("dataset")
    ran_on, metric = study.user_attrs.get("dataset"), (study.metric_names or [None])[0]
    if ran_on is not None and dataset is not None and ran_on != dataset:
        raise DlopsError(f"study {study.study_name!r} ran on {ran_on}, not {dataset}: give this run another --study-name")
    if metric is not None and metric != spec.metric:
        raise DlopsError(f"study {study.study_name!r} optimises {metric}, this run {spec.metric}: "
                         "give this run another --study-name")


def prepare_study(study: optuna.Study, spec: StudySpec, options: RunOptions) -> bool:
    """Labels, and the baseline as trial 0 of a new study. Run under the study lock, so
    workers starting at once enqueue one baseline. Returns whether the study was new."""
    new = not study.get_trials(deepcopy=False)
    dataset = options.dataset or spec.train.get("dataset")
    if new:  # checkpoints left by a deleted study of the same name are not this study's
        shutil.rmtree(checkpoint_path(study.study_name, 0).parent, ignore_errors=True)
    else:
        check_same_objective(study, spec, options)
    if study.metric_names != [spec.metric]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([spec.metric])
    attrs = study.user_attrs
    for key, value in (("spec", spec.name), ("trainer", spec.trainer), ("dataset", dataset)):
        if attrs.get(key) != value:
            study.set_user_attr(key, value)
    enqueue_baseline(study, spec)
    return new


def study_counts_line(name: str, storage: StudyStorage, counts: dict[str, int], n_trials: int, target: int,
                      workers: int = 1) -> str:
    """Where a study stands when a run (re)joins it."""
    if not any(counts.values()):
        head = f"study {name}: new, in {storage.masked}"
    else:
        head = (f"study {name} in {storage.masked}: {counts.get('COMPLETE', 0)} complete, {counts.get('PRUNED', 0)} pruned, "
                f"{counts.get('FAIL', 0)} failed, {counts.get('RUNNING', 0)} running, {counts.get('WAITING', 0)} waiting")
    tail = f"; this run adds {n_trials} finished trials (until {target} finished)"
    return head + tail + (f" with {workers} workers" if workers > 1 else "")


def _sleep(seconds: float, stop: Any) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and not stop.requested:
        time.sleep(0.1)


def _run_trials(study: optuna.Study, storage: StudyStorage, objective: Callable[[optuna.Trial], float],
                gate: _TrialGate, *, target: int, max_failures: int, timeout: float | None, stop: Any,
                say: Callable[[str], None], gc_after_trial: bool = True) -> None:
    """One worker's loop: under the study lock, recover trials of dead workers, then start
    a trial only while finished + running < target. When the rest of the target is running
    in other workers, wait for them where they can still end (alive here, or heartbeats)."""
    from dlops.workers import recover_dead_trials, retry_trial, worth_waiting_for

    started, failures, waiting = time.monotonic(), 0, False
    while not stop.requested:
        if timeout is not None and time.monotonic() - started >= timeout:
            say(f"timeout ({timeout:g}s): starting no more trials")
            break
        gate.trial_number = None
        lock = storage.lock(study.study_name)
        lock.acquire()
        try:
            trials = study.get_trials(deepcopy=False)
            if recover_dead_trials(study, storage, say, trials):
                trials = study.get_trials(deepcopy=False)
            finished = sum(t.state in FINISHED for t in trials)
            running = [t for t in trials if t.state == TrialState.RUNNING]
            if finished >= target:
                break
            if finished + len(running) >= target:
                if not any(worth_waiting_for(t, storage) for t in running):
                    say(f"{len(running)} trial(s) RUNNING whose workers cannot be checked from here "
                        "(another machine, journal storage); not waiting for them")
                    break
                lock.release()
                if not waiting:
                    say(f"waiting for {len(running)} running trial(s) of other workers to reach {target} finished")
                    waiting = True
                _sleep(1.0, stop)
                continue
            waiting = False
            gate.lock = lock
            study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=gc_after_trial)
        except KeyboardInterrupt:
            stop.signum = stop.signum or 2  # a second signal: the trial stopped at once
        finally:
            gate.lock = None
            lock.release()
        if gate.trial_number is None:
            continue
        trial = storage.optuna.get_trial(gate.trial_id)
        if trial.state == TrialState.FAIL:
            if stop.requested:
                retry_trial(study, trial, max_retry=None)  # resumes from its checkpoint next run
                break
            failures += 1
            if failures >= max_failures:
                say(f"{failures} trials failed in this run; giving up (see `dlops study show {study.study_name}`)")
                break


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


def run_study(
    spec: StudySpec,
    options: RunOptions,
    on_epoch: EpochCallback | None = None,
    *,
    say: Callable[[str], None] | None = None,
    target: int | None = None,
    worker: int = 0,
    workers: int = 1,
    announce: bool = True,
    label: str = "",
) -> StudyResult:
    """Run ``n_trials`` more finished trials (COMPLETE or PRUNED) of ``spec``'s study, or,
    for a worker of a many-worker run, work until the study has ``target`` finished trials.

    SIGINT/SIGTERM stop the current trial at its next epoch end (recorded FAIL, queued
    again to resume from its checkpoint); ``StudyResult.interrupted`` says which signal.
    The test split is off limits inside: any read raises.
    """
    from dlops.workers import GracefulStop, failure_budget

    say = say or (lambda msg: None)
    spec = spec.for_dataset(options.dataset)
    check_run(spec, options)
    storage = connect(options.storage or default_storage_url(), heartbeat_interval=options.heartbeat_interval,
                      grace_period=options.grace_period)
    study = open_study(spec, options, storage, worker)
    with storage.lock(study.study_name):
        counts = state_counts(study)  # where the study stood on (re)joining
        prepare_study(study, spec, options)
    n_trials = options.n_trials or spec.n_trials
    if target is None:
        target = sum(counts[s.name] for s in FINISHED) + n_trials
    if announce:
        say(study_counts_line(study.study_name, storage, counts, n_trials, target, workers))
    gate = _TrialGate()
    with forbid_test_split(), warnings.catch_warnings(), GracefulStop(label) as stop:
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        objective = make_objective(spec, options, on_epoch, stop=stop, on_trial_start=gate, say=say)
        _run_trials(study, storage, objective, gate, target=target, max_failures=failure_budget(n_trials, workers),
                    timeout=options.timeout if options.timeout is not None else spec.timeout, stop=stop, say=say)
    return StudyResult(study=study, counts=state_counts(study), best=summarize(study)["best"],
                       interrupted=stop.signum, target=target)
