"""The dashboard reads like a report: study and trial notes and the study's plots, read back
through optuna-dashboard's own HTTP API, for a fresh digits study and a continued one."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import optuna
import pytest
from optuna.trial import TrialState, create_trial
from typer.testing import CliRunner

from dlops.cli import app
from dlops.dashboard import dashboard_app
from dlops.notes import KEEP_MARKER, stop_reason, trial_note
from dlops.paths import default_storage_url
from dlops.storage import open_storage

SPEC = """\
name = "notes-digits"
description = "ResNet18 width 8 on digits, for the notes test"
trainer = "resnet18"
metric = "val_top1"
direction = "maximize"

[train]
dataset = "digits"
width = 8
subset_per_class = 20
eval_batch_size = 64
epochs = 2
batch_size = 32
lr = 1e-3

[search.lr]
type = "float"
low = 1e-4
high = 1e-1
log = true

[baseline]
lr = 1e-3

[pruner]
type = "median"
n_startup_trials = 3
n_warmup_steps = 1

[sampler]
type = "tpe"
seed = 0
"""
TABLE_HEAD = "| epoch | train loss | train acc | val loss | val top-1 | val top-5 | lr | s |"


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def dashboard(dlops_home: Path) -> Iterator[Any]:
    """optuna-dashboard's WSGI app served on 127.0.0.1; yields a function that serves a storage URL."""
    servers: list[Any] = []

    def serve(url: str) -> str:
        server = make_server("127.0.0.1", 0, dashboard_app(url), handler_class=_Quiet)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def get(base: str, path: str) -> bytes:
    with urllib.request.urlopen(base + path, timeout=60) as response:
        assert response.status == 200
        return response.read()


def put_json(base: str, path: str, payload: dict[str, Any]) -> None:
    request = urllib.request.Request(
        base + path, data=json.dumps(payload).encode(), method="PUT", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status in (200, 204)


def study_detail(base: str, name: str) -> dict[str, Any]:
    studies = json.loads(get(base, "/api/studies"))["study_summaries"]
    study_id = next(s["study_id"] for s in studies if s["study_name"] == name)
    detail = json.loads(get(base, f"/api/studies/{study_id}"))
    detail["study_id"] = study_id
    return detail


def check_trial_notes(detail: dict[str, Any], study: optuna.Study) -> None:
    by_number = {t.number: t for t in study.get_trials()}
    for served in detail["trials"]:
        trial = by_number[served["number"]]
        body = served["note"]["body"]
        assert body.startswith(f"# Trial {trial.number}"), body
        history = trial.user_attrs["history"]
        lines = body.splitlines()
        start = lines.index(TABLE_HEAD)
        rows = lines[start + 2 : start + 2 + len(history["val_top1"])]
        assert [r.split(" | ")[0] for r in rows] == [f"| {e + 1}" for e in range(len(history["val_top1"]))]
        for row, top1, loss in zip(rows, history["val_top1"], history["train_loss"]):
            cells = [c.strip() for c in row.strip("|").split("|")]
            assert cells[1] == f"{loss:.4f}" and cells[4] == f"{top1:.4f}", row
        if trial.state == TrialState.COMPLETE:
            assert f"Completed all 2 epochs: `val_top1` {trial.value:.4f}" in body
        elif trial.state == TrialState.PRUNED:
            assert "Pruned after epoch 2 of 2 (`val_top1`" in body
        if trial.user_attrs.get("baseline"):
            assert body.startswith(f"# Trial {trial.number} (baseline)") and "The baseline: lr 0.001." in body
        else:
            assert f"Differs from the baseline in: lr {trial.params['lr']:.4g} (baseline 0.001)" in body


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_notes_and_study_plots_in_the_dashboard_for_a_new_and_a_continued_study(
    kind: str, tmp_path: Path, dlops_home: Path, dashboard: Any
) -> None:
    spec = tmp_path / "notes-digits.toml"
    spec.write_text(SPEC)
    url = default_storage_url() if kind == "sqlite" else f"journal://{tmp_path / 'dlops.log'}"
    run = ["study", "run", str(spec), "--study-name", "notes-study", "--device", "cpu", "--storage", url]
    runner = CliRunner()
    first = runner.invoke(app, [*run, "--n-trials", "3"])
    assert first.exit_code == 0, first.output
    base = dashboard(url)
    study = optuna.load_study(study_name="notes-study", storage=open_storage(url))

    detail = study_detail(base, "notes-study")
    note = detail["note"]["body"]
    best = study.best_trial
    baseline = study.trials[0]
    for text in (
        "# notes-study",
        "**ResNet18 width 8 on digits, for the notes test**: spec `notes-digits`",
        "maximise `val_top1`",
        "**Data**: `digits` (subset: all classes, 20 training images per class), "
        "10 classes, images 1x8x8; train 200, validation 143",
        "| lr | float | 0.0001 – 0.1 (log) | 0.001 |",
        "**Pruner**: `median` (n_startup_trials=3, n_warmup_steps=1)",
        f"Baseline (trial 0, lr 0.001): `val_top1` **{baseline.value:.4f}**",
        f"Best: trial {best.number} (lr {best.params['lr']:.4g}): `val_top1` **{best.value:.4f}**",
        "width 8",
        "epochs 2",
        KEEP_MARKER,
    ):
        assert text in note, f"{text!r} not in the study note:\n{note}"
    counts = {s: sum(t.state == s for t in study.trials) for s in TrialState}
    assert f"Trials: {counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} pruned, 0 fail" in note
    assert counts[TrialState.COMPLETE] + counts[TrialState.PRUNED] == 3
    if best.number != 0:
        assert f"tuning bought {best.value - baseline.value:+.4f} over the baseline" in note
    command = re.search(r"```\n(dlops study run .*)\n```", note)
    assert command and "--study-name notes-study" in command[1] and "--n-trials" in command[1], note
    assert str(spec) in command[1] and url in command[1]
    check_trial_notes(detail, study)

    artifacts = {a["filename"]: a["artifact_id"] for a in detail["artifacts"]}
    assert set(artifacts) == {"optimization_history.png", "intermediate_values.png", "slice.png"}
    pngs = {name: get(base, f"/artifacts/{detail['study_id']}/{aid}") for name, aid in artifacts.items()}
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in pngs.values())

    # Someone writes in the study note in the dashboard, below the marker: kept by later refreshes.
    put_json(
        base,
        f"/api/studies/{detail['study_id']}/note",
        {"version": detail["note"]["version"] + 1, "body": note + "\nmy own remark: try a wider net\n"},
    )

    # Continued by a second run: the notes follow, the artifacts are the same ones, redrawn.
    second = runner.invoke(app, [*run, "--n-trials", "2"])
    assert second.exit_code == 0, second.output
    study = optuna.load_study(study_name="notes-study", storage=study._storage)
    detail = study_detail(base, "notes-study")
    deadline = time.monotonic() + 15
    while len(detail["trials"]) < 5 and time.monotonic() < deadline:  # the dashboard caches trials for 2 s
        time.sleep(0.5)
        detail = study_detail(base, "notes-study")
    note = detail["note"]["body"]
    counts = {s: sum(t.state == s for t in study.trials) for s in TrialState}
    assert counts[TrialState.COMPLETE] + counts[TrialState.PRUNED] == 5
    assert f"Trials: {counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} pruned, 0 fail" in note
    assert f"Best: trial {study.best_trial.number} " in note
    assert note.count(KEEP_MARKER) == 1
    assert note.split(KEEP_MARKER)[1].strip() == "my own remark: try a wider net", note[-300:]
    assert note.count("# notes-study") == 1
    assert len(detail["trials"]) == 5
    check_trial_notes(detail, study)
    again = {a["filename"]: a["artifact_id"] for a in detail["artifacts"]}
    assert again == artifacts  # refreshed in place: no second copy of any plot
    redrawn = get(base, f"/artifacts/{detail['study_id']}/{artifacts['optimization_history.png']}")
    assert redrawn.startswith(b"\x89PNG") and redrawn != pngs["optimization_history.png"]
    assert len(list((dlops_home / "artifacts").iterdir())) == 3


def _trial(state: TrialState, reason: str | None = None, epochs_done: int = 2, **attrs: Any) -> Any:
    history = {"train_loss": [2.0, 1.5, 1.0][:epochs_done], "val_top1": [0.2, 0.3, 0.4][:epochs_done]}
    user_attrs = {"history": history, "config": {"lr": 0.01, "epochs": 3, "seed": 4, "width": 8}, **attrs}
    if reason:
        user_attrs["stopped_reason"] = reason
    return create_trial(
        state=state,
        value=0.3 if state == TrialState.COMPLETE else None,
        params={"lr": 0.01},
        distributions={"lr": optuna.distributions.FloatDistribution(1e-4, 0.1, log=True)},
        user_attrs=user_attrs,
        intermediate_values={i: v for i, v in enumerate(history["val_top1"])},
    )


def test_a_trial_note_says_why_the_trial_stopped_and_how_it_differs_from_the_baseline() -> None:
    pruned = _trial(TrialState.PRUNED, "pruned after epoch 1 (val_top1=0.3000)")
    assert stop_reason(pruned, "val_top1") == (
        "Pruned after epoch 2 of 3 (`val_top1` 0.3000): below the pruner's bar at that epoch."
    )
    diverged = _trial(TrialState.PRUNED, "non-finite training loss nan at epoch 1, step 3")
    assert stop_reason(diverged, "val_top1").startswith("Diverged: non-finite training loss nan at epoch 1, step 3")
    interrupted = _trial(TrialState.FAIL, "interrupted after epoch 2; queued again to resume from its checkpoint")
    assert stop_reason(interrupted, "val_top1").startswith("Interrupted (Ctrl-C or SIGTERM) after epoch 2 of 3")
    failed = _trial(TrialState.FAIL, "failed: ZeroDivisionError: division by zero")
    assert stop_reason(failed, "val_top1") == "Failed: ZeroDivisionError: division by zero after epoch 2 of 3."
    resumed = _trial(TrialState.COMPLETE, epochs_done=3, resumed_from={"trial": 1, "epoch": 2})
    note = trial_note(resumed, "val_top1", {"lr": 0.001, "epochs": 3, "seed": 0, "width": 8})
    assert "Completed all 3 epochs: `val_top1` 0.3000." in note
    assert "Resumed from trial 1's checkpoint after 2 epoch(s)" in note
    assert "| epoch | train loss | val top-1 |" in note and "| 3 | 1.0000 | 0.4000 |" in note
    assert "Differs from the baseline in: lr 0.01 (baseline 0.001)." in note  # not the seed: that differs by design


@pytest.mark.parametrize("trial", [False, True], ids=["study note", "trial note"])
def test_notes_are_optuna_dashboards_own_format_both_ways(trial: bool) -> None:
    """dlops writes notes without importing optuna-dashboard: what it writes, optuna-dashboard
    reads, and the reverse, through long bodies (several chunks) that then shrink."""
    import optuna_dashboard

    from dlops.dashboard import read_note, save_note

    study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    live = study.ask()
    study.tell(live, 1.0)
    target_id = live._trial_id if trial else None

    def theirs_read() -> str:
        if not trial:
            return optuna_dashboard.get_note(study)
        attrs = study._storage.get_study_system_attrs(study._study_id)
        from optuna_dashboard._note import get_note_from_system_attrs

        return get_note_from_system_attrs(attrs, target_id)["body"]

    def theirs_write(body: str) -> None:
        from optuna_dashboard._note import note_ver_key, save_note_with_version

        attrs = study._storage.get_study_system_attrs(study._study_id)
        version = int(attrs.get(note_ver_key(target_id), 0)) + 1
        save_note_with_version(study._storage, study._study_id, target_id, version, body)

    assert read_note(study, target_id) == ""
    bodies = ["short **note**", "x" * 2045, "ab" * 2500 + "end", "é" * 4091, "shrunk", ""]
    for body in bodies:
        save_note(study, target_id, body)
        assert theirs_read() == body
        chunks = [v for k, v in study._storage.get_study_system_attrs(study._study_id).items() if "note_str" in k]
        assert all(len(chunk) <= 2045 for chunk in chunks)  # what optuna-dashboard's storage limit allows
        assert read_note(study, target_id) == body
    for body in reversed(bodies):
        theirs_write(body)
        assert read_note(study, target_id) == body
    if trial:  # the study note is untouched by a trial's
        assert read_note(study) == ""
