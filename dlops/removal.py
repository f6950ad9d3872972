"""``dlops study delete``: a study goes from its storage with what dlops keeps for it
elsewhere (its trials' checkpoints, the files it showed on the dashboard), and never while
one of its workers may still be running a trial.

What other runs made from it stays: a ``dlops final`` run records its settings in its own
``final.json``, and the next ``dlops report`` leaves out a study that is gone.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import TrialState

from dlops.errors import DlopsError
from dlops.liveness import OWNER_KEY, is_dead, live_processes_here
from dlops.paths import artifacts_dir
from dlops.storage import StudyStorage, connect, mask_url
from dlops.studies import state_counts
from dlops.text import plural


@dataclass
class Deletion:
    """What deleting a study removes (see :func:`plan_deletion`)."""

    name: str
    url: str
    states: dict[str, int]
    artifact_ids: list[str]
    checkpoints: Path
    has_checkpoints: bool
    running_here: list[int] = field(default_factory=list)  # trials whose worker runs on this machine
    running_elsewhere: list[int] = field(default_factory=list)  # trials of workers nothing here can see
    live_here: list[int] = field(default_factory=list)  # pids of this machine's `dlops study run` processes in it

    @property
    def n_trials(self) -> int:
        return sum(self.states.values())

    def summary(self) -> str:
        states = ", ".join(f"{n} {s.lower()}" for s, n in self.states.items() if n) or "no trials"
        files = [plural(len(self.artifact_ids), "dashboard file")]
        if self.has_checkpoints:
            files.append(f"the checkpoints in {self.checkpoints}")
        return (
            f"study {self.name} in {mask_url(self.url)}: {plural(self.n_trials, 'trial')} ({states}), "
            f"with {' and '.join(files)}"
        )


def artifact_ids(study: optuna.Study) -> list[str]:
    """The artifacts the study and its trials hold (Optuna's ``artifacts:<id>`` attrs and the
    dashboard's ``dashboard:artifacts:<trial>:<id>``), those withdrawn (null) left out."""
    found: list[str] = []

    def collect(attrs: dict[str, Any]) -> None:
        for key, meta in attrs.items():
            if not isinstance(key, str) or not key.startswith(("artifacts:", "dashboard:artifacts:")):
                continue
            try:
                withdrawn = json.loads(meta) is None if isinstance(meta, str) else meta is None
            except ValueError:
                withdrawn = False
            artifact_id = key.rsplit(":", 1)[-1]
            if not withdrawn and artifact_id and artifact_id not in found:
                found.append(artifact_id)

    collect(study._storage.get_study_system_attrs(study._study_id))
    for trial in study.get_trials(deepcopy=False):
        collect(trial.system_attrs)
    return found


def plan_deletion(storage: StudyStorage, name: str) -> Deletion:
    """What deleting ``name`` would remove, and which of its trials may still be running."""
    from dlops.objective import checkpoint_path  # torch: only once there is a study to delete

    names = [s.study_name for s in optuna.get_all_study_summaries(storage.optuna, include_best_trial=False)]
    if name not in names:
        raise DlopsError(f"no study named {name!r} in {storage.masked} (studies: {', '.join(names) or 'none'})")
    study = optuna.load_study(study_name=name, storage=storage.optuna)
    plan = Deletion(
        name=name,
        url=storage.url,
        states=state_counts(study),
        artifact_ids=artifact_ids(study),
        checkpoints=checkpoint_path(name, 0, storage.url).parent,
        has_checkpoints=checkpoint_path(name, 0, storage.url).parent.is_dir(),
    )
    plan.live_here = live_processes_here(study._storage.get_study_system_attrs(study._study_id))
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.system_attrs.get(OWNER_KEY)
        alive = is_dead(owner) if isinstance(owner, dict) and "pid" in owner else None
        if alive is False:
            plan.running_here.append(trial.number)
        elif alive is None:
            plan.running_elsewhere.append(trial.number)
    return plan


def check_deletable(plan: Deletion, *, force: bool) -> None:
    """A study with a trial whose worker runs here, or with a ``dlops study run`` of this
    machine in it (between two trials, or starting), is never deleted (the run would fail
    on a study that is gone); one whose running trials nothing here can see is deleted only
    with ``force`` (their workers may be dead, or running on another machine)."""
    if plan.running_here:
        raise DlopsError(
            f"study {plan.name} has {_trials(plan.running_here)} running on this machine: "
            "stop its workers (Ctrl-C) before deleting it"
        )
    if plan.live_here:
        pids = plan.live_here
        raise DlopsError(
            f"study {plan.name} is in use by a dlops study run on this machine ({'pid' if len(pids) == 1 else 'pids'} "
            f"{', '.join(map(str, pids))}), between two trials or starting: stop it (Ctrl-C) before deleting it"
        )
    if plan.running_elsewhere and not force:
        raise DlopsError(
            f"study {plan.name} has {_trials(plan.running_elsewhere)} RUNNING whose workers are not on this "
            "machine (or not known): stop them first, or add --force if they are gone"
        )


def delete_study(storage: StudyStorage, name: str, *, force: bool = False) -> Deletion:
    """Delete the study ``name`` under its lock (no worker starts a trial meanwhile), then
    its checkpoint folder and its dashboard files. Returns what was removed."""
    with storage.lock(name):
        plan = plan_deletion(storage, name)
        check_deletable(plan, force=force)
        optuna.delete_study(study_name=name, storage=storage.optuna)
    shutil.rmtree(plan.checkpoints, ignore_errors=True)
    store = FileSystemArtifactStore(str(artifacts_dir()))
    for artifact_id in plan.artifact_ids:
        try:
            store.remove(artifact_id)
        except (ArtifactNotFound, OSError):
            pass  # not on this machine (another one's $DLOPS_HOME), or removed by hand
    return plan


def open_for_deletion(url: str) -> StudyStorage:
    """The storage at ``url``, which must exist (nothing is created)."""
    return connect(url, create=False)


def _trials(numbers: list[int]) -> str:
    return f"{'trial' if len(numbers) == 1 else 'trials'} {', '.join(map(str, numbers))}"
