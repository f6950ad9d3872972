"""The files of a reference run in the study storage: uploaded to the Optuna artifact
store under ``$DLOPS_HOME/artifacts`` and attached to the trial its settings came from
(or to the study), so ``dlops dashboard`` shows them.

This reaches into Optuna's storage (``study._storage``, ``_study_id``, ``_trial_id``):
a finished trial is read-only through the public API.
"""

from __future__ import annotations

import json
import mimetypes
import uuid
from pathlib import Path
from typing import Iterable

import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound

from dlops.paths import artifacts_dir

FINAL_ARTIFACTS_KEY = "dlops:final_artifacts:"  # study system attr: earlier uploads per spec
DASHBOARD_TRIAL_ARTIFACT = "dashboard:artifacts:{trial_id}:{artifact_id}"


def attach_artifacts(study: optuna.Study, files: Iterable[Path], trial_number: int | None = None,
                     tag: str = "final") -> list[str]:
    """Upload ``files`` to the artifact store under ``$DLOPS_HOME/artifacts`` and
    attach them to trial ``trial_number`` of ``study`` (or to the study itself).

    A finished trial is read-only in Optuna's storage, so a trial's files are attached
    the way optuna-dashboard attaches its own uploads: a study attribute
    ``dashboard:artifacts:<trial_id>:<artifact_id>``, which the dashboard lists on that
    trial's page. Files attached by an earlier run with the same ``tag`` are withdrawn
    (trial attachments) so a trial shows only the latest reference run.
    """
    root = artifacts_dir()
    root.mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(str(root))
    storage, study_id = study._storage, study._study_id
    key = FINAL_ARTIFACTS_KEY + tag
    for attr_key, artifact_id in storage.get_study_system_attrs(study_id).get(key, []):
        if attr_key.startswith("dashboard:"):  # Optuna's own lister cannot skip nulled artifacts:* keys
            storage.set_study_system_attr(study_id, attr_key, json.dumps(None))
            try:
                store.remove(artifact_id)
            except ArtifactNotFound:
                pass
    trial_id = None
    if trial_number is not None:
        trial_id = next(t._trial_id for t in study.get_trials(deepcopy=False) if t.number == trial_number)
    attached: list[list[str]] = []
    for path in files:
        if trial_id is None:
            artifact_id = upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=study)
            attached.append(["artifacts:" + artifact_id, artifact_id])
            continue
        artifact_id = str(uuid.uuid4())
        mimetype, encoding = mimetypes.guess_type(path.name)
        with open(path, "rb") as f:
            store.write(artifact_id, f)
        attr_key = DASHBOARD_TRIAL_ARTIFACT.format(trial_id=trial_id, artifact_id=artifact_id)
        meta = {"artifact_id": artifact_id, "filename": path.name,
                "mimetype": mimetype or "application/octet-stream", "encoding": encoding}
        storage.set_study_system_attr(study_id, attr_key, json.dumps(meta))
        attached.append([attr_key, artifact_id])
    storage.set_study_system_attr(study_id, key, attached)
    return [artifact_id for _, artifact_id in attached]
