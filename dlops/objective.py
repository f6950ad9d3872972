"""One trial of a study: the Optuna side of training.

:func:`make_objective` turns a spec into Optuna's objective: it suggests the trial's
params, builds its config (:func:`trial_config`), calls the spec's trainer, and turns the
trainer's per-epoch callback into ``trial.report`` and, when the pruner says so,
:class:`optuna.TrialPruned`. A diverging trial (a non-finite loss) is pruned too: it is a
result about the search space, not a crash.

Every trial checkpoints each epoch under ``$DLOPS_HOME/checkpoints/<study>-<hash>/trial-<n>.pt``
(``n``: the trial's number, or for a retried trial the number of the trial it retries), so
a trial whose worker died resumes where it stopped; the file goes when the trial finishes.
A checkpoint that does not load or fails its checksum is discarded with a warning.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from dlops.console import trial_label
from dlops.errors import DlopsError, SpecError
from dlops.io import CorruptCheckpoint, json_safe, load_checkpoint
from dlops.paths import checkpoints_dir, default_storage_url, dlops_home, folder_name, sqlite_url
from dlops.spec import ParamSpec, StudySpec
from dlops.stopping import GracefulStop, TrialInterrupted, interrupted, taken_over
from dlops.storage import StorageLost, journal_path, server_identity, sqlite_path, storage_kind, storage_outage
from dlops.studies import SETTINGS_KEY
from dlops.text import plural
from dlops.trainers import get_trainer
from dlops.trainers.base import (
    NonFiniteLossError,
    TrainerConfig,
    config_defaults,
    config_matches,
    describe_device,
    first_change,
    resolve_device,
)

EpochCallback = Callable[[int, int, dict[str, float]], None]  # (trial number, epoch, metrics)


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
    # PostgreSQL (RDB storages, not SQLite or journals): heartbeats every heartbeat_interval s
    # (None: 60); a trial silent for grace_period s (None: twice the interval) is failed and retried.
    heartbeat_interval: int | None = None
    grace_period: int | None = None
    total_trials: int | None = None  # stop once the study has this many finished trials (all runs)

    def study_name_for(self, spec: StudySpec) -> str:
        return self.study_name or spec.study_name(self.dataset)


def trial_config(spec: StudySpec, options: RunOptions, params: dict[str, Any], trial_number: int) -> TrainerConfig:
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


def baseline_params(spec: StudySpec, options: RunOptions) -> dict[str, Any]:
    """Trial 0 of this run: the spec's baseline, where a searched parameter it leaves out
    takes the value of the run's config (its dataset's overrides, the command line's)."""
    try:
        return spec.baseline_params(
            options.dataset, epochs=options.epochs, device=options.device, **options.train_overrides
        )
    except SpecError as exc:
        raise SpecError(f"{spec.path.name if spec.path else spec.name}: {exc}") from None


def suggest(trial: optuna.Trial, p: ParamSpec) -> Any:
    if p.type in ("float", "int"):
        assert p.low is not None and p.high is not None  # the spec loader checks ranges
        if p.type == "float":
            return trial.suggest_float(p.name, p.low, p.high, log=p.log, step=p.step)
        return trial.suggest_int(p.name, int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
    return trial.suggest_categorical(p.name, list(p.choices))


def distribution(p: ParamSpec) -> optuna.distributions.BaseDistribution:
    """The Optuna distribution :func:`suggest` draws ``p`` from."""
    if p.type == "float":
        assert p.low is not None and p.high is not None
        return optuna.distributions.FloatDistribution(p.low, p.high, log=p.log, step=p.step)
    if p.type == "int":
        assert p.low is not None and p.high is not None
        return optuna.distributions.IntDistribution(int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
    return optuna.distributions.CategoricalDistribution(list(p.choices))


def study_settings(spec: StudySpec, options: RunOptions) -> dict[str, Any]:
    """What a study records of the settings a run trains with (:data:`SETTINGS_KEY`): the
    config of its baseline; :func:`check_same_settings` compares the fixed ones."""
    return trial_config(spec, options, baseline_params(spec, options), 0).to_dict()


def check_same_settings(study: optuna.Study, spec: StudySpec, options: RunOptions) -> None:
    """A run joins a study only with the settings its trials trained with: the fixed settings
    (every config field but the searched ones, the seed and what changes only speed) of its
    latest recorded trial and of the study's own record (:data:`SETTINGS_KEY`, written when
    it was prepared, so a run that joins before any trial has trained is checked too), and
    search-space distributions Optuna can continue. Otherwise its values would sit beside
    values that do not compare (another epoch count, subset, batch size, loss...). A study
    from before that record is checked against its trials only."""
    trials = study.get_trials(deepcopy=False)
    recorded = [t for t in trials if isinstance(t.user_attrs.get("config"), dict)]
    name = study.study_name
    hint = "run it with the study's settings, or give this run another --study-name"
    saved_settings: list[tuple[dict[str, Any], str]] = []
    if recorded:
        saved_settings.append((recorded[-1].user_attrs["config"], f"trial {recorded[-1].number}"))
    if isinstance(study.user_attrs.get(SETTINGS_KEY), dict):
        saved_settings.append((study.user_attrs[SETTINGS_KEY], "recorded when the study was prepared"))
    if saved_settings:
        searched = set(spec.search) | {k for t in recorded for k in t.params} | {"seed"}
        number = recorded[-1].number if recorded else 0
        config = trial_config(spec, options, baseline_params(spec, options), number)
        now = {k: v for k, v in config.to_dict().items() if k not in searched}
        for settings, where in saved_settings:
            saved = {k: v for k, v in settings.items() if k not in searched}
            change = first_change(saved, now, config)
            if change:
                k, was, will = change
                raise DlopsError(
                    f"study {name!r} trains with {k} = {was!r} ({where}), this run with {k} = {will!r}: {hint}"
                )
    seen: dict[str, optuna.distributions.BaseDistribution] = {}
    for t in trials:
        seen.update(t.distributions)
    for param, p in spec.search.items():
        if param in seen:
            try:
                optuna.distributions.check_distribution_compatibility(seen[param], distribution(p))
            except ValueError:
                raise DlopsError(
                    f"study {name!r} searched {param} as {seen[param]}, this spec as {distribution(p)}: {hint}"
                ) from None


def suggest_params(trial: optuna.Trial, spec: StudySpec) -> dict[str, Any]:
    """A trial's values for the search space, in spec order; a conditional parameter
    (``when``) is suggested only where it is live."""
    params: dict[str, Any] = {}
    for name, p in spec.search.items():
        if p.active(params):
            params[name] = suggest(trial, p)
    return params


def storage_identity(url: str | None) -> str:
    """What tells one storage from another: the database or journal file itself for SQLite
    and journal URLs (however the path is written), the database for PostgreSQL and Redis
    URLs (however the URL is spelled: :func:`dlops.storage.server_identity`), else the URL
    without its password."""
    url = url or default_storage_url()
    kind = storage_kind(url)
    if kind == "sqlite":
        path = sqlite_path(url)
        return f"sqlite:{path.resolve() if path is not None else ':memory:'}"
    if kind == "journal":
        return f"journal:{journal_path(url).resolve()}"
    return server_identity(url)


def checkpoint_path(study_name: str, trial_key: int, storage: str | None = None) -> Path:
    """The checkpoint of trial ``trial_key``: one folder per study, by its exact name (a slug
    and a hash, so ``a/b`` and ``a_b`` never share one) and, for a storage other than
    ``$DLOPS_HOME/dlops.db``, by its storage too (two studies of one name in two storages
    never share, or clear, each other's checkpoints). The bare folder belongs to that one
    file, not to whatever ``$DLOPS_STORAGE`` names at the moment: a run with the variable
    set and one without it are two storages."""
    folder = folder_name(study_name)
    where = storage_identity(storage)
    if where != storage_identity(sqlite_url(dlops_home() / "dlops.db")):
        folder += "-" + hashlib.sha256(where.encode()).hexdigest()[:8]
    return checkpoints_dir() / folder / f"trial-{trial_key}.pt"


def remove_checkpoint(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".tmp")):
        p.unlink(missing_ok=True)
    try:
        path.parent.rmdir()  # the study's folder, once its last trial is done
    except OSError:
        pass


def checkpointed_epochs(path: Path, config: TrainerConfig, say: Callable[[str], None] | None = None) -> int | None:
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
    saved, now = state.get("config"), config.to_dict()
    if isinstance(saved, dict) and isinstance(now, dict) and not config_matches(saved, now, config_defaults(config)):
        remove_checkpoint(path)
        return None
    epoch = state.get("epoch")
    return int(epoch) + 1 if isinstance(epoch, int) else 0


def make_objective(
    spec: StudySpec,
    options: RunOptions,
    on_epoch: EpochCallback | None = None,
    *,
    stop: GracefulStop | None = None,
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
        ckpt = checkpoint_path(trial.study.study_name, key, options.storage)
        resumed = checkpointed_epochs(ckpt, config, say)
        if resumed is not None:
            trial.set_user_attr("resumed_from", {"trial": key, "epoch": resumed})
            if say is not None:
                say(
                    f"trial {trial.number} retries trial {key}: resuming from its checkpoint "
                    f"({plural(resumed, 'epoch')} done)"
                )
        last_epoch = config.epochs
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
                trial.set_user_attr("stopped_reason", f"pruned after epoch {epoch + 1} ({spec.metric}={value:.4f})")
                raise optuna.TrialPruned()
            if stop is not None and stop.requested and (last_epoch is None or epoch + 1 < last_epoch):
                trial.set_user_attr(
                    "stopped_reason", f"interrupted after epoch {epoch + 1}; queued again to resume from its checkpoint"
                )
                raise interrupted(trial.number, epoch)

        def progress(line: str) -> None:
            """A trainer's own progress line (the autoencoder's pretraining epochs, each
            checkpointed before its line): printed per trial, and where a stop was asked
            for, the trial stops there as at an epoch end, its pretraining kept to resume
            (the pretraining alone can take hours)."""
            if say is not None:
                say(f"{trial_label(trial.number)}  {line}")
            if stop is not None and stop.requested:
                head = re.match(r"(.*?\d)\s{2,}", line)  # "pretraining AE 2 epoch   3", without the figures
                what = " ".join((head.group(1) if head else line).split())
                trial.set_user_attr(
                    "stopped_reason", f"interrupted after {what}; queued again to resume from its checkpoint"
                )
                raise TrialInterrupted(f"interrupted after {what}")

        keep_checkpoint = False
        try:
            # What runs the trial, for every trainer and however the trial ends (pruned too).
            trial.set_user_attr("device", describe_device(resolve_device(config.device)))
            result = trainer.fit(config, report=report, checkpoint_path=ckpt, progress=progress)
        except NonFiniteLossError as exc:
            # A diverging lr is a result about the search space, not a crash: prune, so
            # the sampler learns from it and the study goes on.
            trial.set_user_attr("stopped_reason", str(exc))
            raise optuna.TrialPruned(str(exc)) from None
        except optuna.TrialPruned as exc:
            # A pruned trial keeps what the trainer hands over with the exception (the
            # autoencoder's layer curves).
            for name, value in getattr(exc, "extra_user_attrs", {}).items():
                trial.set_user_attr(name, value)
            raise
        except (TrialInterrupted, KeyboardInterrupt):
            keep_checkpoint = True  # the retry resumes from it
            raise
        except optuna.exceptions.UpdateFinishedTrialError:
            # Failed meanwhile by another worker, this one silent past its heartbeat's grace
            # period: the retry resumes from the checkpoint.
            keep_checkpoint = True
            raise taken_over(trial.number) from None
        except DlopsError as exc:  # a full disk, a damaged file: the trial fails with one line
            trial.set_user_attr("stopped_reason", str(exc))
            raise
        except Exception:
            reason = storage_outage(trial.storage)
            if reason is None:
                raise
            # The storage is gone (the trial cannot even be recorded FAIL): it stays RUNNING,
            # and the run that re-queues it resumes from this checkpoint.
            keep_checkpoint = True
            raise StorageLost(options.storage or default_storage_url(), reason) from None
        finally:
            if not keep_checkpoint:
                remove_checkpoint(ckpt)
        try:
            trial.set_user_attr("history", json_safe(result.history))
            # A trainer may hand over more per-trial results (the autoencoder's layer curves).
            for name, value in result.extra_user_attrs.items():
                trial.set_user_attr(name, value)
        except optuna.exceptions.UpdateFinishedTrialError:
            raise taken_over(trial.number) from None
        return float(result.metrics[spec.metric])

    return objective
