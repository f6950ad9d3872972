"""The Optuna side: a study from a spec, its objective, sampler, pruner and storage.

Training itself happens in the spec's trainer (``dlops.trainers.resnet`` for ResNet18); it
calls back after every epoch and this module turns that into ``trial.report`` and,
when the pruner says so, :class:`optuna.TrialPruned`.

Every trial checkpoints each epoch under ``$DLOPS_HOME/checkpoints/<study>-<hash>/trial-<n>.pt``
(``n``: the trial's number, or for a retried trial the number of the trial it retries), so
a trial whose worker died resumes where it stopped; the file goes when the trial finishes.
A checkpoint that does not load or fails its checksum is discarded with a warning.
A run (one ``dlops study run``, all its workers) adds ``--n-trials`` finished trials of its
own, or works until the study has ``--total-trials``; each run that joins a study gets a
number that seeds its sampler (see :func:`run_study`, :func:`sampler_seed`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from dlops.data import forbid_test_split, get_dataset
from dlops.errors import DlopsError, SpecError
from dlops.io import CorruptCheckpoint, json_safe, load_checkpoint
from dlops.paths import checkpoints_dir, default_storage_url, folder_name
from dlops.spec import ParamSpec, StudySpec
from dlops.storage import StudyStorage, connect
from dlops.text import plural
from dlops.trainers import get_trainer
from dlops.trainers.base import NonFiniteLossError, config_matches, resolve_device

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
RUN_FIELD = "run"  # in a trial's owner (workers.OWNER_KEY): the run (one `dlops study run`, all its workers)
RUNS_KEY = "dlops:runs"  # study system attr: how many runs have joined the study

EpochCallback = Callable[[int, int, dict[str, float]], None]  # (trial number, epoch, metrics)


def make_sampler(spec: StudySpec, seed: int | None = None) -> optuna.samplers.BaseSampler:
    cfg = spec.sampler
    seed = cfg.get("seed", 0) if seed is None else seed
    if cfg.get("type", "tpe") == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    kwargs = {"n_startup_trials": cfg["n_startup_trials"]} if "n_startup_trials" in cfg else {}
    return optuna.samplers.TPESampler(seed=seed, **kwargs)


def sampler_seed(base_seed: int, worker: int, run_index: int) -> int:
    """The sampler seed of worker ``worker`` in the ``run_index``-th run to join a study.

    The run that starts a study (index 0) seeds worker k with base + k, so the same spec
    and seed reproduce a fresh study. A later run (a continuation, the continue command
    after Ctrl-C, a second machine) gets a seed of its own, derived from its index: it
    samples new points instead of replaying the first run's."""
    if run_index == 0:
        return base_seed + worker
    digest = hashlib.sha256(f"dlops-sampler:{base_seed}:{worker}:{run_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def join_run(study: optuna.Study, storage: StudyStorage) -> int:
    """Count this run among those that joined ``study`` and return its index (0: the run
    that started it). Call under the study lock: runs joining at once get distinct indexes."""
    store = storage.optuna
    attrs = store.get_study_system_attrs(study._study_id)
    if RUNS_KEY in attrs:
        index = int(attrs[RUNS_KEY])
    else:  # a study from before this count: any run with trials there is not its first
        index = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                             TrialState.FAIL, TrialState.RUNNING)))
    store.set_study_system_attr(study._study_id, RUNS_KEY, index + 1)
    return index


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
    except (TypeError, ValueError) as exc:
        raise SpecError(f"[pruner]: {exc}") from None


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
    total_trials: int | None = None  # stop once the study has this many finished trials (all runs)

    def study_name_for(self, spec: StudySpec) -> str:
        return self.study_name or spec.study_name(self.dataset)


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
    """The checkpoint of trial ``trial_key``: one folder per exact study name (a slug and a
    hash, so ``a/b`` and ``a_b`` never share one)."""
    return checkpoints_dir() / folder_name(study_name) / f"trial-{trial_key}.pt"


def remove_checkpoint(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".tmp")):
        p.unlink(missing_ok=True)
    try:
        path.parent.rmdir()  # the study's folder, once its last trial is done
    except OSError:
        pass


def checkpointed_epochs(path: Path, config: Any, say: Callable[[str], None] | None = None) -> int | None:
    """Epochs saved in the checkpoint at ``path`` (None without a usable one). A checkpoint
    written for another configuration (a deleted study of the same name) is removed; so is
    one that does not load or fails its checksum, with a warning through ``say``: the
    trial then trains from epoch 0."""
    if not path.exists():
        return None
    try:
        state = load_checkpoint(path)
    except CorruptCheckpoint as exc:
        remove_checkpoint(path)
        message = f"{exc}: discarded, the trial trains from epoch 0"
        if say is not None:
            say(message)
        else:
            logging.getLogger("dlops").warning(message)
        return None
    if not isinstance(state, dict):
        return None
    saved, now = state.get("config"), getattr(config, "to_dict", lambda: None)()
    if isinstance(saved, dict) and isinstance(now, dict):
        if not config_matches(saved, now):
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
        resumed = checkpointed_epochs(ckpt, config, say)
        if resumed is not None:
            trial.set_user_attr("resumed_from", {"trial": key, "epoch": resumed})
            if say is not None:
                say(f"trial {trial.number} retries trial {key}: resuming from its checkpoint ({plural(resumed, 'epoch')} done)")
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

        # A trainer's own progress lines (the autoencoder's pretraining epochs), per trial.
        progress = None if say is None else lambda line: say(f"trial {trial.number:>3}  {line}")
        keep_checkpoint = False
        try:
            result = trainer.fit(config, report=report, checkpoint_path=ckpt, progress=progress)
        except NonFiniteLossError as exc:
            # A diverging lr is a result about the search space, not a crash: prune, so
            # the sampler learns from it and the study goes on.
            trial.set_user_attr("stopped_reason", str(exc))
            raise optuna.TrialPruned(str(exc)) from None
        except optuna.TrialPruned as exc:
            # A pruned trial keeps what the trainer hands over with the exception (the
            # autoencoder's layer curves).
            for key, value in getattr(exc, "extra_user_attrs", {}).items():
                trial.set_user_attr(key, value)
            raise
        except (TrialInterrupted, KeyboardInterrupt):
            keep_checkpoint = True  # the retry resumes from it
            raise
        except DlopsError as exc:  # a full disk, a damaged file: the trial fails with one line
            trial.set_user_attr("stopped_reason", str(exc))
            raise
        finally:
            if not keep_checkpoint:
                remove_checkpoint(ckpt)
        trial.set_user_attr("history", json_safe(result.history))
        # A trainer may hand over more per-trial results (the autoencoder's layer curves).
        for key, value in result.extra_user_attrs.items():
            trial.set_user_attr(key, value)
        return float(result.metrics[spec.metric])

    return objective


def open_study(spec: StudySpec, options: RunOptions, storage: StudyStorage | None = None, worker: int = 0) -> optuna.Study:
    """Create or load the study. Worker ``k`` of a many-worker run seeds its sampler with
    seed + k, so workers do not propose the same random start-up trials."""
    storage = storage or connect(options.storage or default_storage_url())
    base_seed = options.seed if options.seed is not None else spec.sampler.get("seed", 0)
    study = optuna.create_study(
        study_name=options.study_name_for(spec),
        storage=storage.optuna,
        sampler=make_sampler(spec, base_seed + worker),
        pruner=make_pruner(spec),
        direction=spec.direction,
        load_if_exists=True,
    )
    return study


BASELINE_ATTR = "baseline"  # user attr of a baseline trial (a retried copy inherits it)


def enqueue_baseline(study: optuna.Study, spec: StudySpec, trials: list[Any] | None = None) -> bool:
    """Queue the baseline: trial 0 of a new study, and again while no baseline trial is
    complete, pruned, running or waiting (every one so far failed: a full disk, a bad
    checkpoint). Run under the study lock. Returns whether it was enqueued."""
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    if any(t.user_attrs.get(BASELINE_ATTR) and t.state != TrialState.FAIL for t in trials):
        return False
    study.enqueue_trial(spec.baseline_params(), user_attrs={BASELINE_ATTR: True})
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


class _UserErrorLog(logging.Filter):
    """A trial failed by a DlopsError (bad input, missing data): its line, not a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], DlopsError):
            record.exc_info, record.exc_text = None, None
        return True


_INTERRUPTED_LOG = _InterruptedTrialLog()
logging.getLogger("optuna.study._optimize").addFilter(_INTERRUPTED_LOG)
logging.getLogger("optuna.study._optimize").addFilter(_UserErrorLog())


class _TrialGate:
    """Holds the study lock from "how many trials are left?" until the new trial is RUNNING
    and carries its owner (the objective's first step): workers never start more trials
    than asked for, and no RUNNING trial is ever seen without its owner."""

    def __init__(self, run_id: str | None = None) -> None:
        from dlops.workers import worker_identity

        self.run_id = run_id or uuid.uuid4().hex
        self.identity = {**worker_identity(), RUN_FIELD: self.run_id}
        self.lock: Any = None
        self.trial_number: int | None = None
        self.trial_id: int | None = None
        self.last_error: BaseException | None = None  # of the last trial that failed

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
    target: int | None = None  # finished trials the study was to reach (at least, with --n-trials)
    n_trials: int | None = None  # finished trials this run was to add (--n-trials), None with --total-trials
    added: int = 0  # finished trials this run added

    @property
    def finished(self) -> int:
        return sum(self.counts.get(s.name, 0) for s in FINISHED)


def failure_reason(exc: BaseException) -> str:
    """An exception as one short line: its message (with its type unless it is a DlopsError)."""
    text = (str(exc).strip().splitlines() or [""])[0][:300]
    if isinstance(exc, DlopsError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def last_failure(study: optuna.Study, run_id: str) -> str | None:
    """The reason of the latest failed trial of the run ``run_id``."""
    failed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
              if of_run(t, run_id) and str(t.user_attrs.get("stopped_reason") or "").startswith("failed: ")]
    if not failed:
        return None
    return max(failed, key=lambda t: t.datetime_complete or t.datetime_start).user_attrs["stopped_reason"][len("failed: "):]


class TrialsFailed(DlopsError):
    """A run gave up after too many failed trials: a broken setup must not loop, nor exit 0."""


def of_run(trial: Any, run_id: str) -> bool:
    """Whether ``trial`` ran (or runs) in the run ``run_id``: its owner names the run."""
    from dlops.workers import OWNER_KEY

    return (trial.system_attrs.get(OWNER_KEY) or {}).get(RUN_FIELD) == run_id


def run_trials_finished(study: optuna.Study, run_id: str) -> int:
    """Finished trials of the run ``run_id`` (all its workers)."""
    return sum(t.state in FINISHED and of_run(t, run_id) for t in study.get_trials(deepcopy=False))


def check_run(spec: StudySpec, options: RunOptions) -> StudySpec:
    """Check everything a run needs before any storage, study or file is touched: the
    config, the device, the dataset and its class count. Returns the spec as it runs: on
    5 classes or fewer a top-5 objective is always 1.0, so such a study optimises top-1."""

    spec = spec.for_dataset(options.dataset)
    config = trial_config(spec, options, spec.baseline_params(), 0)
    resolve_device(getattr(config, "device", None) or "auto")
    if not getattr(config, "dataset", None):
        return spec
    ds = get_dataset(config.dataset, Path(config.data_root) if getattr(config, "data_root", None) else None)
    classes = ds.num_classes
    subset = getattr(config, "subset_classes", None)
    if subset is not None:
        if not 1 <= subset <= classes:
            raise DlopsError(f"--subset-classes {subset}: {ds.name} has {classes} classes")
        classes = subset
    if spec.metric == "val_top5" and classes <= 5:
        spec = dataclasses.replace(spec, metric="val_top1", dataset_metrics={**spec.dataset_metrics,
                                                                             config.dataset: "val_top1"})
    return spec


def objective_note(asked: StudySpec, runs: StudySpec) -> str | None:
    """What to say when :func:`check_run` changed the objective (``asked``: the spec as given)."""
    if asked.metric == runs.metric:
        return None
    return (f"{asked.metric} is always 1.0 with 5 classes or fewer: this study optimises {runs.metric} instead "
            "(6 or more classes keep top-5)")


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


def study_counts_line(name: str, storage: StudyStorage, counts: dict[str, int], n_trials: int | None,
                      target: int | None = None, workers: int = 1, total: int | None = None) -> str:
    """Where a study stands when a run (re)joins it, and when this run stops: after adding
    ``n_trials`` finished trials of its own (other runs' trials do not count), or once the
    study has ``total`` finished trials whoever runs them."""
    if not any(counts.values()):
        head = f"study {name}: new, in {storage.masked}"
    else:
        head = (f"study {name} in {storage.masked}: {counts.get('COMPLETE', 0)} complete, {counts.get('PRUNED', 0)} pruned, "
                f"{counts.get('FAIL', 0)} failed, {counts.get('RUNNING', 0)} running, {counts.get('WAITING', 0)} waiting")
    if total is not None:
        finished = counts.get("COMPLETE", 0) + counts.get("PRUNED", 0)
        tail = (f"; this run works until the study has {total} finished trials in all ({finished} now, "
                "counting every run's)")
    else:
        tail = (f"; this run adds {plural(n_trials, 'finished trial')} of its own "
                "(other runs' trials not counted)")
    return head + tail + (f" with {workers} workers" if workers > 1 else "")


def _sleep(seconds: float, stop: Any) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and not stop.requested:
        time.sleep(0.1)


def _run_trials(study: optuna.Study, storage: StudyStorage, objective: Callable[[optuna.Trial], float],
                gate: _TrialGate, *, target: int, max_failures: int, timeout: float | None, stop: Any,
                say: Callable[[str], None], gc_after_trial: bool = True, own_trials: bool = False,
                baseline: StudySpec | None = None,
                after_trial: Callable[[optuna.trial.FrozenTrial], None] | None = None) -> None:
    """One worker's loop: under the study lock, recover trials of dead workers, then start
    a trial only while finished + running < target (counting only the trials of this run,
    ``gate.run_id``, with ``own_trials``). When the rest of the target is running in other
    workers, wait for them where they can still end (alive here, or heartbeats). With
    ``baseline`` (the spec), a baseline whose every trial failed is queued again.
    Raises :class:`TrialsFailed` after ``max_failures`` failed trials."""
    from dlops.workers import recover_dead_trials, retry_trial, worth_waiting_for

    def guarded(trial: optuna.Trial) -> float:
        try:
            return objective(trial)
        except (optuna.TrialPruned, TrialInterrupted):
            raise
        except Exception as exc:
            gate.last_error = exc
            try:  # the reason stays with the trial (study show, the dashboard, a --workers parent)
                trial.set_user_attr("stopped_reason", f"failed: {failure_reason(exc)}")
            except Exception:  # noqa: BLE001 - the storage itself may be what failed
                pass
            raise

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
            counted = [t for t in trials if of_run(t, gate.run_id)] if own_trials else trials
            finished = sum(t.state in FINISHED for t in counted)
            running = [t for t in counted if t.state == TrialState.RUNNING]
            if finished >= target:
                break
            if finished + len(running) >= target:
                if not any(worth_waiting_for(t, storage) for t in running):
                    say(f"{plural(len(running), 'trial')} RUNNING whose workers cannot be checked from here "
                        "(another machine, journal storage); not waiting for them")
                    break
                lock.release()
                if not waiting:
                    say(f"waiting for {plural(len(running), 'running trial')} of other workers to reach {target} finished")
                    waiting = True
                _sleep(1.0, stop)
                continue
            waiting = False
            if baseline is not None and trials and enqueue_baseline(study, baseline, trials):
                say("no baseline trial has finished (each one failed): the baseline is queued again")
            gate.lock = lock
            study.optimize(guarded, n_trials=1, catch=(Exception,), gc_after_trial=gc_after_trial)
        except KeyboardInterrupt:
            stop.signum = stop.signum or 2  # a second signal: the trial stopped at once
        finally:
            gate.lock = None
            lock.release()
        if gate.trial_number is None:
            continue
        trial = storage.optuna.get_trial(gate.trial_id)
        if after_trial is not None:
            after_trial(trial)
        if trial.state == TrialState.FAIL:
            if stop.requested:
                retry_trial(study, trial, max_retry=None)  # resumes from its checkpoint next run
                break
            failures += 1
            if failures >= max_failures:
                reason = failure_reason(gate.last_error) if gate.last_error is not None else "no reason recorded"
                raise TrialsFailed(f"{plural(failures, 'trial')} failed in this run; giving up (see `dlops study show "
                                   f"{study.study_name}`). The last one: {reason}")


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


@dataclass(frozen=True)
class RunSlot:
    """One run (a ``dlops study run`` command, all its workers) in a study."""

    run_id: str  # in the owner of each of its trials: --n-trials counts these
    index: int  # among the runs that joined the study, 0 for the one that started it: seeds the sampler


def run_target(spec: StudySpec, options: RunOptions) -> tuple[int | None, int | None]:
    """(n_trials, total): the finished trials this run adds (``--n-trials``, default the
    spec's), or with ``--total-trials`` the study-wide count every run stops at."""
    if options.total_trials is not None:
        if options.n_trials is not None:
            raise DlopsError("give --n-trials (finished trials this run adds) or --total-trials (finished trials "
                             "the study should have in all), not both")
        return None, options.total_trials
    return options.n_trials or spec.n_trials, None


def run_study(
    spec: StudySpec,
    options: RunOptions,
    on_epoch: EpochCallback | None = None,
    *,
    say: Callable[[str], None] | None = None,
    run: RunSlot | None = None,
    worker: int = 0,
    workers: int = 1,
    announce: bool = True,
    label: str = "",
) -> StudyResult:
    """Run ``n_trials`` more finished trials (COMPLETE or PRUNED) of ``spec``'s study,
    counting only this run's own trials (``run``: shared by the workers of a many-worker
    run), or with ``options.total_trials`` work until the study has that many finished
    trials, whoever runs them.

    SIGINT/SIGTERM stop the current trial at its next epoch end (recorded FAIL, queued
    again to resume from its checkpoint); ``StudyResult.interrupted`` says which signal.
    The test split is off limits inside: any read raises. Too many failed trials raise
    :class:`TrialsFailed`.
    """
    from dlops.notes import RunNotes, StudyContext
    from dlops.workers import GracefulStop, failure_budget

    say = say or (lambda msg: None)
    n_trials, total = run_target(spec, options)
    asked = spec.for_dataset(options.dataset)
    spec = check_run(spec, options)  # before anything is written
    note = objective_note(asked, spec)
    if note and announce:
        say(note)
    storage = connect(options.storage or default_storage_url(), heartbeat_interval=options.heartbeat_interval,
                      grace_period=options.grace_period)
    study = open_study(spec, options, storage, worker)
    notes = RunNotes(StudyContext.of(spec, options, storage.masked), say)
    with storage.lock(study.study_name):
        counts = state_counts(study)  # where the study stood on (re)joining
        prepare_study(study, spec, options)
        notes.opened(study)
        if run is None:
            run = RunSlot(uuid.uuid4().hex, join_run(study, storage))
    base_seed = options.seed if options.seed is not None else spec.sampler.get("seed", 0)
    study.sampler = make_sampler(spec, sampler_seed(base_seed, worker, run.index))
    finished_then = sum(counts[s.name] for s in FINISHED)
    target = total if total is not None else finished_then + n_trials
    if announce:
        say(study_counts_line(study.study_name, storage, counts, n_trials, target, workers, total=total))
    gate = _TrialGate(run.run_id)
    budget = failure_budget(n_trials if n_trials is not None else max(total - finished_then, 1), workers)
    with forbid_test_split(), warnings.catch_warnings(), GracefulStop(label) as stop:
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        objective = make_objective(spec, options, on_epoch, stop=stop, on_trial_start=gate, say=say)
        _run_trials(study, storage, objective, gate, target=n_trials if total is None else total,
                    own_trials=total is None, baseline=spec, max_failures=budget,
                    timeout=options.timeout if options.timeout is not None else spec.timeout, stop=stop, say=say,
                    after_trial=lambda trial: notes.trial_finished(study, storage, trial))
    return StudyResult(study=study, counts=state_counts(study), best=summarize(study)["best"],
                       interrupted=stop.signum, target=target, n_trials=n_trials,
                       added=run_trials_finished(study, run.run_id))
