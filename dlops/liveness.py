"""Who runs a trial, proving that worker dead, and queueing the trial again.

A worker records who runs each trial (host, boot id, pid and the pid's start time, and the
run it belongs to) in the trial's system attrs under :data:`OWNER_KEY`. A RUNNING trial
whose worker ran on this machine and is gone (no such pid, a different process now holds
the pid, a zombie, or the machine has rebooted since) is proven dead: it is marked FAIL and
re-queued, and the retry resumes from the trial's last checkpoint. Trials of workers on
other machines are recovered by Optuna's heartbeats on PostgreSQL; the journal storages
have none, so there a dead worker on another machine leaves its trial RUNNING (shown by
``dlops study show``; it does not block other workers).

Every process of a run (a ``dlops study run`` and each of its workers) also records itself
in the study's system attrs while it is in the study (:func:`register_process`, under
:data:`LIVE_PREFIX`), so ``dlops study delete`` can tell a study in use on this machine
even between two trials, when none of its trials is RUNNING.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from dlops.io import identity_gone, process_identity
from dlops.storage import RETRY_LIMIT, StudyStorage

OWNER_KEY = "dlops:worker"  # trial system attr: who runs it
RUN_FIELD = "run"  # in a trial's owner: the run (one `dlops study run`, all its workers)
LIVE_PREFIX = "dlops:live:"  # study system attrs: a process of a run in the study (None once it left)

Say = Callable[[str], None]


def identity(run_id: str) -> dict[str, Any]:
    """The owner record of a trial this process runs for the run ``run_id``."""
    return {**worker_identity(), RUN_FIELD: run_id}


def of_run(trial: FrozenTrial, run_id: str) -> bool:
    """Whether ``trial`` ran (or runs) in the run ``run_id``: its owner names the run."""
    return bool((trial.system_attrs.get(OWNER_KEY) or {}).get(RUN_FIELD) == run_id)


worker_identity = process_identity  # this process, as it records itself in a study
is_dead = identity_gone  # True: provably gone; False: runs; None: ran on another machine


def register_process(study: optuna.Study, run_id: str, role: str) -> Callable[[], None]:
    """Record this process (``role``: ``parent``, ``w0``, ...) of the run ``run_id`` as in
    ``study`` until the returned function, called when it leaves, clears the record. A record
    left by a killed process is told apart by :func:`live_processes_here` (its pid is gone)."""
    key = f"{LIVE_PREFIX}{run_id}:{role}"
    storage, study_id = study._storage, study._study_id
    storage.set_study_system_attr(study_id, key, worker_identity())

    def leave() -> None:
        try:
            storage.set_study_system_attr(study_id, key, None)
        except Exception:  # noqa: BLE001 - the study is gone, or the storage with it: nothing to clear
            pass

    return leave


def live_processes_here(system_attrs: dict[str, Any]) -> list[int]:
    """The pids of this machine's processes of runs that are in the study (its system attrs):
    records cleared or left by processes that are gone, and those of other machines, are not."""
    return sorted(
        int(owner["pid"])
        for key, owner in system_attrs.items()
        if key.startswith(LIVE_PREFIX) and isinstance(owner, dict) and "pid" in owner and is_dead(owner) is False
    )


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
