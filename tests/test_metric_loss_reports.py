"""What a user reads about the triplet and center-loss runs: the dashboard notes, the
reference runs' reports and the loss comparison in ``reports/index.md``. Real (tiny)
training on digits: a triplet and a center-loss study, their reference runs, and a
cross-entropy reference run on another subset."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from typer.testing import CliRunner

from dlops import plots
from dlops.cli import app
from dlops.dashboard import read_note, trial_id
from dlops.spec import Add, spec_table
from dlops.trainers import resnet_report
from tests.specs import write_spec

FAST = {"width": Add(8), "batch_size": 32, "eval_batch_size": Add(256)}


def _spec(tmp: Path, builtin: str, name: str) -> Path:
    return write_spec(tmp / f"{name}.toml", spec_table(builtin, {"name": name, "train": FAST}))


def _dlops(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("metric-losses")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DLOPS_HOME", str(tmp / "home"))
        mp.delenv("DLOPS_STORAGE", raising=False)
        trip, center, ce = (_spec(tmp, f"resnet18-{loss}", f"m-{loss}") for loss in ("triplet", "center", "ce"))
        data = ("--dataset", "digits", "--device", "cpu", "--subset-per-class", "20")
        _dlops("study", "run", str(trip), *data, "--n-trials", "2", "--epochs", "2")
        _dlops("study", "run", str(center), *data, "--n-trials", "1", "--epochs", "2")
        _dlops("final", str(trip), *data, "--params", "best", "--epochs", "2", "--seeds", "2")
        _dlops("final", str(center), *data, "--params", "best", "--epochs", "2", "--seeds", "1")
        # the cross-entropy reference run on 5 classes: not the data of the other two
        _dlops("final", str(ce), *data, "--subset-classes", "5", "--params", "baseline", "--epochs", "1")
        _dlops("report")
        storage = f"sqlite:///{tmp / 'home' / 'dlops.db'}"
        yield {
            "home": tmp / "home",
            "reports": tmp / "home" / "reports",
            "triplet": optuna.load_study(study_name="m-triplet-digits", storage=storage),
            "center": optuna.load_study(study_name="m-center-digits", storage=storage),
        }


def _fixed_settings(note: str) -> set[str]:
    line = next(x for x in note.splitlines() if x.startswith("**Fixed settings**: "))
    return {item.split(" ")[0] for item in line.removeprefix("**Fixed settings**: ").split(", ")}


def test_a_study_note_lists_only_the_fixed_settings_its_loss_reads(runs: dict[str, Any]) -> None:
    triplet = _fixed_settings(read_note(runs["triplet"]))
    assert {"samples_per_class", "embedding_dim", "centroid_images_per_class", "normalize_embedding"} <= triplet
    assert not {"center_lambda", "center_alpha"} & triplet, triplet
    center = _fixed_settings(read_note(runs["center"]))
    assert {"momentum", "weight_decay", "width"} <= center
    unread = {"margin", "triplet_soft", "samples_per_class", "normalize_embedding", "centroid_images_per_class"}
    assert not unread & center, center


def test_a_triplet_trial_note_shows_its_diagnostics_and_no_empty_val_loss(runs: dict[str, Any]) -> None:
    study = runs["triplet"]
    for trial in study.trials:
        note = read_note(study, trial_id(trial))
        history = trial.user_attrs["history"]
        head = "| epoch | train loss | train acc | val top-1 | val top-5 | violated | d(a,p) | d(a,n) | emb norm | lr |"
        assert head in note, note
        for i in range(len(history["train_loss"])):
            cells = " | ".join(
                format(history[k][i], f)
                for k, f in (
                    ("triplet_violated", ".3f"),
                    ("triplet_pos_dist", ".3f"),
                    ("triplet_neg_dist", ".3f"),
                    ("embedding_norm", ".2f"),
                )
            )
            assert f"| {format(history['val_top5'][i], '.4f')} | {cells} |" in note, note
        assert "the share of anchors whose batch-hard triplet is violated" in note
    center = runs["center"]
    note = read_note(center, trial_id(center.trials[0]))
    assert "| val loss |" in note and "violated" not in note  # its val loss is measured: CE + center term


def test_a_triplet_report_shows_its_diagnostics_and_how_it_was_scored(runs: dict[str, Any]) -> None:
    folder = runs["reports"] / "m-triplet"
    final = json.loads((folder / "final.json").read_text())
    report = (folder / "report.md").read_text()
    assert (folder / "triplet.png").read_bytes().startswith(b"\x89PNG")
    assert "](triplet.png)" in report
    assert "| seed | violated | hardest positive d(a,p) | hardest negative d(a,n) | embedding norm |" in report
    for seed in final["per_seed"]:
        h = seed["history"]
        row = (
            f"| {seed['seed']} | {h['triplet_violated'][-1]:.3f} | {h['triplet_pos_dist'][-1]:.3f} | "
            f"{h['triplet_neg_dist'][-1]:.3f} | {h['embedding_norm'][-1]:.2f} |"
        )
        assert row in report, report
    assert "rank the classes by the distance of a test image's L2-normalised embedding to each class centroid" in report
    assert "It has no test loss (–)" in report
    center = (runs["reports"] / "m-center" / "report.md").read_text()
    assert not (runs["reports"] / "m-center" / "triplet.png").exists() and "triplet.png" not in center
    assert "test_loss is the training objective: cross-entropy plus center_lambda / 2" in center
    assert "test_loss is the softmax cross-entropy." in (runs["reports"] / "m-ce" / "report.md").read_text()


def test_the_reports_name_the_subset_and_the_chance_level_and_flag_runs_on_other_data(runs: dict[str, Any]) -> None:
    triplet = (runs["reports"] / "m-triplet" / "report.md").read_text()
    assert (
        "| dataset | digits, subset: the first 20 training images of each class (10 classes; train 200, "
        "validation 143, test 359); chance: top-1 0.10, top-5 0.50 |"
    ) in triplet
    ce = (runs["reports"] / "m-ce" / "report.md").read_text()
    assert "digits, subset: the first 5 classes, 20 training images each (5 classes;" in ce
    assert "chance: top-1 0.20, top-5 1.00" in ce
    index = (runs["reports"] / "index.md").read_text()
    row = next(x for x in index.splitlines() if x.startswith("| dataset |"))
    assert row.count("chance: top-1 0.10, top-5 0.50") == 2 and "the first 5 classes" in row, row
    assert "**The reference runs were not measured on the same data**" in index


def test_a_report_draws_the_triplet_figure_that_a_run_lacks(runs: dict[str, Any]) -> None:
    figure = runs["reports"] / "m-triplet" / "triplet.png"
    figure.unlink()  # as for a reference run made by a dlops that did not draw it
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DLOPS_HOME", str(runs["home"]))
        _dlops("report")
    assert figure.read_bytes().startswith(b"\x89PNG")


def test_the_training_loss_panel_names_what_the_loss_adds_up(
    runs: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    drawn: list[str] = []
    real = plots.plot_training_curves

    def spy(histories: Any, panels: Any, title: Any = None) -> Any:
        drawn.append(dict(panels)["train_loss"])
        return real(histories, panels, title)

    monkeypatch.setattr(plots, "plot_training_curves", spy)
    finals = [
        json.loads((runs["reports"] / spec / "final.json").read_text()) for spec in ("m-ce", "m-triplet", "m-center")
    ]
    weighted = json.loads(json.dumps(finals[1]))
    weighted["config"]["triplet_mining"] = "weighted"
    for final in [*finals, weighted]:
        plots.write_curves(final, tmp_path)
    assert drawn == [
        "training loss (cross-entropy)",
        "training loss (batch-hard triplet)",
        "training loss (cross-entropy + center term)",
        "training loss (weighted batch-hard triplet)",
    ]
    assert resnet_report.test_notes(weighted)[0].startswith("Batch-hard triplet loss with softmax-weighted mining (")
    assert resnet_report.test_notes(finals[1])[0].startswith("Batch-hard triplet loss (hinge, margin")
