"""Reading studies back: listing, describing, serving the dashboard."""

from __future__ import annotations

from typing import Any

import optuna

from dlops.errors import DlopsError
from dlops.paths import artifacts_dir
from dlops.search import summarize
from dlops.storage import mask_url, open_storage


def list_studies(url: str) -> list[dict[str, Any]]:
    storage = open_storage(url)
    rows = []
    for s in optuna.get_all_study_summaries(storage, include_best_trial=True):
        study = optuna.load_study(study_name=s.study_name, storage=storage)
        summary = summarize(study)
        rows.append({
            "name": s.study_name,
            "n_trials": summary["n_trials"],
            "states": summary["states"],
            "best_value": summary["best"]["value"] if summary["best"] else None,
        })
    return rows


def load_existing_study(name: str, url: str) -> optuna.Study:
    storage = open_storage(url)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    if name not in names:
        known = ", ".join(names) or "none"
        raise DlopsError(f"no study named {name!r} in {mask_url(url)} (studies: {known})")
    return optuna.load_study(study_name=name, storage=storage)


def describe_study(name: str, url: str) -> dict[str, Any]:
    from dlops.replay import epochs_summary, pruned_by_pruner

    study = load_existing_study(name, url)
    info = summarize(study)
    info["epochs"] = epochs_summary(study.get_trials(deepcopy=False))
    info["trials"] = [
        {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "params": t.params,
            "epochs": len(t.intermediate_values),
            "stop_epoch": len(t.intermediate_values) if pruned_by_pruner(t) else None,
            "baseline": bool(t.user_attrs.get("baseline", False)),
            "stopped_reason": t.user_attrs.get("stopped_reason"),
            "duration_s": t.duration.total_seconds() if t.duration else None,
        }
        for t in study.get_trials(deepcopy=False)
    ]
    return info


def dashboard_app(url: str):
    """optuna-dashboard's WSGI app on the study storage, with dlops's artifact store."""
    import optuna_dashboard
    from optuna.artifacts import FileSystemArtifactStore

    storage = open_storage(url)
    artifacts = artifacts_dir()
    artifacts.mkdir(parents=True, exist_ok=True)
    return optuna_dashboard.wsgi(storage, artifact_store=FileSystemArtifactStore(str(artifacts)))


def serve_dashboard(url: str, host: str, port: int) -> None:
    from wsgiref.simple_server import make_server

    app = dashboard_app(url)
    try:
        server = make_server(host, port, app)
    except OSError as exc:
        raise DlopsError(f"cannot serve the dashboard on {host}:{port}: {exc.strerror}") from None
    with server:
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
