"""`dlops dashboard` serves optuna-dashboard on the same storage."""

from __future__ import annotations

import io
import json
from pathlib import Path

import optuna
import pytest

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


def _study_artifacts(app, study: optuna.Study) -> dict[str, bytes]:
    """File name -> content of the study-level artifacts the dashboard shows."""
    status, body = call(app, f"/api/studies/{study._study_id}")
    assert status.startswith("200")
    shown = json.loads(body)["artifacts"]
    return {a["filename"]: call(app, f"/artifacts/{study._study_id}/{a['artifact_id']}")[1] for a in shown}


def test_a_later_final_replaces_the_study_artifacts_of_an_earlier_one(dlops_home: Path, tmp_path: Path) -> None:
    from dlops.dashboard import attach_artifacts

    url = default_storage_url()
    dlops_home.mkdir(parents=True)
    study = optuna.create_study(study_name="resnet18-ce-digits", storage=url, direction="maximize")
    study.optimize(lambda t: t.suggest_float("lr", 1e-4, 1e-1, log=True), n_trials=1)
    app = dashboard_app(url)
    for run in ("first", "second"):  # two `dlops final --params baseline` runs: attached to the study
        files = [tmp_path / "curves.png", tmp_path / "final.json"]
        for f in files:
            f.write_text(f"{f.name} of the {run} run")
        attach_artifacts(study, files, tag="resnet18-ce")
    assert _study_artifacts(app, study) == {
        "curves.png": b"curves.png of the second run",
        "final.json": b"final.json of the second run",
    }
    assert len(optuna.artifacts.get_all_artifact_meta(study)) == 2
    assert len(list((dlops_home / "artifacts").iterdir())) == 2
    # then a run from the best trial: on that trial's page, none left on the study
    attach_artifacts(study, [tmp_path / "curves.png"], trial_number=0, tag="resnet18-ce")
    assert _study_artifacts(app, study) == {}
    assert len(list((dlops_home / "artifacts").iterdir())) == 1


def test_a_port_out_of_range_is_one_line(dlops_home: Path) -> None:
    from typer.testing import CliRunner

    from dlops.cli import app

    for port, bound in (("99999", "65535"), ("-1", "0")):
        result = CliRunner().invoke(app, ["dashboard", "--port", port])
        assert result.exit_code == 2, result.output
        (line,) = result.output.strip().splitlines()
        assert line.startswith("error: Invalid value for '--port'") and line.split("(see")[0].rstrip().endswith(bound)


def _serving_returns_at_once(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """make_server gives a server on port 43210 whose serve_forever returns at once; the
    list it returns records each serving."""
    import wsgiref.simple_server

    served: list[str] = []

    class Server:
        server_address = ("127.0.0.1", 43210)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def serve_forever(self):
            served.append("serving")

    monkeypatch.setattr(wsgiref.simple_server, "make_server", lambda host, port, app, **kwargs: Server())
    return served


def test_the_dashboard_announces_itself_once_serving_with_the_password_masked(
    dlops_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It used to print "optuna-dashboard for URL on ..." (the password too) before opening
    the storage, and then the error for a storage that does not open."""
    from typer.testing import CliRunner

    from dlops import dashboard
    from dlops.cli import app

    bad = "postgresql+psycopg2://user:s3cret@127.0.0.1:1/nowhere"
    result = CliRunner().invoke(app, ["dashboard", "--storage", bad, "--port", "0"])
    assert result.exit_code == 2 and "optuna-dashboard for" not in result.output, result.output
    assert "s3cret" not in result.output and len(result.output.strip().splitlines()) == 1

    served = _serving_returns_at_once(monkeypatch)
    url = f"sqlite:///{dlops_home / 'dlops.db'}"
    dlops_home.mkdir(parents=True, exist_ok=True)
    optuna.create_study(study_name="s", storage=url)
    lines: list[str] = []
    dashboard.serve_dashboard(url, "127.0.0.1", 0, ready=lines.append)
    assert lines == [f"optuna-dashboard for {url} on http://127.0.0.1:43210/ (Ctrl-C stops)"] and served


def test_artifacts_stored_under_another_dlops_home_are_counted_and_said(
    tmp_path: Path, dlops_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shared storage lists the artifacts of every machine; a dashboard can show only its
    own machine's: it says how many it cannot (they answered HTTP 500 without a word)."""
    from dlops.dashboard import attach_artifacts, missing_artifacts, serve_dashboard
    from dlops.paths import artifacts_dir

    url = f"sqlite:///{dlops_home / 'dlops.db'}"
    dlops_home.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name="s", storage=url)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    files = []
    for name in ("curves.png", "final.json"):
        (tmp_path / name).write_bytes(name.encode())
        files.append(tmp_path / name)
    attach_artifacts(study, files[:1], trial_number=0, tag="plots")
    attach_artifacts(study, files[1:])
    assert missing_artifacts(url) == 0
    stored = sorted(artifacts_dir().iterdir())
    assert len(stored) == 2
    stored[0].unlink()  # as if uploaded on another machine
    assert missing_artifacts(url) == 1
    _serving_returns_at_once(monkeypatch)
    lines: list[str] = []
    serve_dashboard(url, "127.0.0.1", 0, ready=lines.append)
    assert len(lines) == 2 and lines[1].startswith(
        f"note: 1 of the artifacts the studies list are not in {stored[0].parent}"
    )


@pytest.mark.parametrize(
    ("host", "shown"), [("::1", "[::1]"), ("[::1]", "[::1]"), ("", "0.0.0.0"), ("127.0.0.1", "127.0.0.1")]
)
def test_the_dashboard_listens_on_ipv6_and_every_interface_at_an_address_a_browser_opens(
    dlops_home: Path, host: str, shown: str
) -> None:
    """`--host ::1` was "Address family for hostname not supported" (an IPv4-only server)
    and `--host ''` announced http://:8080/. The announced address answers."""
    import socket
    import threading
    import urllib.request

    from dlops.dashboard import dashboard_server, server_url

    if ":" in host:
        try:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback on this machine")
    url = f"sqlite:///{dlops_home / 'dlops.db'}"
    dlops_home.mkdir(parents=True, exist_ok=True)
    optuna.create_study(study_name="s", storage=url)
    server = dashboard_server(host, 0, dashboard_app(url))
    with server:
        address = server_url(server)
        port = server.server_address[1]
        assert address == f"http://{shown}:{port}/"
        thread = threading.Thread(target=server.handle_request)
        thread.start()
        reach = address.replace("0.0.0.0", "127.0.0.1")
        with urllib.request.urlopen(reach + "api/studies", timeout=30) as response:
            studies = json.loads(response.read())["study_summaries"]
        thread.join(timeout=30)
    assert [s["study_name"] for s in studies] == ["s"]


def test_a_host_the_dashboard_cannot_listen_on_is_one_line(dlops_home: Path) -> None:
    from typer.testing import CliRunner

    from dlops.cli import app

    url = f"sqlite:///{dlops_home / 'dlops.db'}"
    dlops_home.mkdir(parents=True, exist_ok=True)
    optuna.create_study(study_name="s", storage=url)
    for host, says in (
        ("no-such-host.invalid", "no-such-host.invalid:0: "),
        ("::ffff:1.2.3.4:5", "::ffff:1.2.3.4:5:0"),
    ):
        result = CliRunner().invoke(app, ["dashboard", "--host", host, "--port", "0"])
        assert result.exit_code == 2, result.output
        (line,) = result.output.strip().splitlines()
        assert line.startswith(f"error: cannot serve the dashboard on {says}"), line


def test_a_dashboard_started_with_sigint_ignored_stops_on_sigint(dlops_home: Path) -> None:
    """A shell script's background job (`dlops dashboard &`) starts with SIGINT ignored:
    `kill -INT` left it serving. Every dlops command takes SIGINT as Ctrl-C (the dashboard,
    report, data fetch as `dlops final`)."""
    import os
    import signal
    import subprocess
    import sys

    url = f"sqlite:///{dlops_home / 'dlops.db'}"
    dlops_home.mkdir(parents=True, exist_ok=True)
    optuna.create_study(study_name="s", storage=url)
    repo = str(Path(__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "dlops", "dashboard", "--storage", url, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("optuna-dashboard for"), line + proc.stderr.read()  # type: ignore[union-attr]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    # 0 once serving (it stops there on Ctrl-C), 130 if the signal came while it still started up
    assert proc.returncode in (0, 130) and "Traceback" not in err, err
