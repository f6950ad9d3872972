"""Running a study: opening and preparing it, the trial loop, and worker processes.

:func:`run_study` runs one worker's share of a run in this process; :func:`run_workers`
runs ``n`` worker processes on this machine (``n == 1`` runs in this process), each an
ordinary :func:`run_study` sharing the run's trial count. The same command on another
machine with the same PostgreSQL or Redis URL joins the same study.

A run (one ``dlops study run``, all its workers) adds ``--n-trials`` finished trials of its
own, or works until the study has ``--total-trials``; each run that joins a study gets a
number that seeds its sampler (:func:`dlops.sampling.sampler_seed`). Everything a run
needs is checked (:func:`check_run`) before any storage, study or file is touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from dlops.console import epoch_line, trial_end_line, trial_label
from dlops.data import (
    Dataset,
    check_subset_classes,
    data_change_text,
    data_changes,
    data_identity,
    forbid_test_split,
    get_dataset,
)
from dlops.errors import DlopsError, SpecError, StorageError, out_of_memory, out_of_memory_text
from dlops.liveness import (
    OWNER_KEY,
    identity,
    of_run,
    recover_dead_trials,
    register_process,
    retry_trial,
    worth_waiting_for,
)
from dlops.notes import RunNotes, StudyContext
from dlops.objective import (
    EpochCallback,
    RunOptions,
    baseline_params,
    check_same_settings,
    checkpoint_path,
    make_objective,
    study_settings,
    trial_config,
)
from dlops.paths import default_storage_url
from dlops.sampling import make_pruner, make_sampler, sampler_seed
from dlops.spec import StudySpec
from dlops.stopping import SAME_STOP_S, SIGNAL_NAMES, GracefulStop, TrialInterrupted, TrialTakenOver, exit_code
from dlops.storage import (
    StorageLost,
    StudyStorage,
    check_url,
    connect,
    driver_error_line,
    heartbeat_settings,
    journal_url,
    mask_url,
    sqlite_path,
    storage_outage,
)
from dlops.studies import (
    DATA_KEY,
    FINISHED,
    SETTINGS_KEY,
    StudyResult,
    state_counts,
    study_still_there,
    summarize,
)
from dlops.text import plural
from dlops.trainers.base import resolve_device

RUNS_KEY = "dlops:runs"  # study system attr: how many runs have joined the study
BASELINE_ATTR = "baseline"  # user attr of a baseline trial (a retried copy inherits it)

Say = Callable[[str], None]


# --- opening a study ------------------------------------------------------------


def open_study(
    spec: StudySpec, options: RunOptions, storage: StudyStorage | None = None, worker: int = 0, *, create: bool = True
) -> optuna.Study:
    """Create or load the study. Worker ``k`` of a many-worker run seeds its sampler with
    seed + k, so workers do not propose the same random start-up trials. With ``create``
    False (a worker of a run whose parent opened the study) a study that is not there, since
    it was deleted meanwhile, raises :class:`StudyDeleted` instead of starting anew."""
    storage = storage or connect(options.storage or default_storage_url())
    base_seed = options.seed if options.seed is not None else spec.sampler.get("seed", 0)
    name = options.study_name_for(spec)
    sampler = make_sampler(spec.sampler, sampler_seed(base_seed, worker, 0))
    if not create:
        try:
            return optuna.load_study(
                study_name=name, storage=storage.optuna, sampler=sampler, pruner=make_pruner(spec.pruner)
            )
        except KeyError:
            raise StudyDeleted(name, storage) from None
    study = optuna.create_study(
        study_name=name,
        storage=storage.optuna,
        sampler=sampler,
        pruner=make_pruner(spec.pruner),
        direction=optuna.study.StudyDirection[spec.direction.upper()],
        load_if_exists=True,
    )
    return study


@contextlib.contextmanager
def stop_if_lost(storage: StudyStorage) -> Iterator[None]:
    """An error out of Optuna while the storage does not answer becomes :class:`StorageLost`
    (one line), not the driver's traceback or Optuna's own error in failing to record it."""
    try:
        yield
    except DlopsError:
        raise
    except Exception:
        reason = storage_outage(storage.optuna)
        if reason is None:
            raise
        raise StorageLost(storage.url, reason) from None


@contextlib.contextmanager
def heartbeat_failures_said(say: Say) -> Iterator[None]:
    """Optuna's heartbeat thread dies on a storage that stops answering, and Python prints
    its traceback: one line instead (the trial itself then stops with :class:`StorageLost`,
    or, the storage back, is failed for its silence and retried)."""
    previous = threading.excepthook

    def hook(args: Any) -> None:
        if args.thread is not None and "_record_heartbeat" in args.thread.name and args.exc_value is not None:
            say(f"a trial's heartbeat stopped: {driver_error_line(args.exc_value)}")
            return
        previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


class StudyDeleted(DlopsError):
    """The study of a run was deleted (``dlops study delete``) while the run was in it: the
    run stops, and does not start the study anew under the same name."""

    def __init__(self, name: str, storage: StudyStorage) -> None:
        super().__init__(
            f"study {name} was deleted from {storage.masked} while this run was in it (dlops study delete): "
            "stopped, without starting it anew"
        )


@contextlib.contextmanager
def stop_if_deleted(study: optuna.Study, storage: StudyStorage) -> Iterator[None]:
    """Optuna's ``KeyError`` on a study deleted meanwhile becomes :class:`StudyDeleted`."""
    try:
        yield
    except KeyError:
        if study_still_there(study):
            raise
        raise StudyDeleted(study.study_name, storage) from None


def enqueue_baseline(study: optuna.Study, params: dict[str, Any], trials: Sequence[FrozenTrial] | None = None) -> bool:
    """Queue the baseline (its ``params``, :func:`dlops.objective.baseline_params`): trial 0
    of a new study, and again while no baseline trial is complete, pruned, running or
    waiting (every one so far failed: a full disk, a bad checkpoint). Run under the study
    lock. Returns whether it was enqueued."""
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    if any(t.user_attrs.get(BASELINE_ATTR) and t.state != TrialState.FAIL for t in trials):
        return False
    study.enqueue_trial(params, user_attrs={BASELINE_ATTR: True})
    return True


def baseline_note(study: optuna.Study, params: dict[str, Any]) -> str | None:
    """A study trains its baseline once: where the spec's ``[baseline]`` (``params``) has
    changed since, a line saying which trial stays the baseline and that the new one is
    not trained; None where they agree, or where no baseline is kept (it is queued)."""
    kept = [
        t for t in study.get_trials(deepcopy=False) if t.user_attrs.get(BASELINE_ATTR) and t.state != TrialState.FAIL
    ]
    if not kept:
        return None
    trial = kept[0]
    old = trial.params or trial.system_attrs.get("fixed_params") or {}
    changed = {k: v for k, v in params.items() if k in old and old[k] != v}
    if not changed:
        return None
    was = ", ".join(f"{k} {old[k]:g}" if isinstance(old[k], float) else f"{k} {old[k]}" for k in changed)
    now = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in changed.items())
    return (
        f"note: the baseline of study {study.study_name!r} is trial {trial.number} ({was}); the spec's baseline "
        f"is {now} now, which a study that has one does not train ({ANOTHER} to train it)"
    )


def join_run(study: optuna.Study, storage: StudyStorage) -> int:
    """Count this run among those that joined ``study`` and return its index (0: the run
    that started it). Call under the study lock: runs joining at once get distinct indexes."""
    store = storage.optuna
    attrs = store.get_study_system_attrs(study._study_id)
    if RUNS_KEY in attrs:
        index = int(attrs[RUNS_KEY])
    else:  # a study from before this count: any run with trials there is not its first
        index = len(
            study.get_trials(
                deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
            )
        )
    store.set_study_system_attr(study._study_id, RUNS_KEY, index + 1)
    return index


MAX_STUDY_NAME = 120


def check_study_name(name: str) -> None:
    """A study name dlops can keep files by (lock files, checkpoint and report folders):
    not blank, one line, no path separators, at most 120 characters."""
    if not name.strip():
        raise DlopsError("--study-name is blank: give a name, or leave the option out for the spec's")
    bad = next((c for c in name if ord(c) < 32 or ord(c) == 127 or c in "/\\"), None)
    if bad is not None:
        raise DlopsError(f"study name {name!r}: {bad!r} is not allowed in a study name (no path separators, one line)")
    if name in (".", ".."):
        raise DlopsError(f"study name {name!r} is not a name")
    if len(name) > MAX_STUDY_NAME:
        raise DlopsError(f"study name of {len(name)} characters: at most {MAX_STUDY_NAME}")


def run_dataset(spec: StudySpec, options: RunOptions) -> Dataset | None:
    """The dataset (all of it, before any subset) a run of ``spec`` trains on; None for a
    trainer without one. An unknown or unprepared dataset is a one-line error."""
    config = trial_config(spec.for_dataset(options.dataset), options, baseline_params(spec, options), 0)
    if not config.dataset:
        return None
    return get_dataset(config.dataset, Path(config.data_root) if config.data_root else None)


def check_run(spec: StudySpec, options: RunOptions, workers: int = 1) -> StudySpec:
    """Check everything a run needs before any storage, study or file is touched: the
    config, the storage URL (and that it takes ``workers`` writers), its heartbeat options,
    the device, the dataset and its class count (at least 2). Returns the spec as it runs:
    on 5 classes or fewer a top-5 objective is always 1.0, so such a study optimises top-1."""
    check_study_name(options.study_name if options.study_name is not None else options.study_name_for(spec))
    if options.timeout is not None and options.timeout <= 0:
        raise DlopsError(f"--timeout {options.timeout:g}: no trial could start; give a positive number of seconds")
    url = options.storage or default_storage_url()
    if check_url(url) == "sqlite" and workers > 1:
        journal = (sqlite_path(url) or Path("dlops.db")).with_suffix(".log").absolute()
        raise StorageError(
            f'SQLite ({mask_url(url)}) takes one worker at a time (parallel writers get "database is locked"); '
            f"for {workers} workers use --storage {journal_url(journal)} (this machine) "
            "or postgresql+psycopg2://user@host/db (many machines)"
        )
    heartbeat_settings(url, options.heartbeat_interval, options.grace_period)
    spec = spec.for_dataset(options.dataset)
    config = trial_config(spec, options, baseline_params(spec, options), 0)
    try:  # --epochs 2, a dataset's epochs: a range this run's trials could not all train
        spec.check_search_values(config, "this run")
    except SpecError as exc:
        raise SpecError(f"{spec.path.name if spec.path else spec.name}: {exc}") from None
    resolve_device(config.device or "auto")
    ds = run_dataset(spec, options)
    if ds is None:
        return spec
    classes = check_subset_classes(ds, config.subset_classes)
    if spec.metric == "val_top5" and classes <= 5:
        spec = dataclasses.replace(
            spec, metric="val_top1", dataset_metrics={**spec.dataset_metrics, config.dataset: "val_top1"}
        )
    return spec


def objective_note(asked: StudySpec, runs: StudySpec) -> str | None:
    """What to say when :func:`check_run` changed the objective (``asked``: the spec as given)."""
    if asked.metric == runs.metric:
        return None
    return (
        f"{asked.metric} is always 1.0 with 5 classes or fewer: this study optimises {runs.metric} instead "
        "(6 or more classes keep top-5)"
    )


ANOTHER = "give this run another --study-name"


def check_same_objective(
    study: optuna.Study, spec: StudySpec, options: RunOptions, data: dict[str, Any] | None = None
) -> None:
    """One study, one objective: a run never adds trials of another spec, dataset, metric,
    direction, fixed settings or data (``data``: :func:`data_record`, read here when not
    given) to an existing study (their values would not compare), nor joins a study dlops
    did not make (a multi-objective one, say)."""
    name = study.study_name
    if len(study.directions) > 1:
        raise DlopsError(f"study {name!r} has {len(study.directions)} objectives; dlops studies have one: {ANOTHER}")
    direction = study.direction.name.lower()
    if direction != spec.direction:
        raise DlopsError(f"study {name!r} is to {direction} its value, this run's spec to {spec.direction}: {ANOTHER}")
    made_by = study.user_attrs.get("spec")
    if made_by is None and study.get_trials(deepcopy=False):
        raise DlopsError(f"study {name!r} was not made by dlops study run (it has no spec): {ANOTHER}")
    if made_by is not None and made_by != spec.name:
        raise DlopsError(f"study {name!r} belongs to the spec {made_by}, this run is {spec.name}: {ANOTHER}")
    dataset = options.dataset or spec.train.get("dataset")
    ran_on, metric = study.user_attrs.get("dataset"), (study.metric_names[0] if study.metric_names else None)
    if ran_on is not None and dataset is not None and ran_on != dataset:
        raise DlopsError(
            f"study {study.study_name!r} ran on {ran_on}, not {dataset}: give this run another --study-name"
        )
    if metric is not None and metric != spec.metric:
        raise DlopsError(
            f"study {study.study_name!r} optimises {metric}, this run {spec.metric}: give this run another --study-name"
        )
    check_same_settings(study, spec, options)
    check_same_data(study, data_record(spec, options) if data is None else data)


def data_record(spec: StudySpec, options: RunOptions) -> dict[str, Any] | None:
    """What a study records of the data a run of ``spec`` measures its values on
    (:func:`dlops.data.data_identity`), None for a trainer without a dataset."""
    ds = run_dataset(spec, options)
    return None if ds is None else data_identity(ds)


def check_same_data(study: optuna.Study, data: dict[str, Any] | None) -> None:
    """A run joins a study only on the data its values were measured on (recorded in the
    study's ``user_attrs["data"]`` when it was created): the same validation hold-out
    (fraction and seed), split sizes, classes and, where both are known, source archive.
    A cache rebuilt since (``dlops data prepare --force --val-fraction ... --seed ...``)
    would put values measured on two hold-outs side by side. A study from before this
    record is not checked (the run records it)."""
    recorded = study.user_attrs.get(DATA_KEY)
    changed = data_changes(recorded, data)
    if not changed or not isinstance(recorded, dict) or data is None:
        return
    name, dataset = study.study_name, recorded.get("dataset") or study.user_attrs.get("dataset")
    what = data_change_text(recorded, data, changed)
    holdout = f"--val-fraction {recorded.get('holdout_fraction')} --seed {recorded.get('holdout_seed')}"
    if "validation hold-out" in changed and not {"classes", "source archive"} & set(changed):
        fix = f"rebuild the cache as it was (`dlops data prepare {dataset} --force {holdout}`)"
    elif "validation hold-out" in changed:
        fix = f"use the data it was measured on (its archive, with {holdout})"
    else:
        fix = "use the data it was measured on"
    raise DlopsError(
        f"study {name!r} was measured on other {dataset + ' ' if dataset else ''}data ({what}): "
        f"its values would not compare; {ANOTHER}, or {fix}"
    )


def prepare_study(study: optuna.Study, spec: StudySpec, options: RunOptions) -> bool:
    """Labels, the data the study is measured on (:func:`data_record`, recorded once), its
    fixed settings (:func:`dlops.objective.study_settings`, recorded once), and the baseline
    as trial 0 of a new study. Run under the study lock, so workers starting at once enqueue
    one baseline, and a run that starts the same new study at once with other settings is
    refused before any trial has trained. Returns whether the study was new."""
    new = not study.get_trials(deepcopy=False)
    dataset = options.dataset or spec.train.get("dataset")
    data = data_record(spec, options)
    check_same_objective(study, spec, options, data)
    if new:  # checkpoints left by a deleted study of the same name are not this study's
        shutil.rmtree(checkpoint_path(study.study_name, 0, options.storage).parent, ignore_errors=True)
    if study.metric_names != [spec.metric]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([spec.metric])
    attrs = study.user_attrs
    for key, value in (("spec", spec.name), ("trainer", spec.trainer), ("dataset", dataset)):
        if attrs.get(key) != value:
            study.set_user_attr(key, value)
    if data is not None and not isinstance(attrs.get(DATA_KEY), dict):
        study.set_user_attr(DATA_KEY, data)
    if not isinstance(attrs.get(SETTINGS_KEY), dict):  # what every later run is checked against
        study.set_user_attr(SETTINGS_KEY, study_settings(spec, options))
    enqueue_baseline(study, baseline_params(spec, options))
    return new


# --- the trial loop -------------------------------------------------------------


class _TrialGate:
    """Holds the study lock from "how many trials are left?" until the new trial is RUNNING
    and carries its owner (the objective's first step): workers never start more trials
    than asked for, and no RUNNING trial is ever seen without its owner."""

    def __init__(self, run_id: str | None = None) -> None:
        self.run_id = run_id or uuid.uuid4().hex
        self.identity = identity(self.run_id)
        self.lock: Any = None  # the study lock, held until the trial carries its owner
        self.trial_number: int | None = None
        self.trial_id: int | None = None
        self.last_error: BaseException | None = None  # of the last trial that failed
        self.taken_over: TrialTakenOver | None = None  # the last trial was failed elsewhere while this worker stalled

    def __call__(self, trial: optuna.Trial) -> None:
        trial.storage.set_trial_system_attr(trial._trial_id, OWNER_KEY, self.identity)
        self.trial_number, self.trial_id = trial.number, trial._trial_id
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def failure_reason(exc: BaseException) -> str:
    """An exception as one short line: its message (with its type unless it is a DlopsError);
    running out of memory says so, with what the allocation asked for."""
    text = (str(exc).strip().splitlines() or [""])[0][:300]
    if isinstance(exc, DlopsError):
        return text
    memory = out_of_memory_text(exc)
    if memory is not None:
        return memory
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def last_failure(study: optuna.Study, run_id: str) -> str | None:
    """The reason of the latest failed trial of the run ``run_id``."""
    failed = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        if of_run(t, run_id) and str(t.user_attrs.get("stopped_reason") or "").startswith("failed: ")
    ]
    if not failed:
        return None
    latest = max(failed, key=lambda t: t.datetime_complete or t.datetime_start or datetime.min)
    return str(latest.user_attrs["stopped_reason"])[len("failed: ") :]


class TrialsFailed(DlopsError):
    """A run gave up after too many failed trials: a broken setup must not loop, nor exit 0."""


def run_trials_finished(study: optuna.Study, run_id: str) -> int:
    """Finished trials of the run ``run_id`` (all its workers)."""
    return sum(t.state in FINISHED and of_run(t, run_id) for t in study.get_trials(deepcopy=False))


def study_counts_line(
    name: str,
    storage: StudyStorage,
    counts: dict[str, int],
    n_trials: int | None,
    target: int | None = None,
    workers: int = 1,
    total: int | None = None,
) -> str:
    """Where a study stands when a run (re)joins it, and when this run stops: after adding
    ``n_trials`` finished trials of its own (other runs' trials do not count), or once the
    study has ``total`` finished trials whoever runs them."""
    if not any(counts.values()):
        head = f"study {name}: new, in {storage.masked}"
    else:
        head = (
            f"study {name} in {storage.masked}: {counts.get('COMPLETE', 0)} complete, "
            f"{counts.get('PRUNED', 0)} pruned, "
            f"{counts.get('FAIL', 0)} failed, {counts.get('RUNNING', 0)} running, {counts.get('WAITING', 0)} waiting"
        )
    if total is not None:
        finished = counts.get("COMPLETE", 0) + counts.get("PRUNED", 0)
        if finished >= total:
            return head + (
                f"; it already has {plural(finished, 'finished trial')}, at least the {total} asked "
                "(--total-trials counts every run's): this run starts no trial"
            )
        tail = (
            f"; this run works until the study has {total} finished trials in all ({finished} now, "
            "counting every run's)"
        )
    else:
        tail = f"; this run adds {plural(n_trials or 0, 'finished trial')} of its own (other runs' trials not counted)"
    return head + tail + (f" with {workers} workers" if workers > 1 else "")


def _sleep(seconds: float, stop: GracefulStop) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and not stop.requested:
        time.sleep(0.1)


class SurvivorFreeze:
    """After the first trial's collection, what survived it (torch, Optuna, the dataset:
    some 200,000 objects) is moved out of the collector's reach until the run ends: the
    full collection after every later trial then walks only that trial's objects (0.11 s
    fewer per trial on a 2-core CPU). Frozen objects are still freed when their last
    reference goes; leaving the ``with`` block hands them back to the collector, so a
    process that runs a study as one call among others (a notebook, a test) keeps its
    cyclic garbage collectable. Freezes nothing where something else already froze."""

    def __init__(self) -> None:
        self.froze = False

    def __call__(self) -> None:
        if not self.froze and gc.get_freeze_count() == 0:
            gc.freeze()
            self.froze = True

    def __enter__(self) -> SurvivorFreeze:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.froze:
            gc.unfreeze()
            self.froze = False


def explained(exc: BaseException) -> bool:
    """An error whose one line says all (a user's mistake, the system's: a full disk, a
    missing permission, running out of memory): no traceback."""
    return isinstance(exc, DlopsError | OSError) or out_of_memory(exc) is not None


class _QuietFailedTrials(logging.Filter):
    """Drops Optuna's "Trial N failed with ..." warnings (its traceback, then "failed with
    value None"): dlops says how every trial ended in its own line, and writes the traceback
    of an error it cannot explain itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not re.match(r"Trial \d+ failed with ", record.getMessage())


@contextlib.contextmanager
def optuna_failures_quiet() -> Iterator[None]:
    logger = logging.getLogger("optuna.study._optimize")
    quiet = _QuietFailedTrials()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _run_trials(
    study: optuna.Study,
    storage: StudyStorage,
    objective: Callable[[optuna.Trial], float],
    gate: _TrialGate,
    *,
    target: int,
    max_failures: int,
    timeout: float | None,
    stop: GracefulStop,
    say: Callable[[str], None],
    gc_after_trial: bool = True,
    own_trials: bool = False,
    baseline: dict[str, Any] | None = None,
    after_trial: Callable[[FrozenTrial], None] | None = None,
    after_recovery: Callable[[FrozenTrial, str], None] | None = None,
    after_collection: Callable[[], None] | None = None,
) -> None:
    """One worker's loop: under the study lock, recover trials of dead workers, then start
    a trial only while finished + running < target (counting only the trials of this run,
    ``gate.run_id``, with ``own_trials``). When the rest of the target is running in other
    workers, wait for them where they can still end (alive here, or heartbeats). With
    ``baseline`` (trial 0's params), a baseline whose every trial failed is queued again.
    Raises :class:`TrialsFailed` after ``max_failures`` failed trials."""

    def guarded(trial: optuna.Trial) -> float:
        try:
            return objective(trial)
        except (optuna.TrialPruned, TrialInterrupted):
            raise
        except KeyboardInterrupt:  # a second signal: the trial stops at once, mid-epoch
            try:
                trial.set_user_attr(
                    "stopped_reason",
                    "interrupted at once by a second signal; queued again to resume from its last checkpoint",
                )
            except Exception:  # noqa: BLE001 - the storage may be what the signal cut short
                pass
            raise
        except TrialTakenOver as exc:
            gate.taken_over = exc
            raise
        except Exception as exc:
            gate.last_error = exc
            try:  # the reason stays with the trial (study show, the dashboard, a --workers parent)
                trial.set_user_attr("stopped_reason", f"failed: {failure_reason(exc)}")
            except Exception:  # noqa: BLE001 - the storage itself may be what failed
                pass
            if not explained(exc) and storage_outage(trial.storage) is None:
                # a bug, or something dlops cannot name: its traceback, once
                sys.stderr.write(mask_url(f"trial {trial.number}: " + traceback.format_exc()))
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
            recovered = recover_dead_trials(study, storage, say, trials)
            if recovered:
                trials = study.get_trials(deepcopy=False)
                for t in trials:
                    if t.number in recovered and after_recovery is not None:
                        after_recovery(t, recovered[t.number])
            counted = [t for t in trials if of_run(t, gate.run_id)] if own_trials else trials
            finished = sum(t.state in FINISHED for t in counted)
            running = [t for t in counted if t.state == TrialState.RUNNING]
            if finished >= target:
                break
            if finished + len(running) >= target:
                if not any(worth_waiting_for(t, storage) for t in running):
                    say(
                        f"{plural(len(running), 'trial')} RUNNING whose workers cannot be checked from here "
                        "(another machine, journal storage); not waiting for them"
                    )
                    break
                lock.release()
                if not waiting:
                    say(
                        f"waiting for {plural(len(running), 'running trial')} of other workers "
                        f"to reach {target} finished"
                    )
                    waiting = True
                _sleep(1.0, stop)
                continue
            waiting = False
            if baseline is not None and trials and enqueue_baseline(study, baseline, trials):
                say("no baseline trial has finished (each one failed): the baseline is queued again")
            gate.lock = lock
            gate.taken_over = None
            try:
                study.optimize(guarded, n_trials=1, catch=(Exception,), gc_after_trial=gc_after_trial)
                if gc_after_trial and after_collection is not None:
                    after_collection()
            except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
                if gate.taken_over is None:  # Optuna cannot tell a trial that another worker failed
                    raise
        except KeyboardInterrupt:
            stop.signum = stop.signum or 2  # a second signal: the trial stopped at once
        finally:
            gate.lock = None
            lock.release()
        if gate.trial_number is None:
            continue
        if gate.taken_over is not None:  # the worker that failed it wrote its note; its retry runs as any trial
            say(str(gate.taken_over))
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
                raise TrialsFailed(
                    f"{plural(failures, 'trial')} failed in this run; giving up (see `dlops study show "
                    f"{study.study_name}`). The last one: {reason}"
                )


def _trial_ended(
    study: optuna.Study, storage: StudyStorage, trial: FrozenTrial, metric: str, notes: RunNotes, say: Say
) -> None:
    """After one of this worker's trials: a line on how it ended, then its dashboard notes."""
    best = None
    if trial.state == TrialState.COMPLETE:
        try:
            top = study.best_trial
            best = (top.number, float(top.value)) if top.value is not None else None
        except ValueError:  # no complete trial, as the storage sees it
            pass
    say(trial_end_line(trial, metric, best))
    notes.trial_finished(study, storage, trial)


@dataclass(frozen=True)
class RunSlot:
    """One run (a ``dlops study run`` command, all its workers) in a study."""

    run_id: str  # in the owner of each of its trials: --n-trials counts these
    index: int  # among the runs that joined the study, 0 for the one that started it: seeds the sampler


def connect_run(options: RunOptions, say: Say | None = None) -> StudyStorage:
    """The storage a run writes to, with heartbeats where the storage has them; what opening
    it repaired (a journal's torn last record set aside) is said."""
    url = options.storage or default_storage_url()
    interval, grace = heartbeat_settings(url, options.heartbeat_interval, options.grace_period)
    storage = connect(url, heartbeat_interval=interval, grace_period=grace)
    if storage.note and say is not None:
        say(storage.note)
    return storage


def run_target(spec: StudySpec, options: RunOptions) -> tuple[int | None, int | None]:
    """(n_trials, total): the finished trials this run adds (``--n-trials``, default the
    spec's), or with ``--total-trials`` the study-wide count every run stops at."""
    if options.total_trials is not None:
        if options.n_trials is not None:
            raise DlopsError(
                "give --n-trials (finished trials this run adds) or --total-trials (finished trials "
                "the study should have in all), not both"
            )
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
    say = say or (lambda msg: None)
    n_trials, total = run_target(spec, options)
    asked = spec.for_dataset(options.dataset)
    spec = check_run(spec, options)  # before anything is written
    note = objective_note(asked, spec)
    if note and announce:
        say(note)
    storage = connect_run(options, say)
    study = open_study(spec, options, storage, worker, create=run is None)
    notes = RunNotes(StudyContext.of(spec, options, storage.masked), say)
    with storage.lock(study.study_name), stop_if_deleted(study, storage):
        counts = state_counts(study)  # where the study stood on (re)joining
        prepare_study(study, spec, options)
        changed_baseline = baseline_note(study, baseline_params(spec, options)) if announce else None
        notes.opened(study)
        if run is None:
            run = RunSlot(uuid.uuid4().hex, join_run(study, storage))
        leave = register_process(study, run.run_id, f"w{worker}")  # `dlops study delete` waits for it
    base_seed = options.seed if options.seed is not None else spec.sampler.get("seed", 0)
    study.sampler = make_sampler(spec.sampler, sampler_seed(base_seed, worker, run.index))
    finished_then = sum(counts[s.name] for s in FINISHED)
    goal = total if total is not None else n_trials or 0  # what the loop counts to: study-wide or this run's
    target = goal if total is not None else finished_then + goal
    if announce:
        say(study_counts_line(study.study_name, storage, counts, n_trials, target, workers, total=total))
        if changed_baseline is not None:
            say(changed_baseline)
    gate = _TrialGate(run.run_id)
    budget = failure_budget(goal if total is None else max(goal - finished_then, 1), workers)
    # A worker of a --workers run may get one stop twice: from the system and passed on by dlops.
    same_stop = SAME_STOP_S if workers > 1 else 0.0
    try:
        with (
            forbid_test_split(),
            warnings.catch_warnings(),
            GracefulStop(label, same_stop) as stop,
            SurvivorFreeze() as freeze,
            optuna_failures_quiet(),
            stop_if_deleted(study, storage),
            stop_if_lost(storage),
            heartbeat_failures_said(say),
        ):
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            objective = make_objective(spec, options, on_epoch, stop=stop, on_trial_start=gate, say=say)
            _run_trials(
                study,
                storage,
                objective,
                gate,
                target=goal,
                own_trials=total is None,
                baseline=baseline_params(spec, options),
                max_failures=budget,
                timeout=options.timeout if options.timeout is not None else spec.timeout,
                stop=stop,
                say=say,
                after_trial=lambda trial: _trial_ended(study, storage, trial, spec.metric, notes, say),
                after_recovery=lambda trial, why: notes.trial_recovered(study, trial, why),
                after_collection=freeze,
            )
        with stop_if_deleted(study, storage):
            return StudyResult(
                study=study,
                counts=state_counts(study),
                best=summarize(study)["best"],
                interrupted=stop.signum,
                target=target,
                n_trials=n_trials,
                added=run_trials_finished(study, run.run_id),
            )
    finally:
        leave()


# --- worker processes -----------------------------------------------------------


def plan_workers(
    n: int, device: str, gpus: Sequence[str] | None = None, cpus: int | None = None
) -> list[dict[str, str]]:
    """The environment of each of ``n`` workers: one GPU each (round robin over the visible
    ones, when the device may be CUDA) and an equal share of the CPU threads."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if gpus is None:  # an explicit cuda:K pins every worker to that GPU: leave it alone
        gpus = visible_gpus() if device in ("auto", "cuda") else []
    share = max(1, cpus // n)
    asked = os.environ.get("OMP_NUM_THREADS", "")
    threads = str(min(share, int(asked)) if asked.isdigit() and int(asked) > 0 else share)
    plans = []
    for i in range(n):
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "DLOPS_TORCH_THREADS": threads}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        plans.append(env)
    return plans


def visible_gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed:
        return [g.strip() for g in listed.split(",") if g.strip()][: torch.cuda.device_count()]
    return [str(i) for i in range(torch.cuda.device_count())]


@dataclass
class _Payload:
    spec: StudySpec
    options: RunOptions
    run: RunSlot  # shared by the run's workers
    worker: int
    workers: int


def run_workers(
    spec: StudySpec,
    options: RunOptions,
    workers: int = 1,
    *,
    on_epoch: EpochCallback | None = None,
    say: Say | None = None,
) -> StudyResult:
    """Run ``options.n_trials`` (or the spec's) more finished trials of ``spec``'s study
    with ``workers`` processes (or, with ``options.total_trials``, work until the study has
    that many). Returns :class:`dlops.studies.StudyResult`."""

    say = say or (lambda msg: None)
    if workers < 1:
        raise DlopsError(f"--workers must be at least 1, got {workers}")
    if workers == 1:
        return run_study(spec, options, on_epoch, say=say)

    n_trials, total = run_target(spec, options)
    asked = spec.for_dataset(options.dataset)
    spec = check_run(spec, options, workers)  # device, data, classes: before any storage or file is touched
    note = objective_note(asked, spec)
    if note:
        say(note)
    storage = connect_run(options, say)
    name = options.study_name_for(spec)
    counts = joinable_counts(storage, name, spec, options)
    finished = sum(counts.get(s.name, 0) for s in FINISHED)
    target = total if total is not None else finished + (n_trials or 0)
    if total is not None and finished >= total:  # nothing to do: no worker (each would load torch for nothing)
        say(study_counts_line(name, storage, counts, n_trials, target, workers, total=total))
        there = optuna.load_study(study_name=name, storage=storage.optuna)
        return StudyResult(
            study=there, counts=state_counts(there), best=summarize(there)["best"], target=target, n_trials=None
        )
    asked_workers, workers = workers, min(workers, target - finished)  # one trial at a time each
    plans = plan_workers(workers, options.device or "auto")
    with storage.lock(name):  # one index per run, its workers share it
        opened = open_study(spec, options, storage)
        run = RunSlot(uuid.uuid4().hex, join_run(opened, storage))
        leave = register_process(opened, run.run_id, "parent")  # `dlops study delete` waits for the run
    say(study_counts_line(name, storage, counts, n_trials, target, workers, total=total))
    if workers < asked_workers:
        say(
            f"--workers {asked_workers}, {plural(workers, 'trial')} to run: starting {plural(workers, 'worker')} "
            "(the others would only wait, each holding its memory)"
        )

    if "CUDA_VISIBLE_DEVICES" in plans[0]:
        say(
            "GPUs: "
            + ", ".join(f"w{i} -> {p['CUDA_VISIBLE_DEVICES']}" for i, p in enumerate(plans))
            + f"; {plural(int(plans[0]['OMP_NUM_THREADS']), 'CPU thread')} each"
        )
    else:
        say(f"{workers} workers, {plural(int(plans[0]['OMP_NUM_THREADS']), 'CPU thread')} each")

    procs: list[subprocess.Popen] = []
    received: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        for p in procs:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signum)
                except ProcessLookupError:
                    pass

    previous = {sig: signal.signal(sig, forward) for sig in SIGNAL_NAMES}
    # Workers inherit SIGINT/SIGTERM blocked and unblock them once their handler is in
    # place: a stop sent while a worker imports torch is not a traceback.
    signal.pthread_sigmask(signal.SIG_BLOCK, set(SIGNAL_NAMES))
    try:
        for i, plan in enumerate(plans):
            env = {**os.environ, **plan}
            # Own session: a Ctrl-C in the terminal reaches this process only, which passes
            # it on once (a second Ctrl-C is passed on again: stop now).
            p = subprocess.Popen(
                [sys.executable, "-m", "dlops.runner"], stdin=subprocess.PIPE, env=env, start_new_session=True
            )
            procs.append(p)
            # The payload (with the storage URL) goes through a pipe: not argv, not a file.
            assert p.stdin is not None
            p.stdin.write(pickle.dumps(_Payload(spec, options, run, i, workers)))
            p.stdin.close()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, set(SIGNAL_NAMES))
        reported: set[int] = set()
        while any(p.poll() is None for p in procs) or len(reported) < len(procs):
            for i, p in enumerate(procs):
                code = p.poll()
                if code is None or i in reported:
                    continue
                reported.add(i)
                if code < 0:
                    sig = signal.Signals(-code).name
                    say(
                        f"worker w{i} (pid {p.pid}) was killed by {sig}: the trial it was running is queued again "
                        "to resume from its checkpoint"
                    )
                elif code not in (0, 130, 143):
                    say(f"worker w{i} (pid {p.pid}) exited with code {code}")
            time.sleep(0.1)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, set(SIGNAL_NAMES))
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        leave()

    with stop_if_lost(storage):  # the storage gone: one line, and what the workers left waits for the next run
        if not study_still_there(opened):  # deleted from another machine (this one's delete waits for the run)
            raise StudyDeleted(name, storage)
        study = optuna.load_study(study_name=name, storage=storage.optuna)
        codes = [p.returncode for p in procs]
        if any(c < 0 for c in codes):  # the trials of killed workers, when no worker was left to re-queue them
            recover_after_workers(study, storage, RunNotes(StudyContext.of(spec, options, storage.masked), say), say)
        interrupted = received[0] if received else None
        if interrupted is None:
            stopped = [c for c in codes if c in (130, 143)]
            interrupted = stopped[0] - 128 if stopped else None
        counts_now = state_counts(study)
        added = run_trials_finished(study, run.run_id)
        done = sum(counts_now[s.name] for s in FINISHED)
        stand = (
            f"the study has {done} of {target} finished trials"
            if total is not None
            else f"this run added {added} of its {n_trials} finished trials"
        )
        reason = last_failure(study, run.run_id)
        stand += f"; the last failed trial: {reason}" if reason else ""
        gave_up = [f"w{i}" for i, c in enumerate(codes) if c > 0 and c not in (130, 143)]
        see = ", see their error lines above" if gave_up else ""
        if interrupted is None and all(c != 0 for c in codes):
            killed = [f"w{i} by {signal.Signals(-c).name}" for i, c in enumerate(codes) if c < 0]
            if killed:
                left = (target or 0) - done if total is not None else (n_trials or 0) - added
                again = (
                    "run the same command again to continue"
                    if total is not None
                    else f"run the same command with --n-trials {left} to add the rest"
                )
                stand += (
                    f"; killed: {', '.join(killed)}; the trials they were running are queued to resume from their "
                    f"checkpoints: {again}"
                )
            raise DlopsError(f"all {workers} workers failed (exit codes {codes}{see}); {stand}")
        if interrupted is None and gave_up:
            raise DlopsError(f"worker(s) {', '.join(gave_up)} failed (exit codes {codes}{see}); {stand}")
        return StudyResult(
            study=study,
            counts=counts_now,
            best=summarize(study)["best"],
            interrupted=interrupted,
            target=target,
            n_trials=n_trials,
            added=added,
        )


def recover_after_workers(study: optuna.Study, storage: StudyStorage, notes: RunNotes, say: Say) -> None:
    """After a run's workers ended, some killed: fail and re-queue the trials they left
    RUNNING (each retry resumes from its checkpoint), as a live worker would have, so the
    study shows no trial RUNNING for a worker that is gone."""
    with storage.lock(study.study_name):
        recovered = recover_dead_trials(study, storage, say)
    if recovered:
        for trial in study.get_trials(deepcopy=False):
            if trial.number in recovered:
                notes.trial_recovered(study, trial, recovered[trial.number])


def joinable_counts(storage: StudyStorage, name: str, spec: StudySpec, options: RunOptions) -> dict[str, int]:
    """Trial counts by state of study ``name`` ({} when it does not exist yet), once this
    run is known to be one that may join it (:func:`check_same_objective`)."""
    try:
        study = optuna.load_study(study_name=name, storage=storage.optuna)
    except KeyError:
        return {}
    check_same_objective(study, spec, options)
    return state_counts(study)


def worker_main() -> int:
    """Entry of a worker process: the payload arrives on stdin."""
    payload: _Payload = pickle.loads(sys.stdin.buffer.read())
    prefix = f"[w{payload.worker}] "
    threads = int(os.environ.get("DLOPS_TORCH_THREADS", "0"))
    import torch

    if threads:
        torch.set_num_threads(threads)

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # dlops prints its own progress
    metric = payload.spec.metric

    def say(msg: str) -> None:
        print(prefix + mask_url(msg), flush=True)

    def on_epoch(trial: int, epoch: int, m: dict[str, float]) -> None:
        say(epoch_line(trial_label(trial), epoch, m, metric))

    options = replace(payload.options)
    try:
        result = run_study(
            payload.spec,
            options,
            on_epoch,
            say=say,
            run=payload.run,
            worker=payload.worker,
            workers=payload.workers,
            announce=False,
            label=prefix,
        )
    except DlopsError as exc:
        say(f"error: {exc}")
        return exc.exit_code
    except Exception:  # noqa: BLE001 - a bug or a storage outage: show it, without passwords
        import traceback

        sys.stderr.write(mask_url(traceback.format_exc()))
        return 1
    if result.interrupted:
        return exit_code(result.interrupted)
    return 0


def failure_budget(n_trials: int, workers: int) -> int:
    """Failed trials one worker tolerates before it gives up (a broken setup must not loop)."""
    return max(2, math.ceil(n_trials / max(workers, 1)))


if __name__ == "__main__":
    code = worker_main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # everything is stored; skip the slow interpreter teardown (torch, sklearn)
