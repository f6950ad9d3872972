"""`dlops dashboard` serves optuna-dashboard on the same storage."""

from __future__ import annotations

import io
import json
from pathlib import Path

import optuna

from dlops.dashboard import dashboard_app
from dlops.paths import default_storage_url


def call(app, path: str) -> tuple[str, bytes]:
    status: list[str] = []
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8080",
        "wsgi.input": io.BytesIO(),
        "wsgi.errors": io.StringIO(),
        "wsgi.url_scheme": "http",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.version": (1, 0),
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    body = b"".join(app(environ, lambda s, h, exc_info=None: status.append(s)))
    return status[0], body


def test_dashboard_lists_the_studies_of_the_storage(dlops_home: Path) -> None:
    url = default_storage_url()
    assert url == f"sqlite:///{dlops_home / 'dlops.db'}"
    dlops_home.mkdir(parents=True)
    study = optuna.create_study(study_name="resnet18-ce", storage=url, direction="maximize")
    study.optimize(lambda t: t.suggest_float("lr", 1e-4, 1e-1, log=True), n_trials=2)
    status, body = call(dashboard_app(url), "/api/studies")
    assert status.startswith("200")
    payload = json.loads(body)
    names = [s["study_name"] for s in payload["study_summaries"]]
    assert names == ["resnet18-ce"]
