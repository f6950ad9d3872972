"""Plots and the written report (`dlops report`), on synthetic studies and final.json
files: no training here (tests/test_final.py covers the real runs)."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import optuna
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from typer.testing import CliRunner

from dlops import plots
from dlops.report import build_report, loss_curve_series, write_spec_report
from dlops.study_plots import study_figures


def history(val: list[float]) -> dict[str, list[float | None]]:
    n = len(val)
    return {
        "train_loss": [1.0 / (e + 1) for e in range(n)],
        "train_acc": [0.5] * n,
        "val_loss": [None] * n,
        "val_top1": [v / 2 for v in val],
        "val_top5": val,
        "lr": [0.1] * n,
        "epoch_seconds": [1.0] * n,
    }


def make_final(spec: str, loss: str | None, tops: list[float], trainer: str = "resnet18", **extra) -> dict:
    per_seed = [
        {
            "seed": i,
            "test_top1": t / 2,
            "test_top5": t,
            "test_loss": None,
            "history": history([0.2, 0.4, t]),
            "epochs_trained": 3,
            "resumed_from_epoch": 0,
            "train_seconds": 10.0,
        }
        for i, t in enumerate(tops)
    ]
    mean = float(np.mean(tops))
    std = float(np.std(tops, ddof=1)) if len(tops) > 1 else 0.0
    return {
        "spec": spec,
        "trainer": trainer,
        "description": f"{spec} test",
        "metric": "val_top5",
        "params": {"lr": 0.01},
        "params_source": {"kind": "baseline"},
        "dataset": {
            "name": "digits",
            "num_classes": 10,
            "class_names": [str(i) for i in range(10)],
            "image_shape": [1, 8, 8],
            "splits": {"train": 1293, "val": 143, "test": 361},
        },
        "epochs": 3,
        "seeds": list(range(len(tops))),
        "config": {"loss": loss} if loss else {},
        "mean": {"test_top1": mean / 2, "test_top5": mean},
        "std": {"test_top1": std / 2, "test_top5": std},
        "per_seed": per_seed,
        "wall_seconds": 125.0,
        "device": "cpu",
        "device_name": "x86_64",
        "versions": {},
        "git_commit": None,
        "created": "2026-01-01T00:00:00+00:00",
        "study": None,
        **extra,
    }


def write_final(home: Path, final: dict) -> None:
    out = home / "reports" / final["spec"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "final.json").write_text(json.dumps(final))


def make_study(
    home: Path, name: str, params: tuple[str, ...] = ("lr",), n: int = 4, loss: str = "ce", spec: str | None = None
) -> optuna.Study:
    """A finished study without training: each trial reports 3 epochs of val_top5. It
    records its spec as `dlops study run` does (``resnet18-<loss>`` unless given)."""
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{home / 'dlops.db'}", direction="maximize")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["val_top5"])
    study.set_user_attr("spec", spec or f"resnet18-{loss}")
    study.set_user_attr("trainer", "resnet18")
    study.set_user_attr("dataset", "digits")

    def objective(trial: optuna.Trial) -> float:
        values = [trial.suggest_float(p, 1e-3, 1e-1, log=True) for p in params]
        curve = [min(1.0, 0.3 + 0.1 * e + values[0]) for e in range(3)]
        for epoch, v in enumerate(curve):
            trial.report(v, epoch)
        trial.set_user_attr("history", history(curve))
        trial.set_user_attr("config", {"loss": loss})
        return curve[-1]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=n)
    return study


def test_training_curves_show_the_mean_and_a_min_max_band():
    a, b = history([0.2, 0.4, 0.6]), history([0.4, 0.6, 1.0])
    fig = plots.plot_training_curves([a, b])
    assert isinstance(fig, Figure)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["training loss", "training accuracy (top-1)", "validation top-5"]
    line = axes[2].get_lines()[0]
    assert list(line.get_xdata()) == [1, 2, 3]
    assert np.allclose(line.get_ydata(), [0.3, 0.5, 0.8])
    band = [c for c in axes[2].collections if isinstance(c, PolyCollection)]
    assert len(band) == 1
    ys = band[0].get_paths()[0].vertices[:, 1]
    assert np.isclose(ys.min(), 0.2) and np.isclose(ys.max(), 1.0)
    single = plots.plot_training_curves([a])
    assert not [c for c in single.axes[2].collections if isinstance(c, PolyCollection)]  # no band for one seed


def test_validation_curves_put_every_run_on_one_chart():
    fig = plots.plot_validation_curves({"ce": [[0.1, 0.5]], "triplet": [[0.2, 0.3], [0.4, 0.5]]}, dashed=["ce"])
    (ax,) = fig.axes
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert set(lines) == {"ce", "triplet"}
    assert lines["ce"].get_linestyle() == "--" and lines["triplet"].get_linestyle() == "-"
    assert np.allclose(lines["triplet"].get_ydata(), [0.3, 0.4])


def test_report_puts_the_three_losses_side_by_side_then_the_autoencoder(dlops_home):
    dlops_home.mkdir(parents=True)
    write_final(dlops_home, make_final("resnet18-triplet", "triplet", [0.80, 0.82]))
    write_final(dlops_home, make_final("resnet18-ce", "ce", [0.90, 0.92]))
    ae = make_final(
        "autoencoder", None, [0.6], trainer="autoencoder", class_accuracy={str(i): i / 10 for i in range(10)}
    )
    ae["mean"]["test_accuracy"], ae["std"]["test_accuracy"] = 0.55, 0.0
    ae["metric"] = "val_top1"
    write_final(dlops_home, ae)
    make_study(dlops_home, "resnet18-ce", n=3)
    # a study with two parameters and no reference run yet
    make_study(dlops_home, "resnet18-center", ("lr", "center_lambda"), n=3, loss="center")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = build_report()
    assert not [w for w in caught if issubclass(w.category, optuna.exceptions.ExperimentalWarning)]
    index = (dlops_home / "reports" / "index.md").read_text()
    assert result.index == dlops_home / "reports" / "index.md"
    header = next(ln for ln in index.splitlines() if ln.startswith("| | "))
    assert (
        header.index("resnet18-ce/report.md")
        < header.index("resnet18-triplet/report.md")
        < header.index("resnet18-center/report.md")
    )
    assert "0.9100 ± 0.0141 (2 seeds)" in index  # ce test top-5
    assert "0.8100 ± 0.0141 (2 seeds)" in index  # triplet test top-5
    assert "| trials complete / pruned | 3 / 0 | – | 3 / 0 |" in index
    assert "![validation top-5 per epoch, one curve per loss](val_top5_by_loss.png)" in index
    assert (dlops_home / "reports" / "val_top5_by_loss.png").is_file()
    ae_part = index[index.index("## Autoencoder") :]
    assert "0.5500 (1 seed)" in ae_part and "(autoencoder/class_accuracy.png)" in ae_part
    assert "Spec `autoencoder` (no study) — [full report](autoencoder/report.md)" in ae_part
    for spec in ("resnet18-ce", "resnet18-triplet", "resnet18-center", "autoencoder"):
        assert (dlops_home / "reports" / spec / "report.md").is_file()
    # Optuna's plots; parameter importances and parallel coordinates only with two parameters or more
    ce_plots = {p.stem for p in (dlops_home / "reports" / "resnet18-ce" / "study").glob("*.png")}
    center_plots = {p.stem for p in (dlops_home / "reports" / "resnet18-center" / "study").glob("*.png")}
    assert ce_plots == {"optimization_history", "intermediate_values", "slice"}
    assert center_plots == ce_plots | {"param_importances", "parallel_coordinate"}
    assert (
        "![Parameter importances](study/param_importances.png)"
        in (dlops_home / "reports" / "resnet18-center" / "report.md").read_text()
    )
    assert (dlops_home / "reports" / "autoencoder" / "class_accuracy.png").is_file()
    assert "No reference run yet" in (dlops_home / "reports" / "resnet18-center" / "report.md").read_text()

    entries = {e.name: e for e in result.entries}
    series, dashed = loss_curve_series([entries[n] for n in ("resnet18-ce", "resnet18-triplet", "resnet18-center")])
    assert list(series) == ["ce – final, 2 seeds", "triplet – final, 2 seeds", "center – best study trial"]
    assert dashed == ["center – best study trial"]
    assert series["ce – final, 2 seeds"] == [[0.2, 0.4, 0.90], [0.2, 0.4, 0.92]]


def test_spec_report_tables_every_seed(dlops_home):
    write_final(dlops_home, make_final("resnet18-ce", "ce", [0.5, 0.7]))
    text = write_spec_report("resnet18-ce", None).read_text()
    assert "| seed | test_top1 | test_top5 | last val_top5 | epochs trained (resumed at) | train time |" in text
    assert "| 0 | 0.2500 | 0.5000 | 0.5000 | 3 (0) | 10 s |" in text
    assert "| 1 | 0.3500 | 0.7000 | 0.7000 | 3 (0) | 10 s |" in text
    assert "| **mean ± std** | 0.3000 ± 0.0707 | 0.6000 ± 0.1414 | | | |" in text
    assert "train 1293, validation 143, test 361" in text and "the spec's baseline" in text


def test_a_one_seed_report_shows_no_spread(dlops_home):
    write_final(dlops_home, make_final("resnet18-ce", "ce", [0.5]))
    text = write_spec_report("resnet18-ce", None).read_text()
    assert "| 0 | 0.2500 | 0.5000 | 0.5000 | 3 (0) | 10 s |" in text
    assert "**mean ± std**" not in text and "± 0.0000" not in text and "One seed: no spread" in text


def test_cli_report_on_an_empty_storage(dlops_home):
    from dlops.cli import app

    result = CliRunner().invoke(app, ["report"])
    assert result.exit_code == 0, result.output
    index = (dlops_home / "reports" / "index.md").read_text()
    assert "No ResNet18 study or reference run yet" in index


def test_cli_report_bad_storage_is_one_line(dlops_home):
    from dlops.cli import app

    result = CliRunner().invoke(app, ["report", "--storage", "nosuch://x"])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_a_storage_that_refuses_writes_still_gets_its_report_and_keeps_its_data(dlops_home):
    """`dlops report` on a storage it can read but not write (here another writer holds
    SQLite's write lock; a read-only file or mount is refused the same way): the report is
    written in full, one note says the plots are not on the dashboard, the database is
    unchanged and no orphan file is left in the artifact store. It used to end in a traceback
    of Optuna's StorageInternalError."""
    import sqlite3

    from dlops.cli import app

    dlops_home.mkdir(parents=True)
    make_study(dlops_home, "resnet18-ce", n=2)
    make_study(dlops_home, "resnet18-center", n=2, loss="center")
    db = dlops_home / "dlops.db"
    before = db.read_bytes()
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # a writer's lock: others still read, nobody else writes
    try:
        result = CliRunner().invoke(app, ["report"])
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    notes = [line for line in result.output.splitlines() if line.startswith("note:")]
    assert len(notes) == 1, result.output
    assert "could not attach the plots of study resnet18-ce to the dashboard" in notes[0]
    assert "database is locked" in notes[0] and "INSERT" not in notes[0]
    index = (dlops_home / "reports" / "index.md").read_text()
    assert "[cross-entropy](resnet18-ce/report.md)" in index and "[center loss](resnet18-center/report.md)" in index
    for name in ("resnet18-ce", "resnet18-center"):
        assert (dlops_home / "reports" / name / "study" / "optimization_history.png").is_file()
    assert db.read_bytes() == before
    assert not list((dlops_home / "artifacts").iterdir())

    again = CliRunner().invoke(app, ["report"])  # writable again: the plots go to the dashboard
    assert again.exit_code == 0 and "note:" not in again.output, again.output
    study = optuna.load_study(study_name="resnet18-ce", storage=f"sqlite:///{db}")
    ids = study._storage.get_study_system_attrs(study._study_id)["dlops:study_plots"]
    assert ids and all((dlops_home / "artifacts" / i).is_file() for i in ids.values())


def test_study_figures_label_the_metric_and_read_integer_epochs(dlops_home):
    from matplotlib.ticker import MaxNLocator

    dlops_home.mkdir(parents=True)
    study = make_study(dlops_home, "s", n=2)
    figures = study_figures(study)
    assert figures["optimization_history"].axes[0].get_ylabel() == "val_top5"
    assert isinstance(figures["intermediate_values"].axes[0].xaxis.get_major_locator(), MaxNLocator)
    import matplotlib.pyplot as plt

    for fig in figures.values():
        plt.close(fig)


def test_the_loss_chart_has_one_panel_per_dataset_named_in_title_and_legend(dlops_home, monkeypatch):
    dlops_home.mkdir(parents=True)
    write_final(dlops_home, make_final("resnet18-ce", "ce", [0.90, 0.92]))  # on digits
    tiny = make_final("resnet18-triplet", "triplet", [0.30])
    tiny["dataset"] = {**tiny["dataset"], "name": "tiny-imagenet", "num_classes": 200}
    write_final(dlops_home, tiny)
    make_study(dlops_home, "resnet18-center", n=2, loss="center")  # a study on digits, no reference run
    drawn = {}
    real = plots.plot_validation_curves_by_dataset

    def keep(*args, **kwargs):
        drawn["fig"] = real(*args, **kwargs)
        return drawn["fig"]

    monkeypatch.setattr(plots, "plot_validation_curves_by_dataset", keep)
    build_report()
    axes = {ax.get_title(): ax for ax in drawn["fig"].axes}
    assert set(axes) == {"on digits", "on tiny-imagenet"}
    digits = {ln.get_label() for ln in axes["on digits"].get_lines()}
    assert digits == {"ce – final, 2 seeds", "center – best study trial"}
    assert {ln.get_label() for ln in axes["on tiny-imagenet"].get_lines()} == {"triplet – final, 1 seed"}
    assert axes["on tiny-imagenet"].get_legend().get_title().get_text() == "tiny-imagenet"
    index = (dlops_home / "reports" / "index.md").read_text()
    assert "One chart per dataset (digits, tiny-imagenet)" in index


def test_report_folders_of_odd_study_names_stay_inside_reports(dlops_home):
    dlops_home.mkdir(parents=True)
    for name in ("../../etc", "a/b", "index.md", ".staging", "data"):
        make_study(dlops_home, name, n=2)

    result = build_report()
    assert build_report().index == result.index  # a second report works as well
    reports = dlops_home / "reports"
    assert (reports / "index.md").is_file()
    assert not (dlops_home.parent / "etc").exists() and not (reports / "a").exists()
    assert not (reports / ".staging").exists() and not (reports / "data").exists()
    folders = {e.name: e.folder for e in result.entries}
    assert set(folders) == {"../../etc", "a/b", "index.md", ".staging", "data"}
    for name, folder in folders.items():
        assert "/" not in folder and folder not in ("index.md", "data") and not folder.startswith(".")
        assert f"## Study `{name}`" in (reports / folder / "report.md").read_text()
        assert f"({folder}/report.md)" in (reports / "index.md").read_text()


def test_a_report_folder_left_at_index_md_by_an_older_dlops_moves_aside(dlops_home):
    from dlops.paths import folder_name

    reports = dlops_home / "reports"
    (reports / "index.md" / "study").mkdir(parents=True)
    (reports / "index.md" / "report.md").write_text("old")
    build_report()
    assert (reports / "index.md").is_file()
    assert (reports / folder_name("index.md") / "report.md").read_text() == "old"


def test_report_leaves_out_a_multi_objective_study_and_says_so(dlops_home):
    from dlops.cli import app

    dlops_home.mkdir(parents=True)
    make_study(dlops_home, "resnet18-ce", n=2)
    mo = optuna.create_study(
        study_name="mo", directions=["minimize", "maximize"], storage=f"sqlite:///{dlops_home / 'dlops.db'}"
    )
    mo.optimize(lambda t: (t.suggest_float("x", 0, 1), 1.0), n_trials=2)
    result = CliRunner().invoke(app, ["report"])
    assert result.exit_code == 0, result.output
    assert "left out study mo: 2 objectives (minimize, maximize), not a dlops study" in result.output
    index = (dlops_home / "reports" / "index.md").read_text()
    assert "- study `mo`: 2 objectives" in index and "resnet18-ce/report.md" in index
    assert not (dlops_home / "reports" / "mo").exists()


def test_a_damaged_final_json_is_one_line_and_nothing_is_rewritten(dlops_home):
    from dlops.cli import app

    write_final(dlops_home, make_final("resnet18-ce", "ce", [0.90, 0.92]))
    assert CliRunner().invoke(app, ["report"]).exit_code == 0
    folder = dlops_home / "reports" / "resnet18-ce"
    before = {p: p.read_bytes() for p in (*folder.rglob("*"), dlops_home / "reports" / "index.md") if p.is_file()}
    final_json = folder / "final.json"
    whole = final_json.read_text()
    broken_seed = make_final("resnet18-ce", "ce", [0.90, 0.92])
    del broken_seed["per_seed"][1]["history"]
    no_dataset = make_final("resnet18-ce", "ce", [0.90])
    del no_dataset["dataset"]["splits"]
    for damaged, says in (
        (whole[: len(whole) // 2], "not JSON ("),
        (json.dumps(broken_seed), "per_seed[1] has no history"),
        (json.dumps(no_dataset), "dataset has no splits"),
        (json.dumps([1, 2]), "the file is not an object"),
    ):
        final_json.write_text(damaged)
        before[final_json] = damaged.encode()
        result = CliRunner().invoke(app, ["report"])
        assert result.exit_code == 2, result.output
        (line,) = result.output.strip().splitlines()
        assert line.startswith(f"error: {final_json} is damaged: {says}"), line
        after = {p: p.read_bytes() for p in (*folder.rglob("*"), dlops_home / "reports" / "index.md") if p.is_file()}
        assert after == before


def test_every_study_appears_once_even_one_named_after_a_spec_whose_final_used_another(dlops_home):
    from dlops.paths import folder_name

    write_final(dlops_home, make_final("resnet18-ce", "ce", [0.90]))  # on digits: its study is resnet18-ce-digits
    make_study(dlops_home, "resnet18-ce-digits", n=2)
    make_study(dlops_home, "resnet18-ce", n=3)
    result = build_report()
    studies = sorted(e.study.study_name for e in result.entries if e.study is not None)
    assert studies == ["resnet18-ce", "resnet18-ce-digits"]
    reports = dlops_home / "reports"
    assert "## Study `resnet18-ce-digits`" in (reports / "resnet18-ce" / "report.md").read_text()
    own = reports / folder_name("resnet18-ce") / "report.md"
    assert "## Study `resnet18-ce`" in own.read_text() and "resnet18-ce-digits" not in own.read_text()
    index = (reports / "index.md").read_text()
    assert f"({folder_name('resnet18-ce')}/report.md)" in index and "(resnet18-ce/report.md)" in index
    assert "`resnet18-ce`, study `resnet18-ce-digits`" in index
    assert "| trials complete / pruned | 2 / 0 | 3 / 0 |" in index


def test_study_figures_of_a_study_without_curves_or_complete_trials_log_nothing(caplog):
    """Drawing a study with no complete trial, or trials without per-epoch values, once
    printed Optuna's own warnings ("There are no complete trials", "You need to set up the
    pruning feature") in the middle of `dlops report`; the verbosity is left as it was."""
    import logging

    from matplotlib import pyplot as plt

    plots.use_headless_backend()
    empty = optuna.create_study(direction="maximize")
    flat = optuna.create_study(direction="maximize")
    flat.optimize(lambda t: t.suggest_float("lr", 1e-4, 1e-1, log=True), n_trials=3)
    before = optuna.logging.get_verbosity()
    with caplog.at_level(logging.DEBUG, logger="optuna"):
        for study in (empty, flat):
            for fig in study_figures(study).values():
                plt.close(fig)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING], caplog.records
    assert optuna.logging.get_verbosity() == before


def test_an_entry_without_a_reference_run_is_headed_by_its_study(dlops_home):
    """The index names what it shows: a spec's reference run, or else a study (its name
    is the study's, e.g. `autoencoder-digits`, not a spec's)."""
    dlops_home.mkdir(parents=True)
    study = make_study(dlops_home, "autoencoder-digits", n=2, spec="autoencoder")
    study.set_user_attr("trainer", "autoencoder")
    index = build_report().index.read_text()
    part = index[index.index("## Autoencoder") :]
    assert "Study `autoencoder-digits` — [full report](autoencoder-digits/report.md)" in part
    assert "Spec `autoencoder-digits`" not in index


def _plain_optuna_study(home: Path, name: str, *, complete: bool) -> optuna.Study:
    """A study made with plain Optuna, not by `dlops study run`: no spec, no metric name."""
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{home / 'dlops.db'}", direction="maximize")
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True)})
    if complete:
        trial.report(0.5, 0)
        study.tell(trial, 0.5)
    else:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return study


def test_a_study_without_a_complete_trial_shows_no_best_rather_than_trial_none(dlops_home):
    dlops_home.mkdir(parents=True)
    _plain_optuna_study(dlops_home, "sweep", complete=False)
    index = build_report().index.read_text()
    part = index[index.index("## sweep") :]
    assert "| best value in the study | – (no complete trial yet) |" in part, part
    assert "None" not in index
    report = (dlops_home / "reports" / "sweep" / "report.md").read_text()
    assert "- best value: – (no complete trial yet)" in report and "None" not in report


def test_a_plain_optuna_study_is_not_told_to_run_a_spec_of_its_name(dlops_home):
    """A study not made by `dlops study run` records no spec: its report once said
    `dlops final sweep` trains a reference run, which is refused (no spec 'sweep'). It
    names the command that works; a study of a spec keeps its spec's command."""
    from dlops.cli import app

    dlops_home.mkdir(parents=True)
    _plain_optuna_study(dlops_home, "sweep", complete=True)
    make_study(dlops_home, "ce-digits", n=2)  # made by resnet18-ce, under another name
    build_report()
    text = (dlops_home / "reports" / "sweep" / "report.md").read_text()
    assert "`dlops final sweep`" not in text
    assert "The study records no spec (it was not made by `dlops study run`)" in text
    assert "`dlops final SPEC --study-name sweep` trains one" in text
    refused = CliRunner().invoke(app, ["final", "sweep"])
    assert refused.exit_code == 2 and "unknown spec 'sweep'" in refused.output
    ce = (dlops_home / "reports" / "ce-digits" / "report.md").read_text()
    assert "No reference run yet: `dlops final resnet18-ce --study-name ce-digits` trains one." in ce


def _set(path: str, value):
    """A damage: set the key at ``path`` (dots, and [i] for a list item) to ``value``."""

    def damage(final: dict) -> None:
        *parents, last = path.replace("[", ".").replace("]", "").split(".")
        obj = final
        for part in parents:
            obj = obj[int(part)] if isinstance(obj, list) else obj[part]
        obj[last] = value

    return damage


@pytest.mark.parametrize(
    ("spec", "damage", "says"),
    [
        ("resnet18-ce", _set("mean", "abc"), "mean is not an object"),
        ("resnet18-ce", _set("mean", {}), "mean has no figures"),
        ("resnet18-ce", _set("mean.test_top5", "abc"), 'mean.test_top5 is "abc", not a number or null'),
        ("resnet18-ce", _set("std", None), "std is not an object"),
        ("resnet18-ce", _set("std", {"test_top1": 0.1}), "std has no test_top5"),
        ("resnet18-ce", _set("std.test_top1", None), "mean.test_top1 is 0.455 but std.test_top1 is null"),
        ("resnet18-ce", _set("per_seed[0].history.val_top5", None), "per_seed[0].history.val_top5 is null, not a list"),
        ("resnet18-ce", _set("per_seed[1].history.train_loss", [0.5, "x"]), 'per_seed[1].history.train_loss[1] is "x"'),
        ("resnet18-ce", _set("per_seed[0].history", {}), "per_seed[0].history has no train_loss, val_top5"),
        ("resnet18-ce", _set("per_seed[0].test_top1", [0.5]), "per_seed[0].test_top1 is [0.5], not a number or null"),
        ("resnet18-ce", _set("per_seed[0].epochs_trained", 2.5), "per_seed[0].epochs_trained is 2.5, not an integer"),
        ("resnet18-ce", _set("epochs", "x"), 'epochs is "x", not an integer'),
        ("resnet18-ce", _set("seeds", [0]), "seeds lists 1, per_seed has 2"),
        ("resnet18-ce", _set("params", None), "params is not an object"),
        ("resnet18-ce", _set("params_source.kind", ["trial"]), 'params_source.kind is ["trial"], not a string'),
        ("resnet18-ce", _set("wall_seconds", "slow"), 'wall_seconds is "slow", not a number or null'),
        ("resnet18-ce", _set("dataset.name", ["digits"]), 'dataset.name is ["digits"], not a string'),
        ("resnet18-ce", _set("config", {"loss": 1}), "config.loss is 1, not a string or null"),
        ("resnet18-ce", _set("study", "resnet18-ce-digits"), "study is not an object"),
        ("autoencoder", _set("class_accuracy.3", "high"), "class_accuracy.3 is not a number or null"),
        ("autoencoder", _set("per_seed[0].layer_history.ae0_train_loss", None), "ae0_train_loss is not a list"),
        ("autoencoder", _set("per_seed[0].layer_history.hidden_sizes", [8, 4]), "layer_history has no ae1_train_loss"),
        (
            "autoencoder",
            _set("per_seed[0].resumed_pretraining_epochs", [1, "x"]),
            "per_seed[0].resumed_pretraining_epochs is not a list of epoch counts",
        ),
        ("autoencoder", _set("dataset.pretraining", "unlabeled"), "dataset.pretraining is not an object with a split"),
        (
            "autoencoder",
            _set("dataset.pretraining", {"split": "unlabeled", "images": "all", "available": 40}),
            "dataset.pretraining.images is not an integer",
        ),
    ],
)
def test_a_final_json_of_the_wrong_shape_is_one_line_and_nothing_is_rewritten(dlops_home, spec, damage, says):
    """Every key the report reads is checked, for every final.json, before anything is
    written: a damaged one once gave a traceback after curves.png and the study plots had
    been redrawn (and uploaded), or an empty report without a word."""
    import os

    from dlops.cli import app

    dlops_home.mkdir(parents=True)
    write_final(dlops_home, make_final("resnet18-ce", "ce", [0.90, 0.92]))
    ae = make_final("autoencoder", None, [0.6], trainer="autoencoder", class_accuracy={str(i): 0.5 for i in range(10)})
    ae["per_seed"][0]["layer_history"] = {
        "hidden_sizes": [8],
        **{f"ae0_{k}": [0.3, 0.2] for k in ("train_loss", "val_loss", "epoch_seconds")},
    }
    write_final(dlops_home, ae)
    make_study(dlops_home, "resnet18-ce-digits", n=2)  # the resnet18-ce reference run's study: its plots are drawn
    assert CliRunner().invoke(app, ["report"]).exit_code == 0
    final_json = dlops_home / "reports" / spec / "final.json"
    final = json.loads(final_json.read_text())
    damage(final)
    final_json.write_text(json.dumps(final))
    written = [p for p in (dlops_home / "reports").rglob("*") if p.is_file()]
    written += [p for p in (dlops_home / "artifacts").rglob("*") if p.is_file()]
    for p in written:  # an hour old: anything rewritten now shows in its time
        os.utime(p, ns=(p.stat().st_mtime_ns - 3600 * 10**9,) * 2)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in written}

    result = CliRunner().invoke(app, ["report"])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"error: {final_json} is damaged: ") and says in line, line
    now = [p for p in (dlops_home / "reports").rglob("*") if p.is_file()]
    now += [p for p in (dlops_home / "artifacts").rglob("*") if p.is_file()]
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in now} == before


@pytest.mark.parametrize(
    ("spec", "study_name", "recorded"),
    [
        ("autoencoder", "autoencoder", False),  # the spec's own name, taken by a resnet18-ce study
        ("resnet18-triplet", "resnet18-triplet-digits", False),  # the name `dlops study run` would give it
        ("resnet18-triplet", "picked", True),  # the study its final.json names, since replaced by another spec's
    ],
)
def test_a_study_of_another_spec_is_never_shown_as_a_specs_study(dlops_home, spec, study_name, recorded):
    """A spec's entry shows a study only if the study records that spec: a resnet18-ce study
    named `autoencoder` once filled the autoencoder's report and its study/ folder."""
    dlops_home.mkdir(parents=True)
    trainer = "autoencoder" if spec == "autoencoder" else "resnet18"
    final = make_final(spec, None if trainer == "autoencoder" else "triplet", [0.6], trainer=trainer)
    final["study"] = {"name": study_name, "storage": "sqlite:///x"} if recorded else None
    write_final(dlops_home, final)
    make_study(dlops_home, study_name, n=2, loss="ce")  # made by resnet18-ce

    result = build_report()
    entries = {e.folder: e for e in result.entries}
    reports = dlops_home / "reports"
    assert entries[spec].study is None and entries[spec].final is not None
    assert not (reports / spec / "study").exists()
    assert "## Study" not in (reports / spec / "report.md").read_text()
    (own,) = [e for e in result.entries if e.study is not None]
    assert own.study.study_name == study_name and own.final is None and own.folder != spec
    text = (reports / own.folder / "report.md").read_text()
    assert f"## Study `{study_name}`" in text and "![Slice plot](study/slice.png)" in text
    assert f"`dlops final resnet18-ce --study-name {study_name}` trains one" in text
    index = result.index.read_text()
    assert f"study `{study_name}` (spec `resnet18-ce`)" in index and f"({own.folder}/report.md)" in index


def test_a_reference_run_whose_study_is_gone_takes_no_stand_in(dlops_home):
    """The final.json of resnet18-ce names study `resnet18-ce-digits`, since deleted; a study
    named `resnet18-ce` (the spec's own name, of that spec) once took over the column: its
    best value and plots next to a reference run it had nothing to do with."""
    dlops_home.mkdir(parents=True)
    final = make_final("resnet18-ce", "ce", [0.6])
    final["study"] = {"name": "resnet18-ce-digits", "storage": "sqlite:///x"}
    write_final(dlops_home, final)
    make_study(dlops_home, "resnet18-ce", n=2, loss="ce")  # of the spec, not the run's

    result = build_report()
    entries = {e.folder: e for e in result.entries}
    assert entries["resnet18-ce"].study is None and entries["resnet18-ce"].final is not None
    assert not (dlops_home / "reports" / "resnet18-ce" / "study").exists()
    (other,) = [e for e in result.entries if e.study is not None]
    assert other.study.study_name == "resnet18-ce" and other.final is None and other.folder != "resnet18-ce"


def test_a_copy_of_a_reference_run_kept_under_reports_is_left_as_it_is(dlops_home):
    """docs: "Copy reports/<spec>/ first to keep it". A copy kept beside it, as
    reports/resnet18-ce-old/, was taken for a spec of that name: its report.md rewritten
    without the study section, a second cross-entropy column in the index."""
    from dlops.cli import app

    write_final(dlops_home, make_final("resnet18-ce", "ce", [0.90]))  # on digits: its study is resnet18-ce-digits
    make_study(dlops_home, "resnet18-ce-digits", n=2)
    build_report()
    reports = dlops_home / "reports"
    shutil.copytree(reports / "resnet18-ce", reports / "resnet18-ce-old")
    kept = {
        p.relative_to(reports / "resnet18-ce-old"): p.read_bytes() for p in (reports / "resnet18-ce-old").rglob("*.md")
    }
    assert kept

    result = build_report()
    assert {
        p.relative_to(reports / "resnet18-ce-old"): p.read_bytes() for p in (reports / "resnet18-ce-old").rglob("*.md")
    } == kept
    assert [e.name for e in result.entries] == ["resnet18-ce"]
    assert result.copies == {"resnet18-ce-old": "resnet18-ce"}
    index = (reports / "index.md").read_text()
    assert "resnet18-ce-old/report.md" not in index and "`resnet18-ce-old/`: a copy of a reference run" in index
    out = CliRunner().invoke(app, ["report"])
    assert out.exit_code == 0 and "left reports/resnet18-ce-old/ as it is" in out.output, out.output


def test_a_reference_run_whose_study_found_a_better_trial_since_is_not_called_its_best(dlops_home):
    """The run took trial 0, then the study's best; trial 2 beat it later. The report
    showed "best trial #0" beside the study's "best: trial 2"."""
    dlops_home.mkdir(parents=True)
    study = make_study(dlops_home, "resnet18-ce-digits", n=3)
    taken = min(study.trials, key=lambda t: t.value)  # any trial but the best
    assert taken.number != study.best_trial.number
    final = make_final("resnet18-ce", "ce", [0.9], study={"name": "resnet18-ce-digits"})
    final["params_source"] = {
        "kind": "trial",
        "study": "resnet18-ce-digits",
        "trial": taken.number,
        "metric": "val_top5",
        "value": taken.value,
    }
    write_final(dlops_home, final)
    build_report()
    now = f"its best is now trial #{study.best_trial.number} (val_top5 {study.best_value:.4f})"
    report = (dlops_home / "reports" / "resnet18-ce" / "report.md").read_text()
    index = (dlops_home / "reports" / "index.md").read_text()
    for text in (report, index):
        assert f"best trial #{taken.number}" not in text
        assert (
            f"trial #{taken.number} of study `resnet18-ce-digits` (val_top5 {taken.value:.4f}), its best when" in text
        )
        assert now in text

    final["params_source"]["trial"] = study.best_trial.number  # the study's best still: as before
    write_final(dlops_home, final)
    build_report()
    report = (dlops_home / "reports" / "resnet18-ce" / "report.md").read_text()
    assert f"| from | best trial #{study.best_trial.number} of study `resnet18-ce-digits`" in report
    assert "its best is now" not in report


def test_a_reference_run_whose_study_was_deleted_keeps_no_plots_of_it(dlops_home):
    """`dlops study delete` of the study a reference run came from, then `dlops report`: the
    report said "no study" while reports/resnet18-ce/study/ still held that study's plots.
    They go; a file dlops did not draw stays, and the reference run is untouched."""
    final = make_final("resnet18-ce", "ce", [0.6])
    final["study"] = {"name": "resnet18-ce-digits", "storage": "sqlite:///x"}
    write_final(dlops_home, final)
    make_study(dlops_home, "resnet18-ce-digits", n=3)
    build_report()
    folder = dlops_home / "reports" / "resnet18-ce"
    assert {p.name for p in (folder / "study").glob("*.png")} >= {"optimization_history.png", "slice.png"}
    kept_final = (folder / "final.json").read_bytes()

    optuna.delete_study(study_name="resnet18-ce-digits", storage=f"sqlite:///{dlops_home / 'dlops.db'}")
    build_report()
    assert not (folder / "study").exists()
    assert "study/" not in (folder / "report.md").read_text()
    assert (folder / "final.json").read_bytes() == kept_final and (folder / "curves.png").exists()

    # a file of the user's own in study/ keeps the folder (and itself)
    make_study(dlops_home, "resnet18-ce-digits", n=3)
    build_report()
    (folder / "study" / "notes.txt").write_text("mine")
    optuna.delete_study(study_name="resnet18-ce-digits", storage=f"sqlite:///{dlops_home / 'dlops.db'}")
    build_report()
    assert [p.name for p in (folder / "study").iterdir()] == ["notes.txt"]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_study_folder_goes_once_a_reference_run_takes_the_study_over(dlops_home):
    """`dlops report`, `dlops final` (which takes study resnet18-ce-digits into the spec's
    column), `dlops report`: reports/resnet18-ce-digits/ stayed beside reports/resnet18-ce/,
    its report.md telling to run a final that exists, its plots those of the spec's folder."""
    dlops_home.mkdir(parents=True)
    from dlops.cli import app

    make_study(dlops_home, "resnet18-ce-digits", n=3)
    build_report()
    reports = dlops_home / "reports"
    assert (reports / "resnet18-ce-digits" / "study" / "slice.png").exists()
    final = make_final("resnet18-ce", "ce", [0.6])
    final["study"] = {"name": "resnet18-ce-digits", "storage": "sqlite:///x"}
    write_final(dlops_home, final)

    out = CliRunner().invoke(app, ["report"])
    assert out.exit_code == 0, out.output
    assert not (reports / "resnet18-ce-digits").exists()
    assert (
        "removed reports/resnet18-ce-digits/, which an earlier report wrote: "
        "resnet18-ce-digits is reported in reports/resnet18-ce/ now"
    ) in out.output
    assert (reports / "resnet18-ce" / "study" / "slice.png").exists()
    assert (reports / "resnet18-ce" / "final.json").exists()


def test_the_folder_of_a_deleted_study_goes_but_never_a_folder_dlops_did_not_write(dlops_home):
    """`dlops study delete extra`, then `dlops report`: reports/extra/ stayed, a report of a
    study that no longer exists. It goes; a copy of it, a look-alike folder of the user's, and
    a file the user put in it (with the folder) stay."""
    dlops_home.mkdir(parents=True)
    from dlops.cli import app

    url = f"sqlite:///{dlops_home / 'dlops.db'}"
    make_study(dlops_home, "extra", n=3)
    make_study(dlops_home, "other", n=3)
    build_report()
    reports = dlops_home / "reports"
    shutil.copytree(reports / "extra", reports / "extra-kept")  # the user's copy
    shutil.copytree(reports / "other", reports / "mine")  # looks like dlops's, written by the user
    (reports / "other" / "notes.txt").write_text("mine")
    copies = {name: _tree(reports / name) for name in ("extra-kept", "mine")}

    optuna.delete_study(study_name="extra", storage=url)
    optuna.delete_study(study_name="other", storage=url)
    out = CliRunner().invoke(app, ["report"])
    assert out.exit_code == 0, out.output
    assert not (reports / "extra").exists()
    assert f"removed reports/extra/, which an earlier report wrote: extra has no study in {url} any more" in out.output
    assert _tree(reports / "other") == {"notes.txt": b"mine"}
    assert "took the report files out of reports/other/ (other has no study" in out.output
    assert "it stays for notes.txt, not dlops's" in out.output
    assert {name: _tree(reports / name) for name in ("extra-kept", "mine")} == copies
    assert "extra" not in (reports / "index.md").read_text()

    out = CliRunner().invoke(app, ["report"])  # said once: the folder is the user's now
    assert out.exit_code == 0 and "reports/other/" not in out.output, out.output
    assert _tree(reports / "other") == {"notes.txt": b"mine"}


def test_folders_of_a_report_on_another_storage_or_by_an_older_dlops_stay(dlops_home, tmp_path):
    """A report on another --storage (or on one that does not exist, a typo) shows other
    studies: the folders written from the default storage are not its to remove, and a later
    report there still knows them. Folders from before the record (an older dlops) stay."""
    dlops_home.mkdir(parents=True)
    from dlops.cli import app

    make_study(dlops_home, "extra", n=3)
    build_report()
    reports = dlops_home / "reports"
    before = _tree(reports / "extra")
    other = tmp_path / "other.db"
    optuna.create_study(study_name="elsewhere", storage=f"sqlite:///{other}")
    for storage in (f"sqlite:///{other}", f"sqlite:///{tmp_path / 'typo.db'}"):
        out = CliRunner().invoke(app, ["report", "--storage", storage])
        assert out.exit_code == 0 and "removed" not in out.output, out.output
        assert _tree(reports / "extra") == before

    optuna.delete_study(study_name="extra", storage=f"sqlite:///{dlops_home / 'dlops.db'}")
    build_report()
    assert not (reports / "extra").exists()

    # no record (the reports of a dlops before it): nothing is taken for dlops's own
    make_study(dlops_home, "extra", n=3)
    build_report()
    (reports / ".dlops-report.json").unlink()
    optuna.delete_study(study_name="extra", storage=f"sqlite:///{dlops_home / 'dlops.db'}")
    assert build_report().removed == {}
    assert (reports / "extra" / "report.md").exists()


def test_the_loss_chart_goes_with_the_last_resnet_entry(dlops_home):
    dlops_home.mkdir(parents=True)
    make_study(dlops_home, "resnet18-ce-digits", n=2)
    build_report()
    chart = dlops_home / "reports" / "val_top5_by_loss.png"
    assert chart.exists()
    optuna.delete_study(study_name="resnet18-ce-digits", storage=f"sqlite:///{dlops_home / 'dlops.db'}")
    build_report()
    assert not chart.exists()
    assert "val_top5_by_loss.png" not in (dlops_home / "reports" / "index.md").read_text()


def test_the_report_line_counts_specs_and_studies_apart(dlops_home):
    """A study made under its own name is reported as a study, not counted as a spec."""
    from dlops.cli import app

    dlops_home.mkdir(parents=True)
    empty = CliRunner().invoke(app, ["report"])
    assert empty.exit_code == 0 and "index.md (0 specs, 1 file)" in empty.output, empty.output
    make_study(dlops_home, "resnet18-ce", n=2)  # the spec's own study: the spec's entry
    _plain_optuna_study(dlops_home, "sweep", complete=True)
    _plain_optuna_study(dlops_home, "sweep-2", complete=True)
    result = CliRunner().invoke(app, ["report"])
    assert result.exit_code == 0, result.output
    line = result.output.strip().splitlines()[-1]
    assert re.search(r"index\.md \(1 spec, 2 studies, \d+ files\)$", line), line
