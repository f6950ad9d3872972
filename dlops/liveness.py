"""Who runs a trial, proving that worker dead, and queueing the trial again.

A worker records who runs each trial (host, boot id, pid and the pid's start time, and the
run it belongs to) in the trial's system attrs under :data:`OWNER_KEY`. A RUNNING trial
whose worker ran on this machine and is gone (no such pid, a different process now holds
the pid, a zombie, or the machine has rebooted since) is proven dead: it is marked FAIL and
re-queued, and the retry resumes from the trial's last checkpoint. Trials of workers on
other machines are recovered by Optuna's heartbeats on PostgreSQL; the journal storages
have none, so there a dead worker on another machine leaves its trial RUNNING (shown by
``dlops study show``; it does not block other workers).
"""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from dlops.io import process_gone, process_stat
from dlops.storage import RETRY_LIMIT, StudyStorage

OWNER_KEY = "dlops:worker"  # trial system attr: who runs it
RUN_FIELD = "run"  # in a trial's owner: the run (one `dlops study run`, all its workers)

Say = Callable[[str], None]


def identity(run_id: str) -> dict[str, Any]:
    """The owner record of a trial this process runs for the run ``run_id``."""
    return {**worker_identity(), RUN_FIELD: run_id}


def of_run(trial: FrozenTrial, run_id: str) -> bool:
    """Whether ``trial`` ran (or runs) in the run ``run_id``: its owner names the run."""
    return bool((trial.system_attrs.get(OWNER_KEY) or {}).get(RUN_FIELD) == run_id)


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def worker_identity() -> dict[str, Any]:
    stat = process_stat(os.getpid())
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": os.getpid(), "started": stat[1] if stat else None}


def is_dead(owner: dict[str, Any]) -> bool | None:
    """True when the worker ``owner`` is provably gone, False when it runs, None when it
    ran on another machine (nothing here can tell)."""
    if owner.get("host") != socket.gethostname():
        return None
    boot = _boot_id()
    if owner.get("boot") and boot and owner["boot"] != boot:
        return True  # this machine rebooted since: every process of then is gone
    return process_gone(int(owner["pid"]), owner.get("started"))


def retry_trial(study: optuna.Study, trial: FrozenTrial, max_retry: int | None = RETRY_LIMIT) -> None:
    """Queue a WAITING copy of a failed ``trial`` (same params) the way Optuna's heartbeat
    retry does, so ``RetryHeartbeatStaleTrialCallback.retried_trial_number`` names the original."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)(study, trial)


STALE_REASON = "no heartbeat for the grace period (its worker stalled, slept or lost the storage); re-queued"


def recover_dead_trials(
    study: optuna.Study, storage: StudyStorage, say: Say | None = None, trials: Sequence[FrozenTrial] | None = None
) -> dict[int, str]:
    """Fail and re-queue the RUNNING trials whose workers are provably dead; with heartbeats
    on, also those whose heartbeat went stale (Optuna's ``fail_stale_trials``, whose
    ``RetryHeartbeatStaleTrialCallback`` re-queues them). Returns the trials failed here
    (heartbeat-failed ones included): number -> why. ``trials``: the study's trials, if at hand."""
    recovered: dict[int, str] = {}
    if trials is None:
        trials = study.get_trials(deepcopy=False)
    running = [t for t in trials if t.state == TrialState.RUNNING]
    if storage.heartbeat and running:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        now = [storage.optuna.get_trial(t._trial_id) for t in running]
        stale = [t.number for t in now if t.state == TrialState.FAIL]
        recovered.update(dict.fromkeys(stale, STALE_REASON))
        running = [t for t in now if t.state == TrialState.RUNNING]
        if say and stale:
            say(
                f"{'trial' if len(stale) == 1 else 'trials'} {', '.join(map(str, stale))}: no heartbeat for the "
                "grace period; marked FAIL and queued again"
            )
    for t in running:
        owner = t.system_attrs.get(OWNER_KEY)
        if not owner or is_dead(owner) is not True:
            continue
        reason = f"worker pid {owner['pid']} on {owner['host']} died during the trial; re-queued"
        try:
            storage.optuna.set_trial_user_attr(t._trial_id, "stopped_reason", reason)
            if not storage.optuna.set_trial_state_values(t._trial_id, TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
        retry_trial(study, storage.optuna.get_trial(t._trial_id))
        recovered[t.number] = reason
        if say:
            say(f"trial {t.number}: its worker (pid {owner['pid']}) is gone; marked FAIL and queued again")
    return recovered


def worth_waiting_for(trial: FrozenTrial, storage: StudyStorage) -> bool:
    """A RUNNING trial that will end by itself: its worker lives here, or heartbeats will
    fail it if its worker on another machine dies."""
    owner = trial.system_attrs.get(OWNER_KEY)
    if not owner:
        return False
    alive = is_dead(owner)
    return alive is False or (alive is None and storage.heartbeat)
