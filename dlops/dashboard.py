"""optuna-dashboard's side of a study: its notes, the study's plot artifacts, and the server.

It reaches into the storage below Optuna's public study API: notes are
optuna-dashboard's own format (a version and chunks of study system attrs, written here
without importing optuna-dashboard, whose import loads scikit-learn: 1.8 s of a study
run's start on a laptop; ``tests/test_notes.py`` reads and writes them both ways through
optuna-dashboard itself); plot artifacts keep their ids in a study system
attr so a refresh replaces the file instead of adding an artifact; a reference run's
files (``dlops final``) are attached to the finished trial its settings came from, which
the public API keeps read-only. All of it works on every storage (SQLite, PostgreSQL,
journal file, Redis journal).
"""

from __future__ import annotations

import json
import mimetypes
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound

from dlops.errors import DlopsError
from dlops.io import write_atomic
from dlops.paths import artifacts_dir
from dlops.storage import StorageWriteRefused, mask_url, open_storage, write_refusal

STUDY_PLOTS_KEY = "dlops:study_plots"  # study system attr: plot file name -> artifact id
FINAL_ARTIFACTS_KEY = "dlops:final_artifacts:"  # study system attr: earlier uploads per spec
DASHBOARD_TRIAL_ARTIFACT = "dashboard:artifacts:{trial_id}:{artifact_id}"


def _system_attrs(study: optuna.Study) -> dict[str, Any]:
    return study._storage.get_study_system_attrs(study._study_id)


NOTE_CHUNK = 2045  # optuna-dashboard's SYSTEM_ATTR_MAX_LENGTH: characters per system attr


def note_ver_key(trial_id: int | None) -> str:
    return "dashboard:note_ver" if trial_id is None else f"dashboard:{trial_id}:note_ver"


def note_str_key_prefix(trial_id: int | None) -> str:
    return "dashboard:note_str:" if trial_id is None else f"dashboard:{trial_id}:note_str:"


def split_body(body: str, trial_id: int | None) -> dict[str, str]:
    prefix = note_str_key_prefix(trial_id)
    return {f"{prefix}{i}": body[start : start + NOTE_CHUNK] for i, start in enumerate(range(0, len(body), NOTE_CHUNK))}


def read_note(study: optuna.Study, trial_id: int | None = None, attrs: dict[str, Any] | None = None) -> str:
    """The note of the study (``trial_id`` None) or of one of its trials ('' if none):
    the chunks 0, 1, ... as many as there are chunk attrs (cleared ones are '')."""
    attrs = _system_attrs(study) if attrs is None else attrs
    if note_ver_key(trial_id) not in attrs:
        return ""
    prefix = note_str_key_prefix(trial_id)
    count = sum(key.startswith(prefix) for key in attrs)
    return "".join(str(attrs[f"{prefix}{i}"]) for i in range(count))


def save_note(study: optuna.Study, trial_id: int | None, body: str, attrs: dict[str, Any] | None = None) -> None:
    """optuna-dashboard's note format (a version, then the body in chunks of study system
    attrs), writing only the chunks that changed: each write is a commit on SQLite and
    PostgreSQL, and a refreshed study note mostly changes at its end."""
    storage, study_id = study._storage, study._study_id
    attrs = storage.get_study_system_attrs(study_id) if attrs is None else attrs
    prefix = note_str_key_prefix(trial_id)
    old = {k: v for k, v in attrs.items() if k.startswith(prefix)}
    new = split_body(body, trial_id)
    storage.set_study_system_attr(study_id, note_ver_key(trial_id), int(attrs.get(note_ver_key(trial_id), 0)) + 1)
    for key, chunk in new.items():
        if old.get(key) != chunk:
            storage.set_study_system_attr(study_id, key, chunk)
    for i in range(len(new), len(old)):
        if old.get(f"{prefix}{i}"):
            storage.set_study_system_attr(study_id, f"{prefix}{i}", "")


def trial_id(trial: optuna.trial.FrozenTrial) -> int:
    """The storage's id of ``trial`` (notes are keyed by it, not by the trial number)."""
    return int(trial._trial_id)


def _writer(data: bytes) -> Callable[[BinaryIO], None]:
    def write(f: BinaryIO) -> None:
        f.write(data)

    return write


def attach_study_plots(study: optuna.Study, files: Iterable[Path]) -> dict[str, str]:
    """Attach the study's plot files to the study in the artifact store under
    ``$DLOPS_HOME/artifacts``. A file name attached before keeps its artifact id and its
    content is replaced (atomically), so refreshing never piles up artifacts. Returns
    file name -> artifact id. A storage that refuses the write (read-only, locked) raises
    :class:`StorageWriteRefused` and leaves no new file in the artifact store."""
    root = artifacts_dir()
    root.mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(str(root))
    storage, study_id = study._storage, study._study_id
    attrs = storage.get_study_system_attrs(study_id)
    known: dict[str, str] = dict(attrs.get(STUDY_PLOTS_KEY) or {})
    changed = False
    for path in files:
        path = Path(path)
        artifact_id = known.get(path.name)
        meta = attrs.get("artifacts:" + artifact_id) if artifact_id else None
        if artifact_id and meta and json.loads(meta) is not None:  # not deleted in the dashboard (it leaves "null")
            write_atomic(root / artifact_id, _writer(path.read_bytes()))
            continue
        known[path.name] = _upload_study_plot(study, store, path)
        changed = True
    if changed:
        _set_plot_attr(study, STUDY_PLOTS_KEY, known)
    return known


def _set_plot_attr(study: optuna.Study, key: str, value: Any) -> None:
    """Set a study system attr of its plots; a storage that refuses the write (read-only,
    locked) raises :class:`StorageWriteRefused` in one line."""
    try:
        study._storage.set_study_system_attr(study._study_id, key, value)
    except Exception as exc:  # noqa: BLE001 - any driver's refusal: the storage is not writable now
        raise StorageWriteRefused(
            f"could not attach the plots of study {study.study_name} to the dashboard: the storage refused "
            f"the write ({write_refusal(exc)})"
        ) from None


def _upload_study_plot(study: optuna.Study, store: FileSystemArtifactStore, path: Path) -> str:
    """Optuna's ``upload_artifact`` for a study, except that where the storage refuses
    the artifact's attr the file written to the store is removed again (no orphan)."""
    artifact_id = str(uuid.uuid4())
    mimetype, encoding = mimetypes.guess_type(path.name)
    with open(path, "rb") as f:
        store.write(artifact_id, f)
    meta = {
        "artifact_id": artifact_id,
        "filename": path.name,
        "mimetype": mimetype or "application/octet-stream",
        "encoding": encoding,
    }
    try:
        _set_plot_attr(study, "artifacts:" + artifact_id, json.dumps(meta))
    except BaseException:
        store.remove(artifact_id)
        raise
    return artifact_id


def study_plot_ids(study: optuna.Study) -> dict[str, str]:
    """Plot file name -> artifact id of the plots attached to ``study``."""
    raw = _system_attrs(study).get(STUDY_PLOTS_KEY) or {}
    return dict(raw) if isinstance(raw, dict) else json.loads(raw)


def dashboard_app(url: str):
    """optuna-dashboard's WSGI app on the study storage, with dlops's artifact store."""
    import optuna_dashboard

    storage = open_storage(url, create=False)  # a mistyped path: one line, no new database
    artifacts = artifacts_dir()
    artifacts.mkdir(parents=True, exist_ok=True)
    return optuna_dashboard.wsgi(storage, artifact_store=FileSystemArtifactStore(str(artifacts)))


def missing_artifacts(url: str) -> int:
    """How many artifacts the storage's studies list (plots, final runs) are not in this
    machine's artifact store: stored under another ``$DLOPS_HOME`` (another machine of a
    shared storage), the dashboard cannot show them."""
    here = artifacts_dir()
    missing = 0
    for study in open_storage(url, create=False).get_all_studies():
        for key, meta in study.system_attrs.items():
            if not key.startswith(("dashboard:artifacts:", "artifacts:")) or json.loads(meta or "null") is None:
                continue  # not an artifact, or one taken off the dashboard (its metadata null)
            missing += not (here / key.rsplit(":", 1)[-1]).exists()
    return missing


def dashboard_server(host: str, port: int, app: Any) -> Any:
    """wsgiref's server for ``app`` on ``host:port``: IPv6 for an address with a colon
    (``::1``, ``[::1]``, ``::`` for every interface), which the plain IPv4 server refused
    ("Address family for hostname not supported"). One line where it cannot listen."""
    import socket
    from wsgiref import simple_server

    address = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    kwargs: dict[str, Any] = {}
    if ":" in address:

        class IPv6Server(simple_server.WSGIServer):
            address_family = socket.AF_INET6

        kwargs["server_class"] = IPv6Server
    try:
        return simple_server.make_server(address, port, app, **kwargs)
    except OSError as exc:
        raise DlopsError(f"cannot serve the dashboard on {host}:{port}: {exc.strerror or exc}") from None


def server_url(server: Any) -> str:
    """The address a browser opens for ``server``: the one it is bound to (``0.0.0.0`` for
    ``--host ''``, which read ``http://:8080/``), an IPv6 one in brackets."""
    host, port = server.server_address[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def serve_dashboard(url: str, host: str, port: int, ready: Callable[[str], None] | None = None) -> None:
    """Serve the dashboard until Ctrl-C; ``ready`` gets the lines to print once the storage
    is open and the port is taken (its password masked), and a note on artifacts stored on
    another machine."""
    app = dashboard_app(url)
    server = dashboard_server(host, port, app)
    if ready is not None:
        ready(f"optuna-dashboard for {mask_url(url)} on {server_url(server)} (Ctrl-C stops)")
        missing = missing_artifacts(url)
        if missing:
            ready(
                f"note: {missing} of the artifacts the studies list are not in {artifacts_dir()} (stored under "
                "another $DLOPS_HOME, another machine's?): the dashboard cannot show those"
            )
    with server:
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass


# --- the files of a reference run --------------------------------------------------


def attach_artifacts(
    study: optuna.Study, files: Iterable[Path], trial_number: int | None = None, tag: str = "final"
) -> list[str]:
    """Upload ``files`` to the artifact store under ``$DLOPS_HOME/artifacts`` and
    attach them to trial ``trial_number`` of ``study`` (or to the study itself).

    A finished trial is read-only in Optuna's storage, so a trial's files are attached
    the way optuna-dashboard attaches its own uploads: a study attribute
    ``dashboard:artifacts:<trial_id>:<artifact_id>``, which the dashboard lists on that
    trial's page. What an earlier run with the same ``tag`` attached is replaced, so the
    dashboard shows only the latest reference run: a study attachment of the same file
    name keeps its artifact and gets the new content (Optuna's own lister cannot skip a
    withdrawn ``artifacts:*`` key), every other earlier attachment is withdrawn.
    """
    root = artifacts_dir()
    root.mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(str(root))
    storage, study_id = study._storage, study._study_id
    key = FINAL_ARTIFACTS_KEY + tag
    attrs = storage.get_study_system_attrs(study_id)
    reusable: dict[str, list[str]] = {}  # file name -> [attr key, artifact id] of an earlier study attachment
    for attr_key, artifact_id in attrs.get(key, []):
        meta = json.loads(attrs.get(attr_key) or "null")
        if trial_number is None and attr_key.startswith("artifacts:") and meta is not None:
            reusable[meta["filename"]] = [attr_key, artifact_id]
        else:
            _withdraw(study, store, attr_key, artifact_id)
    trial_id = None
    if trial_number is not None:
        trial_id = next(t._trial_id for t in study.get_trials(deepcopy=False) if t.number == trial_number)
    attached: list[list[str]] = []
    for path in files:
        if trial_id is None:
            earlier = reusable.pop(path.name, None)
            if earlier is not None:  # in place, as the study's plots are refreshed
                write_atomic(root / earlier[1], _writer(path.read_bytes()))
                attached.append(earlier)
                continue
            artifact_id = upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=study)
            attached.append(["artifacts:" + artifact_id, artifact_id])
            continue
        artifact_id = str(uuid.uuid4())
        mimetype, encoding = mimetypes.guess_type(path.name)
        with open(path, "rb") as f:
            store.write(artifact_id, f)
        attr_key = DASHBOARD_TRIAL_ARTIFACT.format(trial_id=trial_id, artifact_id=artifact_id)
        meta = {
            "artifact_id": artifact_id,
            "filename": path.name,
            "mimetype": mimetype or "application/octet-stream",
            "encoding": encoding,
        }
        storage.set_study_system_attr(study_id, attr_key, json.dumps(meta))
        attached.append([attr_key, artifact_id])
    for attr_key, artifact_id in reusable.values():  # files the new run does not have
        _withdraw(study, store, attr_key, artifact_id)
    storage.set_study_system_attr(study_id, key, attached)
    return [artifact_id for _, artifact_id in attached]


def withdraw_artifacts(study: optuna.Study, tag: str = "final") -> int:
    """Withdraw everything :func:`attach_artifacts` attached to ``study`` under ``tag``
    (a reference run that a run attached elsewhere has replaced); returns how many."""
    storage, study_id = study._storage, study._study_id
    key = FINAL_ARTIFACTS_KEY + tag
    attrs = storage.get_study_system_attrs(study_id)
    earlier = attrs.get(key) or []
    if not earlier:
        return 0
    store = FileSystemArtifactStore(str(artifacts_dir()))
    withdrawn = 0
    for attr_key, artifact_id in earlier:
        if json.loads(attrs.get(attr_key) or "null") is not None:  # not already deleted in the dashboard
            withdrawn += 1
        _withdraw(study, store, attr_key, artifact_id)
    storage.set_study_system_attr(study_id, key, [])
    return withdrawn


def _withdraw(study: optuna.Study, store: FileSystemArtifactStore, attr_key: str, artifact_id: str) -> None:
    """Take an attachment off the dashboard as its own Delete button does (the key's
    metadata set to null) and remove its file."""
    study._storage.set_study_system_attr(study._study_id, attr_key, json.dumps(None))
    try:
        store.remove(artifact_id)
    except ArtifactNotFound:
        pass
