"""Studies end to end on digits, with a narrow ResNet18 so that each trial takes a second."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from dlops.cli import app
from dlops.errors import DlopsError
from dlops.liveness import OWNER_KEY
from dlops.objective import RunOptions
from dlops.paths import default_storage_url
from dlops.runner import TrialsFailed, run_study
from dlops.spec import load_spec
from dlops.storage import open_storage
from dlops.trainers.base import HISTORY_KEYS


def tiny_spec(
    tmp_path: Path,
    loss: str,
    *,
    lr_range: tuple[float, float] | None = None,
    baseline_lr=1e-3,
    pruner: str = 'type = "median"\nn_startup_trials = 3\nn_warmup_steps = 1',
    epochs: int = 2,
    per_class: int = 20,
    digits_metric: bool = False,
    overrides: dict | None = None,
) -> Path:
    """The built-in spec of ``loss``, made cheap: digits, width 8, 20 images per class
    (``lr_range``: the searched lr range, else the spec's own; ``overrides``: more, last)."""
    import tomllib

    from dlops.spec import Add, Replace, override_table, spec_table
    from specs import write_spec

    digits = {"epochs": epochs, "metric": "val_top1"} if digits_metric else {"epochs": epochs}  # else top-5 there too
    table = spec_table(
        f"resnet18-{loss}",
        {
            "name": f"tiny-{loss}",
            "train": {
                "dataset": "digits",
                "width": Add(8),
                "subset_per_class": Add(per_class),
                "eval_batch_size": Add(64),
                "batch_size": 32,
            },
            "datasets": {"digits": Replace(digits)},  # no wider ResNet on digits: width 8 everywhere
            "search": {"lr": {"low": lr_range[0], "high": lr_range[1]}} if lr_range else {},
            "baseline": {"lr": baseline_lr},
            "pruner": Replace(tomllib.loads(pruner)),
            "sampler": Replace({"type": "tpe", "seed": 0}),
        },
    )
    return write_spec(tmp_path / f"tiny-{loss}.toml", override_table(table, overrides or {}))


def check_history(trial: optuna.trial.FrozenTrial, epochs: int) -> None:
    history = trial.user_attrs["history"]
    assert set(HISTORY_KEYS) <= set(history)
    assert {len(v) for v in history.values()} == {epochs}
    assert sorted(trial.intermediate_values) == list(range(epochs))
    assert [trial.intermediate_values[e] for e in range(epochs)] == history["val_top5"]


@pytest.mark.parametrize("loss", ["ce", "triplet", "center"])
def test_study_of_each_loss_runs_with_baseline_first(loss: str, tmp_path: Path, dlops_home: Path) -> None:
    spec = load_spec(str(tiny_spec(tmp_path, loss)))
    run_study(spec, RunOptions(n_trials=2, device="cpu"))
    study = optuna.load_study(study_name=f"tiny-{loss}", storage=f"sqlite:///{dlops_home / 'dlops.db'}")
    trials = study.get_trials()
    assert len([t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]) == 2
    assert trials[0].params["lr"] == 1e-3 and trials[0].user_attrs["baseline"] is True
    assert trials[1].params["lr"] != 1e-3
    assert study.metric_names == ["val_top5"]
    for t in trials:
        check_history(t, 2)
        assert 0.0 <= t.value <= 1.0
        # a triplet trial's history carries the batch-hard diagnostics, one value an epoch
        diagnostics = {"triplet_violated", "triplet_pos_dist", "triplet_neg_dist", "embedding_norm"}
        assert (diagnostics <= set(t.user_attrs["history"])) == (loss == "triplet")
        if loss == "triplet":
            assert all(0.0 <= v <= 1.0 for v in t.user_attrs["history"]["triplet_violated"])


def test_cli_run_show_and_list(tmp_path: Path, dlops_home: Path) -> None:
    spec = tiny_spec(tmp_path, "triplet", epochs=1)
    runner = CliRunner()
    result = runner.invoke(app, ["study", "run", str(spec), "--n-trials", "2", "--device", "cpu", "--seed", "5"])
    assert result.exit_code == 0, result.output
    assert "trial   0  epoch   1" in result.output and "val_top5" in result.output
    assert "best val_top5" in result.output and "complete" in result.output

    shown = runner.invoke(app, ["study", "show", "tiny-triplet", "--json"])
    assert shown.exit_code == 0, shown.output
    info = json.loads(shown.output)
    assert info["states"]["COMPLETE"] + info["states"].get("PRUNED", 0) == 2
    # soft margin or hinge; the margin only for the hinge
    assert info["best"]["number"] in (0, 1) and {"lr", "triplet_soft"} <= set(info["best"]["params"])
    assert (
        info["trials"][0]["params"] == {"lr": 1e-3, "triplet_soft": False, "margin": 0.2, "triplet_mining": "hard"}
        and info["trials"][0]["baseline"]
    )
    for t in info["trials"]:
        assert ("margin" in t["params"]) == (t["params"]["triplet_soft"] is False)
    assert math.isclose(info["best"]["value"], max(t["value"] for t in info["trials"] if t["value"] is not None))

    listed = runner.invoke(app, ["study", "list"])
    assert listed.exit_code == 0 and "tiny-triplet" in listed.output
    as_json = json.loads(runner.invoke(app, ["study", "list", "--json"]).output)
    (row,) = as_json["studies"]
    assert as_json["no_storage"] is None and as_json["storage"] == default_storage_url()
    assert row["name"] == "tiny-triplet" and row["n_trials"] == 2 and row["best_value"] == info["best"]["value"]

    # running again adds trials to the same study
    again = runner.invoke(app, ["study", "run", str(spec), "--n-trials", "1", "--device", "cpu", "--seed", "5"])
    assert again.exit_code == 0, again.output
    info = json.loads(runner.invoke(app, ["study", "show", "tiny-triplet", "--json"]).output)
    assert info["n_trials"] == 3

    missing = runner.invoke(app, ["study", "show", "nope"])
    assert missing.exit_code != 0 and "no study named 'nope'" in missing.output


def test_a_hopeless_trial_is_pruned(tmp_path: Path, dlops_home: Path) -> None:
    spec = load_spec(
        str(
            tiny_spec(
                tmp_path,
                "ce",
                lr_range=(1e-7, 1.0),
                baseline_lr=0.02,
                epochs=3,
                per_class=50,
                pruner='type = "median"\nn_startup_trials = 1\nn_warmup_steps = 0',
            )
        )
    )
    run_study(spec, RunOptions(n_trials=1, device="cpu"))
    study = optuna.load_study(study_name="tiny-ce", storage=f"sqlite:///{dlops_home / 'dlops.db'}")
    study.enqueue_trial({"lr": 1e-7})  # learns nothing in 3 epochs
    run_study(spec, RunOptions(n_trials=1, device="cpu"))
    hopeless = study.get_trials()[1]
    assert hopeless.params["lr"] == 1e-7
    assert hopeless.state == TrialState.PRUNED
    assert len(hopeless.intermediate_values) < 3
    assert study.get_trials()[0].value > 0.9  # while the baseline learned
    # counted from 1, like the epoch lines: the epochs it trained
    epochs = len(hopeless.intermediate_values)
    assert hopeless.user_attrs["stopped_reason"].startswith(f"pruned after epoch {epochs} (val_top5=")


def test_a_diverging_trial_is_pruned_with_its_reason_and_the_study_goes_on(tmp_path: Path, dlops_home: Path) -> None:
    spec = load_spec(
        str(tiny_spec(tmp_path, "center", lr_range=(1e-4, 1e9), baseline_lr=1e9, epochs=1, pruner='type = "none"'))
    )
    result = run_study(spec, RunOptions(n_trials=2, device="cpu"))
    trials = result.study.get_trials()
    assert trials[0].state == TrialState.PRUNED
    assert "non-finite training loss" in trials[0].user_attrs["stopped_reason"]
    assert len(trials) == 2 and trials[1].state in (TrialState.COMPLETE, TrialState.PRUNED)


def test_same_spec_and_seed_give_the_same_params_and_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = load_spec(str(tiny_spec(tmp_path, "ce", epochs=1)))
    runs = []
    for home in ("a", "b"):
        monkeypatch.setenv("DLOPS_HOME", str(tmp_path / home))
        study = run_study(spec, RunOptions(n_trials=3, device="cpu", seed=11)).study
        runs.append([(t.params, t.value, t.user_attrs["history"]["train_loss"]) for t in study.get_trials()])
    assert runs[0] == runs[1]
    assert len({json.dumps(p) for p, _, _ in runs[0]}) == 3


def test_unavailable_dataset_says_how_to_get_it(dlops_home: Path) -> None:
    result = CliRunner().invoke(app, ["study", "run", "--loss", "ce", "--dataset", "tiny-imagenet", "--n-trials", "1"])
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert "dlops data fetch tiny-imagenet" in result.output.replace("\n", " ")
    assert "--dataset digits" in result.output.replace("\n", " ")


def test_digits_studies_optimise_top1_and_a_study_keeps_one_objective(tmp_path: Path, dlops_home: Path) -> None:
    """On digits (10 classes) the built-in specs optimise and prune on validation top-1;
    a run that would add trials of another metric or dataset to a study is refused and
    leaves the study as it was."""
    spec = load_spec(str(tiny_spec(tmp_path, "ce", digits_metric=True)))
    run_study(spec, RunOptions(n_trials=2, device="cpu"))
    url = f"sqlite:///{dlops_home / 'dlops.db'}"
    study = optuna.load_study(study_name="tiny-ce", storage=url)
    assert study.metric_names == ["val_top1"]
    for t in study.get_trials():
        history = t.user_attrs["history"]
        assert [t.intermediate_values[e] for e in sorted(t.intermediate_values)] == history["val_top1"]
        if t.state == TrialState.COMPLETE:
            assert t.value == history["val_top1"][-1]
    before = [(t.number, t.state, t.value) for t in study.get_trials()]

    top5 = load_spec(str(tiny_spec(tmp_path, "ce")))  # same study name, top-5 objective
    with pytest.raises(DlopsError, match="optimises val_top1, this run val_top5"):
        run_study(top5, RunOptions(n_trials=1, device="cpu"))
    study.set_user_attr("dataset", "tiny-imagenet")  # as if it had run there
    with pytest.raises(DlopsError, match="ran on tiny-imagenet, not digits"):
        run_study(spec, RunOptions(n_trials=1, device="cpu"))
    assert [(t.number, t.state, t.value) for t in study.get_trials()] == before


def test_a_new_study_refuses_other_settings_before_any_trial_trained(tmp_path: Path, dlops_home: Path) -> None:
    """Two runs starting one new study at once: the second prepares it while the only trial
    is the first's WAITING baseline, which holds no config yet. It was let in, and the study
    got trials of two epoch counts and subsets; now the settings recorded when the study was
    prepared refuse it, and the same settings (another device or sampler seed) still join."""
    from dlops.runner import open_study, prepare_study

    spec = load_spec(str(tiny_spec(tmp_path, "ce", epochs=1, per_class=10)))
    journal = f"journal://{tmp_path / 's.log'}"
    first = RunOptions(device="cpu", storage=journal)
    assert prepare_study(open_study(spec, first), spec, first)
    for options, message in (
        (
            RunOptions(device="cpu", storage=journal, epochs=3),
            r"trains with epochs = 1 \(recorded when the study was prepared\), this run with epochs = 3",
        ),
        (
            RunOptions(device="cpu", storage=journal, train_overrides={"subset_per_class": 20}),
            "trains with subset_per_class = 10 .*this run with subset_per_class = 20",
        ),
    ):
        with pytest.raises(DlopsError, match=message):
            prepare_study(open_study(spec, options), spec, options)
    trials = optuna.load_study(study_name="tiny-ce", storage=open_storage(journal)).get_trials()
    assert [(t.number, t.state) for t in trials] == [(0, TrialState.WAITING)]  # nothing added by the refused runs
    settings = optuna.load_study(study_name="tiny-ce", storage=open_storage(journal)).user_attrs["settings"]
    assert (settings["epochs"], settings["subset_per_class"]) == (1, 10)  # the first run's, kept
    same = RunOptions(device="cuda", storage=journal, seed=7)  # only the speed and the sampler differ
    assert not prepare_study(open_study(spec, same), spec, same)
    run_study(spec, RunOptions(n_trials=1, device="cpu", storage=journal, epochs=1))
    trial = optuna.load_study(study_name="tiny-ce", storage=open_storage(journal)).get_trials()[0]
    assert trial.state == TrialState.COMPLETE and trial.user_attrs["config"]["subset_per_class"] == 10


def test_a_study_run_on_a_journal_with_a_torn_last_record_sets_it_aside_and_keeps_every_trial(
    tmp_path: Path, dlops_home: Path
) -> None:
    """A journal whose last record was cut off (kill -9 mid-write, a full disk): the next
    run once appended onto the torn line, failed with a JSONDecodeError and left the file
    unreadable for every command. Now it says it set the torn bytes aside, runs, and the
    study keeps every trial it had."""
    spec = load_spec(str(tiny_spec(tmp_path, "ce", epochs=1, per_class=10)))
    path = tmp_path / "w.log"
    journal = f"journal://{path}"
    run_study(spec, RunOptions(n_trials=2, device="cpu", storage=journal))
    path.write_bytes(path.read_bytes()[:-20])
    before = [
        (t.number, t.state, t.value)
        for t in optuna.load_study(study_name="tiny-ce", storage=open_storage(journal, create=False)).get_trials()
    ]
    assert [state for _, state, _ in before] == [TrialState.COMPLETE, TrialState.COMPLETE]
    said: list[str] = []
    result = run_study(spec, RunOptions(n_trials=1, device="cpu", storage=journal), say=said.append)
    assert result.added == 1
    (aside,) = tmp_path.glob("w.log.torn-*")
    assert any(
        line.startswith(f"journal {path} ended in a record cut off mid-write") and str(aside) in line for line in said
    ), said
    after = optuna.load_study(study_name="tiny-ce", storage=open_storage(journal, create=False)).get_trials()
    assert [(t.number, t.state, t.value) for t in after][:2] == before
    assert len(after) == 3 and after[2].state in (TrialState.COMPLETE, TrialState.PRUNED)


def test_a_study_keeps_its_settings_direction_and_spec(tmp_path: Path, dlops_home: Path) -> None:
    """A run that would add trials of other fixed settings (epochs, subset, batch size), a
    search space Optuna cannot continue, the other direction or another spec to a study is
    refused in one line before any trial, and the study stays as it was; the same settings
    with another sampler seed or device join it."""
    spec = load_spec(str(tiny_spec(tmp_path, "ce", digits_metric=True)))
    run_study(spec, RunOptions(n_trials=1, device="cpu"))
    url = f"sqlite:///{dlops_home / 'dlops.db'}"
    study = optuna.load_study(study_name="tiny-ce", storage=url)
    before = [(t.number, t.state, t.value) for t in study.get_trials()]

    refused = [
        (
            spec,
            RunOptions(n_trials=1, device="cpu", epochs=3),
            r"trains with epochs = 2 \(trial 0\), this run with epochs = 3",
        ),
        (spec, RunOptions(n_trials=1, device="cpu", train_overrides={"subset_per_class": 10}), "subset_per_class = 20"),
        (
            load_spec(str(tiny_spec(tmp_path, "ce", digits_metric=True, overrides={"train": {"batch_size": 16}}))),
            RunOptions(n_trials=1, device="cpu"),
            "trains with batch_size = 32",
        ),
        (
            load_spec(str(tiny_spec(tmp_path, "ce", digits_metric=True, overrides={"search": {"lr": {"log": False}}}))),
            RunOptions(n_trials=1, device="cpu"),
            "searched lr as FloatDistribution",
        ),
        (
            load_spec(
                str(
                    tiny_spec(
                        tmp_path,
                        "ce",
                        digits_metric=True,
                        overrides={
                            "direction": "minimize",
                            "metric": "val_loss",
                            "datasets": {"digits": {"metric": "val_loss"}},
                        },
                    )
                )
            ),
            RunOptions(n_trials=1, device="cpu"),
            "is to maximize its value, this run's spec to minimize",
        ),
        (
            load_spec(str(tiny_spec(tmp_path, "center", digits_metric=True))),
            RunOptions(n_trials=1, device="cpu", study_name="tiny-ce"),
            "belongs to the spec tiny-ce, this run is tiny-center",
        ),
    ]
    for other, options, message in refused:
        with pytest.raises(DlopsError, match=message):
            run_study(other, options)
    assert [(t.number, t.state, t.value) for t in study.get_trials()] == before
    assert study.user_attrs["spec"] == "tiny-ce"

    run_study(spec, RunOptions(n_trials=1, device="cpu", seed=5))  # the sampler's seed is not a setting
    assert len(optuna.load_study(study_name="tiny-ce", storage=url).get_trials()) == len(before) + 1


def test_a_study_dlops_did_not_make_is_not_joined(tmp_path: Path, dlops_home: Path) -> None:
    """A plain Optuna study (minimising, with trials) or a multi-objective one under the
    run's study name: refused in one line, the study untouched."""
    url = f"sqlite:///{dlops_home / 'dlops.db'}"
    dlops_home.mkdir(parents=True, exist_ok=True)
    plain = optuna.create_study(study_name="tiny-ce", storage=url, direction="maximize")
    plain.optimize(lambda t: t.suggest_float("lr", 1e-4, 1e-1, log=True), n_trials=2)
    optuna.create_study(study_name="multi", storage=url, directions=["minimize", "maximize"])
    spec = load_spec(str(tiny_spec(tmp_path, "ce", digits_metric=True)))
    with pytest.raises(DlopsError, match="was not made by dlops study run"):
        run_study(spec, RunOptions(n_trials=1, device="cpu"))
    with pytest.raises(DlopsError, match="has 2 objectives"):
        run_study(spec, RunOptions(n_trials=1, device="cpu", study_name="multi"))
    assert len(optuna.load_study(study_name="tiny-ce", storage=url).get_trials()) == 2
    assert optuna.load_study(study_name="multi", storage=url).get_trials() == []


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--study-name", ""], "--study-name is blank"),
        (["--study-name", "   "], "--study-name is blank"),
        (["--study-name", "../../etc"], "'/' is not allowed"),
        (["--study-name", "a\nb"], "'\\n' is not allowed"),
        (["--study-name", ".."], "is not a name"),
        (["--study-name", "x" * 121], "study name of 121 characters: at most 120"),
        (["--timeout", "0"], "--timeout 0: no trial could start"),
    ],
)
def test_a_run_that_cannot_name_its_files_or_start_a_trial_is_refused_before_anything_is_written(
    extra: list[str], message: str, dlops_home: Path
) -> None:
    from dlops.cli import app

    args = ["study", "run", "--loss", "ce", "--dataset", "digits", "--n-trials", "1", "--epochs", "1"]
    result = CliRunner().invoke(app, [*args, *extra, "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not dlops_home.exists() or not any(dlops_home.iterdir())


# --------------------------------------------------------------------------- checkpoints of trials


def test_checkpoint_folders_of_similar_study_names_do_not_collide(tmp_path: Path, dlops_home: Path) -> None:
    """`a/b` and `a_b` once shared checkpoints/a_b: creating one study deleted the other's."""
    from dlops.objective import checkpoint_path
    from dlops.runner import open_study, prepare_study

    assert checkpoint_path("a/b", 0).parent != checkpoint_path("a_b", 0).parent
    assert checkpoint_path("../x", 0).parent.parent == dlops_home / "checkpoints"
    kept = checkpoint_path("a/b", 3)
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"trial 3 of study a/b")
    spec = load_spec(str(tiny_spec(tmp_path, "ce", epochs=1)))
    options = RunOptions(device="cpu", study_name="a_b")
    assert prepare_study(open_study(spec, options), spec, options)  # a new study: clears its own folder only
    assert kept.read_bytes() == b"trial 3 of study a/b"


def test_one_study_name_in_two_storages_keeps_two_checkpoint_folders(tmp_path: Path, dlops_home: Path) -> None:
    """A new study in another storage under a name the default storage already has once
    cleared that study's checkpoints (an interrupted trial then trained again from epoch 0)."""
    from dlops.objective import checkpoint_path
    from dlops.runner import open_study, prepare_study

    journal = f"journal://{tmp_path / 'other.log'}"
    kept = checkpoint_path("tiny-ce", 1)
    assert kept == checkpoint_path("tiny-ce", 1, f"sqlite:///{dlops_home / 'dlops.db'}")  # the default, spelled out
    assert checkpoint_path("tiny-ce", 1, journal).parent != kept.parent
    assert checkpoint_path("tiny-ce", 1, journal) == checkpoint_path("tiny-ce", 1, str(tmp_path / "other.log"))
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"trial 1 of tiny-ce in the default storage")
    spec = load_spec(str(tiny_spec(tmp_path, "ce", epochs=1)))
    options = RunOptions(device="cpu", storage=journal)
    assert prepare_study(open_study(spec, options), spec, options)  # new there: clears its own folder only
    assert kept.read_bytes() == b"trial 1 of tiny-ce in the default storage"


def test_a_server_storage_spelled_another_way_finds_its_checkpoints(dlops_home: Path) -> None:
    """A PostgreSQL or Redis study interrupted, then continued with its URL spelled another
    way (postgres:// for postgresql+psycopg2://, the default port left out, a connect
    option added): the retry once looked in another checkpoint folder and trained again
    from epoch 0. Another database, schema or Redis prefix keeps its own folder."""
    from dlops.objective import checkpoint_path

    def folder(url: str) -> Path:
        return checkpoint_path("tiny-ce", 1, url).parent

    pg = folder("postgresql+psycopg2://dlops:s3cret@db-host:5432/dlops")
    for same in (
        "postgresql://dlops:s3cret@db-host/dlops",
        "postgres://dlops:s3cret@DB-Host:5432/dlops?connect_timeout=5",
        "postgresql+psycopg://dlops:other@db-host:5432/dlops?sslmode=require&application_name=w",
    ):
        assert folder(same) == pg, same
    for other in (
        "postgresql+psycopg2://dlops:s3cret@db-host:5432/dlops2",
        "postgresql+psycopg2://dlops:s3cret@db-host:5433/dlops",
        "postgresql+psycopg2://dlops:s3cret@db-host:5432/dlops?options=-csearch_path%3Dmine",
    ):
        assert folder(other) != pg, other
    redis = folder("redis://127.0.0.1:6379/0?prefix=exp")
    assert (
        folder("redis://127.0.0.1/?prefix=exp") == folder("redis://127.0.0.1:6379?prefix=exp&socket_timeout=9") == redis
    )
    for other in (
        "redis://127.0.0.1:6379/0?prefix=exp2",
        "redis://127.0.0.1:6379/1?prefix=exp",
        "redis://127.0.0.1:6379/0",
    ):
        assert folder(other) != redis, other
    assert "s3cret" not in str(pg)


def test_a_study_reached_through_dlops_storage_keeps_its_own_checkpoint_folder(
    tmp_path: Path, dlops_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A journal study run with $DLOPS_STORAGE set, then a new study of the same name in the
    SQLite file of $DLOPS_HOME (the variable unset): the new study once cleared the journal
    study's checkpoints, since both took the bare folder."""
    from dlops.objective import checkpoint_path
    from dlops.runner import open_study, prepare_study

    journal = f"journal://{tmp_path / 'j.log'}"
    monkeypatch.setenv("DLOPS_STORAGE", journal)
    theirs = checkpoint_path("tiny-ce", 1)  # the journal study's, through the variable
    assert theirs == checkpoint_path("tiny-ce", 1, journal)
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(b"trial 1 of tiny-ce in the journal")
    monkeypatch.delenv("DLOPS_STORAGE")
    assert checkpoint_path("tiny-ce", 1) != theirs
    spec = load_spec(str(tiny_spec(tmp_path, "ce", epochs=1)))
    options = RunOptions(device="cpu")
    assert prepare_study(open_study(spec, options), spec, options)  # new in the SQLite file
    assert theirs.read_bytes() == b"trial 1 of tiny-ce in the journal"


def _interrupted_trial(tmp_path: Path):
    """A study whose trial 1 was stopped by SIGTERM after its first epoch: FAIL, queued
    again, its checkpoint kept."""
    import os
    import signal

    spec = load_spec(str(tiny_spec(tmp_path, "ce", epochs=2, pruner='type = "none"')))
    sent: list[bool] = []

    def on_epoch(trial: int, epoch: int, metrics: dict) -> None:
        if trial == 1 and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)

    result = run_study(spec, RunOptions(n_trials=3, device="cpu"), on_epoch)
    assert [t.state for t in result.study.get_trials()] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    return spec, result.study


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_a_damaged_trial_checkpoint_is_discarded_and_the_retry_trains_from_epoch_0(
    tmp_path: Path, dlops_home: Path, damage: str
) -> None:
    from dlops.objective import checkpoint_path

    spec, study = _interrupted_trial(tmp_path)
    ckpt = checkpoint_path(study.study_name, 1)
    data = ckpt.read_bytes()
    if damage == "truncate":  # truncate -s 5000
        ckpt.write_bytes(data[:5000])
    else:  # garbled in place: same size, one byte of the weights changed
        garbled = bytearray(data)
        garbled[len(data) // 2] ^= 0x01
        ckpt.write_bytes(bytes(garbled))
    said: list[str] = []
    again = run_study(spec, RunOptions(n_trials=2, device="cpu"), say=said.append)
    retry = again.study.get_trials()[2]
    assert retry.state == TrialState.COMPLETE and retry.system_attrs.get("failed_trial") == 1
    assert retry.user_attrs.get("resumed_from") is None  # trained from epoch 0
    check_history(retry, 2)
    assert any(str(ckpt) in m and "discarded, the trial trains from epoch 0" in m for m in said), said
    assert not list((dlops_home / "checkpoints").rglob("*.pt*"))


def test_a_full_disk_fails_the_trial_with_one_line(
    tmp_path: Path, dlops_home: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import errno

    import torch

    def full_disk(obj, f, *args, **kwargs):  # torch.save on a full disk: part of the file, then ENOSPC
        if isinstance(f, (str, Path)):
            Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
        else:
            f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    spec = load_spec(str(tiny_spec(tmp_path, "ce", epochs=1, pruner='type = "none"')))
    with pytest.raises(TrialsFailed, match=r"The last one: no space left on device while writing .*trial-1.pt$"):
        run_study(spec, RunOptions(n_trials=1, device="cpu"))  # the baseline fails, is queued again, fails: giving up
    trials = optuna.load_study(study_name=spec.name, storage=default_storage_url()).get_trials()
    assert len(trials) == 2 and all(t.state == TrialState.FAIL for t in trials)
    reason = trials[0].user_attrs["stopped_reason"]
    assert reason.startswith("failed: no space left on device while writing ") and reason.endswith("trial-0.pt"), reason
    assert "failed with" not in caplog.text  # Optuna's warnings: dlops's trial line says it
    assert "Traceback" not in caplog.text and "unexpected pos" not in caplog.text
    assert not list((dlops_home / "checkpoints").rglob("*.tmp"))


# --- a run checks everything before it writes, and a failure is never exit 0 ------------------


@pytest.mark.parametrize(
    "device, message",
    [
        ("cuda", "no CUDA device is available"),
        ("cuda:3", "no CUDA device is available"),
        ("tpu", "unknown device 'tpu'"),
        ("cuda:x", "unknown device 'cuda:x'"),
    ],
)
def test_an_unusable_device_is_one_line_and_writes_nothing(
    device: str, message: str, tmp_path: Path, dlops_home: Path
) -> None:
    spec = tiny_spec(tmp_path, "ce", epochs=1)
    for extra in ([], ["--workers", "2", "--storage", f"journal://{dlops_home / 'dlops.log'}"]):
        result = CliRunner().invoke(app, ["study", "run", str(spec), "--n-trials", "2", "--device", device, *extra])
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0], result.output
        assert not dlops_home.exists(), sorted(dlops_home.rglob("*"))  # no database, no study, no trial, no file


def test_resolve_device_checks_the_visible_cuda_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from dlops.trainers.base import resolve_device

    assert resolve_device("cpu").type == "cpu" and resolve_device("auto").type in ("cpu", "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(DlopsError, match=r"--device cuda:2: only 2 CUDA device\(s\) visible"):
        resolve_device("cuda:2")
    for bad in ("", "mps", "xla", "cuda:-1"):
        with pytest.raises(DlopsError, match="unknown device"):
            resolve_device(bad)


def failing_fit(monkeypatch: pytest.MonkeyPatch, fail_calls: set[int] | None = None) -> list[int]:
    """The ResNet trainer, with the calls numbered in ``fail_calls`` (all when None) failing
    as a full disk does. Returns the list of call numbers made."""
    import errno

    import dlops.trainers.resnet

    real_fit, calls = dlops.trainers.resnet.fit, []

    def fit(config, *args, **kwargs):
        calls.append(len(calls))
        if fail_calls is None or calls[-1] in fail_calls:
            raise OSError(errno.ENOSPC, "No space left on device", "checkpoint.pt")
        return real_fit(config, *args, **kwargs)

    monkeypatch.setattr(dlops.trainers.resnet, "fit", fit)
    return calls


def test_giving_up_after_failed_trials_exits_nonzero_with_the_last_reason(
    tmp_path: Path, dlops_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failing_fit(monkeypatch)
    result = CliRunner().invoke(
        app, ["study", "run", str(tiny_spec(tmp_path, "ce", epochs=1)), "--n-trials", "3", "--device", "cpu"]
    )
    assert result.exit_code == 2, result.output
    last = [line for line in result.output.splitlines() if line.strip()][-1]
    assert "3 trials failed in this run; giving up" in last and "No space left on device" in last, result.output
    assert "Traceback" not in result.output


def test_the_baseline_is_queued_again_until_one_finishes(
    tmp_path: Path, dlops_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failing_fit(monkeypatch, fail_calls={0})  # trial 0, the baseline, fails (a full disk)
    spec = load_spec(str(tiny_spec(tmp_path, "ce", epochs=1)))
    messages: list[str] = []
    study = run_study(spec, RunOptions(n_trials=2, device="cpu"), say=messages.append).study
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs["baseline"] is True
    baselines = [
        t for t in trials if t.user_attrs.get("baseline") and t.state in (TrialState.COMPLETE, TrialState.PRUNED)
    ]
    assert len(baselines) == 1 and baselines[0].number == 1 and baselines[0].params == spec.baseline_params()
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 2
    assert any("baseline is queued again" in m for m in messages)
    run_study(spec, RunOptions(n_trials=1, device="cpu"))  # once one finished, it is not queued again
    assert sum(bool(t.user_attrs.get("baseline")) for t in study.get_trials()) == 2


def test_the_baseline_trains_a_searched_setting_as_the_runs_dataset_sets_it(tmp_path: Path, dlops_home: Path) -> None:
    """A spec searching width without a [baseline] width: on digits, trial 0 trains the
    width of [datasets.digits] (it trained the spec's own dataset's, 8, and width 6 never
    ran), and the study note's search table says so."""
    from dlops.dashboard import read_note
    from specs import write_spec

    table = {
        "name": "wid",
        "trainer": "resnet18",
        "train": {"loss": "ce", "dataset": "tiny-imagenet", "epochs": 1, "width": 8, "batch_size": 40},
        "datasets": {"digits": {"width": 6, "eval_batch_size": 64}},
        "search": {"width": {"type": "int", "low": 4, "high": 8}},
        "pruner": {"type": "none"},
    }
    path = write_spec(tmp_path / "wid.toml", table)
    args = ["study", "run", str(path), "--dataset", "digits", "--subset-per-class", "10", "--n-trials", "1"]
    result = CliRunner().invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="wid-digits", storage=default_storage_url())
    trial = study.get_trials()[0]
    assert trial.user_attrs["baseline"] is True
    assert trial.params == {"width": 6} and trial.user_attrs["config"]["width"] == 6
    assert "| width | int | 4 – 8 | 6 |" in read_note(study)


# --- a continued study samples new points; a fresh one reproduces ------------------------------


def test_a_continued_study_samples_new_points_and_a_fresh_rerun_reproduces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = load_spec(str(tiny_spec(tmp_path, "ce", epochs=1, per_class=5, pruner='type = "none"')))
    monkeypatch.setenv("DLOPS_HOME", str(tmp_path / "a"))
    first = [t.params["lr"] for t in run_study(spec, RunOptions(n_trials=3, device="cpu", seed=3)).study.get_trials()]
    study = run_study(spec, RunOptions(n_trials=2, device="cpu", seed=3)).study
    more = [t.params["lr"] for t in study.get_trials()][3:]
    assert len(first) == 3 and len(more) == 2
    assert not set(more) & set(first), (first, more)  # new points, not a replay of trials 1 and 2
    monkeypatch.setenv("DLOPS_HOME", str(tmp_path / "b"))
    again = [t.params["lr"] for t in run_study(spec, RunOptions(n_trials=3, device="cpu", seed=3)).study.get_trials()]
    assert again == first  # a rerun from scratch with the same seed is the same study


# --- --n-trials per run, --total-trials for the study ------------------------------------------


def _another_machine_finishes_a_trial(study_name: str, dlops_home: Path):
    """An on_epoch hook: during this run's first trial, a trial of another run completes."""
    done: list[bool] = []

    def on_epoch(trial: int, epoch: int, metrics: dict) -> None:
        if not done:
            done.append(True)
            other = optuna.load_study(study_name=study_name, storage=f"sqlite:///{dlops_home / 'dlops.db'}")
            other.add_trial(
                optuna.trial.create_trial(
                    params={"lr": 0.05},
                    distributions={"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)},
                    value=0.5,
                    system_attrs={OWNER_KEY: {"host": "another-machine", "pid": 1, "run": "another-run"}},
                )
            )

    return on_epoch


def test_n_trials_counts_this_runs_trials_and_total_trials_the_study(tmp_path: Path, dlops_home: Path) -> None:
    spec = load_spec(str(tiny_spec(tmp_path, "ce", epochs=1, per_class=5, pruner='type = "none"')))
    messages: list[str] = []
    result = run_study(
        spec,
        RunOptions(n_trials=2, device="cpu"),
        _another_machine_finishes_a_trial("tiny-ce", dlops_home),
        say=messages.append,
    )
    assert result.added == 2 and result.finished == 3  # its own 2, whatever another machine adds
    assert "this run adds 2 finished trials of its own" in messages[0]

    messages.clear()
    result = run_study(
        spec,
        RunOptions(total_trials=6, device="cpu"),
        _another_machine_finishes_a_trial("tiny-ce", dlops_home),
        say=messages.append,
    )
    assert result.finished == 6 and result.added == 2  # 3 there, 1 from elsewhere, 2 from this run
    assert "until the study has 6 finished trials in all (3 now" in messages[0]
    with pytest.raises(DlopsError, match="not both"):
        run_study(spec, RunOptions(n_trials=1, total_trials=9, device="cpu"))


def test_cli_total_trials_is_one_target_for_every_run(tmp_path: Path, dlops_home: Path) -> None:
    spec = str(tiny_spec(tmp_path, "ce", epochs=1, per_class=5))
    result = CliRunner().invoke(app, ["study", "run", spec, "--total-trials", "2", "--device", "cpu"])
    assert result.exit_code == 0 and "until the study has 2 finished trials in all" in result.output, result.output
    result = CliRunner().invoke(app, ["study", "run", spec, "--total-trials", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (
        "2 complete, 0 pruned, 0 failed, 0 running, 0 waiting; it already has 2 finished trials, at least the 1 "
        "asked (--total-trials counts every run's): this run starts no trial"
    ) in " ".join(result.output.split())
    study = optuna.load_study(study_name="tiny-ce", storage=f"sqlite:///{dlops_home / 'dlops.db'}")
    assert len(study.get_trials()) == 2  # nothing to add: the study already has 2
    # With workers, none is started for nothing (each would load torch and leave at once).
    journal = str(tmp_path / "j.log")
    assert CliRunner().invoke(app, ["study", "run", spec, "--n-trials", "1", "--storage", journal]).exit_code == 0
    args = ["study", "run", spec, "--total-trials", "1", "--workers", "3", "--storage", journal]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "this run starts no trial" in result.output and "3 workers" not in result.output, result.output
    help_text = " ".join(CliRunner().invoke(app, ["study", "run", "--help"]).output.replace("│", " ").split())
    assert "--total-trials" in help_text and "other runs' trials do not count" in help_text


# --- default study names: the spec's own dataset, or NAME-DATASET -------------------------------


def test_default_study_names_carry_a_dataset_other_than_the_specs_own() -> None:
    ce, ae = load_spec("resnet18-ce"), load_spec("autoencoder")
    assert ce.study_name() == ce.study_name("tiny-imagenet") == "resnet18-ce"
    assert ce.study_name("digits") == "resnet18-ce-digits" and ae.study_name("digits") == "autoencoder-digits"
    assert RunOptions(dataset="digits").study_name_for(ce) == "resnet18-ce-digits"
    assert RunOptions(dataset="digits", study_name="mine").study_name_for(ce) == "mine"
    for command in (["study", "run"], ["final"]):
        help_text = " ".join(CliRunner().invoke(app, [*command, "--help"]).output.replace("│", " ").split())
        help_text = re.sub(r"(\w)- (\w)", r"\1-\2", help_text)  # help wraps at hyphens
        assert "SPEC-DATASET with a --dataset other than the spec's own" in help_text, help_text


def test_a_quickstart_on_digits_and_the_specs_own_study_never_collide(
    tmp_path: Path, dlops_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's path: a digits study of a spec, then the spec on its own dataset (here a
    registered copy of digits standing in for Tiny ImageNet), then `final --dataset digits`
    and `report`, which find the digits study by its derived name."""
    from dlops.data import DATASETS, get_dataset
    from dlops.final import FinalOptions, run_final

    get_dataset("digits")  # built-in datasets registered first
    monkeypatch.setitem(DATASETS, "own-data", DATASETS["digits"])
    spec = tiny_spec(
        tmp_path, "ce", epochs=1, per_class=5, overrides={"train": {"dataset": "own-data"}, "final": {"epochs": 1}}
    )
    runner = CliRunner()
    digits = runner.invoke(
        app, ["study", "run", str(spec), "--dataset", "digits", "--n-trials", "1", "--device", "cpu"]
    )
    assert digits.exit_code == 0 and "study tiny-ce-digits" in digits.output, digits.output
    own = runner.invoke(app, ["study", "run", str(spec), "--n-trials", "1", "--device", "cpu"])
    assert own.exit_code == 0, own.output  # before: "study 'tiny-ce' ran on digits, not own-data"
    url = f"sqlite:///{dlops_home / 'dlops.db'}"
    assert sorted(optuna.get_all_study_names(url)) == ["tiny-ce", "tiny-ce-digits"]
    assert optuna.load_study(study_name="tiny-ce-digits", storage=url).user_attrs["dataset"] == "digits"

    final = run_final(str(spec), FinalOptions(dataset="digits", device="cpu")).final
    assert final["study"]["name"] == "tiny-ce-digits" and final["params_source"]["kind"] == "trial"
    report = runner.invoke(app, ["report"])
    assert report.exit_code == 0, report.output
    index = (dlops_home / "reports" / "index.md").read_text()
    assert "tiny-ce-digits/report.md" not in index  # the digits study is the spec's, not an entry of its own
    assert "tiny-ce-digits" in (dlops_home / "reports" / "tiny-ce" / "report.md").read_text()


def test_top5_on_five_classes_or_fewer_becomes_top1_and_says_so(tmp_path: Path, dlops_home: Path) -> None:
    spec = str(tiny_spec(tmp_path, "ce", epochs=1, per_class=5))  # objective: val_top5
    result = CliRunner().invoke(
        app, ["study", "run", spec, "--subset-classes", "5", "--n-trials", "1", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    assert "val_top5 is always 1.0 with 5 classes or fewer: this study optimises val_top1 instead" in result.output
    study = optuna.load_study(study_name="tiny-ce", storage=f"sqlite:///{dlops_home / 'dlops.db'}")
    assert study.metric_names == ["val_top1"]
    trial = study.get_trials()[0]
    assert trial.value == trial.user_attrs["history"]["val_top1"][-1] < 1.0
    assert trial.user_attrs["history"]["val_top5"][-1] == 1.0  # what the study would have optimised

    too_many = CliRunner().invoke(
        app, ["study", "run", spec, "--subset-classes", "11", "--study-name", "x", "--device", "cpu"]
    )
    assert too_many.exit_code == 2 and "--subset-classes 11: digits has 10 classes" in too_many.output
    assert optuna.get_all_study_names(f"sqlite:///{dlops_home / 'dlops.db'}") == ["tiny-ce"]


def test_a_multi_objective_study_of_another_tool_is_listed_and_refused_in_one_line(dlops_home: Path) -> None:
    dlops_home.mkdir(parents=True)
    url = default_storage_url()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    mo = optuna.create_study(study_name="mo", directions=["minimize", "maximize"], storage=url)
    mo.optimize(lambda t: (t.suggest_float("x", 0, 1), 1.0), n_trials=2)
    optuna.create_study(study_name="single", direction="maximize", storage=url).optimize(
        lambda t: t.suggest_float("x", 0, 1), n_trials=1
    )
    runner = CliRunner()
    listed = runner.invoke(app, ["study", "list"])
    assert listed.exit_code == 0, listed.output
    assert "single" in listed.output and "mo: 2 objectives (minimize, maximize), not a dlops study" in listed.output
    for command in (["study", "show", "mo"], ["study", "show", "mo", "--json"], ["study", "replay", "mo"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, (command, result.output)
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
        assert "'mo' has 2 objectives" in result.output and "not a dlops study" in result.output


# --- the data a study is measured on ------------------------------------------------------------


def test_a_study_refuses_a_cache_rebuilt_with_another_validation_hold_out(tmp_path: Path, dlops_home: Path) -> None:
    """A study on a Tiny ImageNet cache records the data it is measured on; after `dlops data
    prepare --force --val-fraction 0.2 --seed 3` the same run is refused in one line that
    says what changed and how to go on, and the study stays as it was; with the cache
    rebuilt as it was, the run joins again."""
    from data_trees import one_error_line, write_tiny_imagenet, zip_tree
    from dlops.data.manage import fetch_dataset
    from dlops.runner import RUNS_KEY, check_run, joinable_counts
    from dlops.storage import connect

    DATA_KEY = "data"  # the study's user attr

    mini = zip_tree(write_tiny_imagenet(tmp_path / "src"), tmp_path / "mini.zip")  # 3 classes, 10 train images each
    md5 = fetch_dataset("tiny-imagenet", source=str(mini), workers=1, progress=False)["source"]["md5"]
    spec = tiny_spec(tmp_path, "ce", epochs=1, per_class=5, overrides={"train": {"dataset": "tiny-imagenet"}})
    run = ["study", "run", str(spec), "--n-trials", "1", "--device", "cpu"]
    runner = CliRunner()
    first = runner.invoke(app, run)
    assert first.exit_code == 0, first.output
    url = f"sqlite:///{dlops_home / 'dlops.db'}"
    study = optuna.load_study(study_name="tiny-ce", storage=url)
    assert study.user_attrs[DATA_KEY] == {
        "dataset": "tiny-imagenet",
        "classes": 3,
        "class_ids_sha256": study.user_attrs[DATA_KEY]["class_ids_sha256"],
        "splits": {"train": 27, "val": 3},
        "holdout_fraction": 0.1,
        "holdout_seed": 0,
        "source_md5": md5,
    }

    def stored() -> tuple:
        s = optuna.load_study(study_name="tiny-ce", storage=url)
        runs = s._storage.get_study_system_attrs(s._study_id)[RUNS_KEY]
        return [(t.number, t.state, t.value) for t in s.get_trials()], s.user_attrs, runs

    before = stored()
    rebuilt = runner.invoke(
        app, ["data", "prepare", "tiny-imagenet", "--force", "--val-fraction", "0.2", "--seed", "3"]
    )
    assert rebuilt.exit_code == 0, rebuilt.output
    line = one_error_line(runner.invoke(app, run))
    assert "study 'tiny-ce' was measured on other tiny-imagenet data" in line, line
    assert "validation hold-out: --val-fraction 0.1 --seed 0 then, --val-fraction 0.2 --seed 3 now" in line, line
    assert "split sizes: train 27, val 3 then, train 24, val 6 now" in line, line
    assert (
        "another --study-name" in line
        and "dlops data prepare tiny-imagenet --force --val-fraction 0.1 --seed 0" in line
    )
    # a run of many workers is refused before it joins too
    options = RunOptions(n_trials=1, device="cpu")
    with pytest.raises(DlopsError, match="measured on other tiny-imagenet data"):
        joinable_counts(connect(url), "tiny-ce", check_run(load_spec(str(spec)), options), options)
    assert stored() == before
    # a reference run of the study's best trial on the rebuilt cache says so, and trains
    final = runner.invoke(app, ["final", str(spec), "--device", "cpu", "--epochs", "1"])
    assert final.exit_code == 0, final.output
    note = " ".join(final.output.split())
    assert "note: study 'tiny-ce' chose trial 0 on other data (validation hold-out: --val-fraction 0.1" in note, note
    assert "this run trains on the data as it is now" in note

    # another archive (4 classes) under the same name: the classes and the archive changed,
    # and the hold-out of the cache it replaced is kept (0.2, seed 3)
    other = zip_tree(write_tiny_imagenet(tmp_path / "other", classes=4), tmp_path / "other.zip")
    fetch_dataset("tiny-imagenet", source=str(other), force=True, workers=1, progress=False)
    line = one_error_line(runner.invoke(app, run))
    assert "classes: 3 (list " in line and "then, 4 (list " in line and f"source archive: md5 {md5} then" in line, line
    assert "use the data it was measured on (its archive, with --val-fraction 0.1 --seed 0)" in line, line
    assert "dlops data prepare" not in line, line  # rebuilding the other archive's tree would not help
    assert stored() == before
    fetch_dataset("tiny-imagenet", source=str(other), force=True, val_fraction=0.1, seed=0, workers=1, progress=False)
    line = one_error_line(runner.invoke(app, run))
    assert "validation hold-out" not in line and line.endswith("use the data it was measured on"), line

    # the study's data again
    fetch_dataset("tiny-imagenet", source=str(mini), force=True, workers=1, progress=False)
    again = runner.invoke(app, run)
    assert again.exit_code == 0, again.output
    assert len(optuna.load_study(study_name="tiny-ce", storage=url).get_trials()) == len(before[0]) + 1


def test_a_digits_study_records_its_data_and_one_from_before_the_record_keeps_working(
    tmp_path: Path, dlops_home: Path
) -> None:
    DATA_KEY = "data"  # the study's user attr
    spec = load_spec(str(tiny_spec(tmp_path, "ce", epochs=1, per_class=5, digits_metric=True)))
    study = run_study(spec, RunOptions(n_trials=1, device="cpu")).study
    data = study.user_attrs[DATA_KEY]
    assert data["classes"] == 10 and data["splits"] == {"train": 1295, "val": 143}  # all of digits, not the subset
    study.set_user_attr(DATA_KEY, None)  # as a study made before dlops recorded its data
    study = run_study(spec, RunOptions(n_trials=1, device="cpu")).study
    assert len(study.get_trials()) == 2 and study.user_attrs[DATA_KEY] == data  # joined, and recorded now


# --- options refused in one line before anything is written -------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--seed", "-5"], "Invalid value for '--seed'"),
        (["--seed", "99999999999"], "Invalid value for '--seed'"),
        (["--subset-classes", "1"], "--subset-classes 1: a run needs at least 2 classes"),
        (["--heartbeat-interval", "5"], "--heartbeat-interval: sqlite:///"),
        (["--heartbeat-interval", "5", "--grace-period", "2"], "--heartbeat-interval and --grace-period: sqlite:///"),
        (["--grace-period", "2", "--storage", "journal:///{home}/x.log"], "--grace-period: journal:///"),
        (
            ["--heartbeat-interval", "5", "--grace-period", "2", "--storage", "postgresql://u@127.0.0.1:1/x"],
            "--grace-period 2 is shorter than the heartbeat interval (5 s)",
        ),
        (["--grace-period", "30", "--storage", "postgresql://u@127.0.0.1:1/x"], "heartbeat interval (60 s)"),
    ],
)
def test_bad_run_options_are_one_line_and_write_nothing(
    extra: list[str], message: str, tmp_path: Path, dlops_home: Path
) -> None:
    from data_trees import one_error_line

    spec = tiny_spec(tmp_path, "triplet", epochs=1, per_class=5)
    extra = [e.replace("{home}", str(dlops_home)) for e in extra]
    line = one_error_line(
        CliRunner().invoke(app, ["study", "run", str(spec), "--n-trials", "1", "--device", "cpu", *extra])
    )
    assert message in line, line
    assert not dlops_home.exists(), sorted(dlops_home.rglob("*"))


def test_the_top_sampler_seed_runs_and_wraps_for_a_second_worker(tmp_path: Path, dlops_home: Path) -> None:
    from dlops.sampling import sampler_seed

    assert sampler_seed(2**32 - 1, 0, 0) == 2**32 - 1 and sampler_seed(2**32 - 1, 1, 0) == 0
    spec = load_spec(str(tiny_spec(tmp_path, "ce", epochs=1, per_class=5)))
    study = run_study(spec, RunOptions(n_trials=1, device="cpu", seed=2**32 - 1), worker=1).study
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE]


def test_a_final_run_on_one_class_is_one_line_and_writes_nothing(dlops_home: Path) -> None:
    from data_trees import one_error_line

    args = ["final", "--loss", "triplet", "--dataset", "digits", "--params", "baseline", "--device", "cpu"]
    line = one_error_line(CliRunner().invoke(app, [*args, "--subset-classes", "1", "--epochs", "1"]))
    assert "--subset-classes 1: a run needs at least 2 classes" in line, line
    assert not dlops_home.exists(), sorted(dlops_home.rglob("*"))


def test_a_baseline_edited_after_the_study_began_is_named_not_silently_dropped(
    tmp_path: Path, dlops_home: Path
) -> None:
    """A study trains its baseline once: a spec whose [baseline] changed since says which
    trial stays the baseline and that the new one is not trained."""
    import tomllib

    from specs import tiny_workers_spec, write_spec

    path = tiny_workers_spec(tmp_path, name="edited-baseline", per_class=5)
    run = ["study", "run", str(path), "--n-trials", "1", "--device", "cpu"]
    first = CliRunner().invoke(app, run)
    assert first.exit_code == 0, first.output
    assert "note: the baseline" not in first.output
    again = CliRunner().invoke(app, run)  # the same spec: nothing to say
    assert again.exit_code == 0 and "note: the baseline" not in again.output, again.output
    table = tomllib.loads(path.read_text())
    table["baseline"]["lr"] = 0.05
    write_spec(path, table)
    edited = CliRunner().invoke(app, run)
    assert edited.exit_code == 0, edited.output
    line = " ".join(edited.output.split())
    assert (
        "note: the baseline of study 'edited-baseline' is trial 0 (lr 0.01); the spec's baseline is lr 0.05 now, "
        "which a study that has one does not train (give this run another --study-name to train it)"
    ) in line, line
    study = optuna.load_study(study_name="edited-baseline", storage=default_storage_url())
    assert [t.params["lr"] for t in study.trials if t.user_attrs.get("baseline")] == [0.01]
    assert len(study.trials) == 3


def test_the_data_can_live_under_dlops_data_for_every_command(
    tmp_path: Path, dlops_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$DLOPS_DATA (a big disk, one copy for many homes) is where fetch puts the data and
    where info, a study run and a reference run find it; nothing goes to $DLOPS_HOME/data."""
    from data_trees import write_tiny_imagenet, zip_tree

    mini = zip_tree(write_tiny_imagenet(tmp_path / "src"), tmp_path / "mini.zip")
    shared = tmp_path / "big-disk" / "datasets"
    monkeypatch.setenv("DLOPS_DATA", str(shared))
    runner = CliRunner()
    fetched = runner.invoke(app, ["data", "fetch", "tiny-imagenet", "--source", str(mini), "--workers", "1"])
    assert fetched.exit_code == 0, fetched.output
    assert (shared / "tiny-imagenet" / "cache" / "manifest.json").is_file()
    info = runner.invoke(app, ["data", "info", "tiny-imagenet", "--json"])
    assert info.exit_code == 0 and json.loads(info.output)["cache_dir"] == str(shared / "tiny-imagenet" / "cache")
    spec = tiny_spec(tmp_path, "ce", epochs=1, per_class=5, overrides={"train": {"dataset": "tiny-imagenet"}})
    run = runner.invoke(app, ["study", "run", str(spec), "--n-trials", "1", "--device", "cpu"])
    assert run.exit_code == 0, run.output
    final = runner.invoke(app, ["final", str(spec), "--device", "cpu", "--epochs", "1"])
    assert final.exit_code == 0, final.output
    assert not (dlops_home / "data").exists()
    monkeypatch.delenv("DLOPS_DATA")  # without it, the data is not where $DLOPS_HOME keeps it
    missing = runner.invoke(app, ["study", "run", str(spec), "--n-trials", "1", "--device", "cpu"])
    assert missing.exit_code == 2 and "dlops data fetch tiny-imagenet" in missing.output, missing.output


# --- what study show and study list say a study trains on ---------------------------------------


def _table_rows(output: str) -> list[list[str]]:
    """The cells of each row of the tables in ``output`` (rich's box lines, one row a line)."""
    return [[c.strip() for c in line.strip("│ ").split("│")] for line in output.splitlines() if line.startswith("│")]


def test_study_show_and_list_say_the_data_its_subset_and_the_epochs_per_trial(
    tmp_path: Path, dlops_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two dlops studies of one spec, all of digits and 6 classes x 20 images, tell apart in
    `study show` and `study list` (text and JSON), with the chance level that reads the best
    value; a study of plain Optuna, and of an older dlops that recorded a dataset but no
    settings, or no study record but its trials' configs, say what they do not record."""
    from dlops.spec import REMOVE

    monkeypatch.setenv("COLUMNS", "200")  # one table row a line
    spec = tiny_spec(tmp_path, "ce", epochs=1, overrides={"train": {"subset_per_class": REMOVE}})
    runner = CliRunner()
    full = runner.invoke(app, ["study", "run", str(spec), "--n-trials", "1", "--device", "cpu"])
    assert full.exit_code == 0, full.output
    all_digits = ["data", "digits (10 classes); chance: top-1 0.10, top-5 0.50"]
    assert all_digits in _table_rows(full.output)  # the summary a run ends with says it too
    few = runner.invoke(
        app,
        [
            *("study", "run", str(spec), "--study-name", "few", "--subset-classes", "6", "--subset-per-class", "20"),
            *("--epochs", "2", "--n-trials", "1", "--device", "cpu"),
        ],
    )
    assert few.exit_code == 0, few.output
    url = default_storage_url()
    optuna.create_study(study_name="plain", storage=url, direction="maximize").optimize(
        lambda t: t.suggest_float("x", 0, 1), n_trials=1
    )
    optuna.create_study(study_name="older", storage=url, direction="maximize").set_user_attr("dataset", "digits")

    shown = runner.invoke(app, ["study", "show", "tiny-ce"])
    assert shown.exit_code == 0, shown.output
    assert all_digits in _table_rows(shown.output) and ["epochs per trial", "1"] in _table_rows(shown.output)
    few_rows = [
        [
            "data",
            "digits, subset: the first 6 classes, 20 training images each (6 classes); chance: top-1 0.17, top-5 0.83",
        ],
        ["epochs per trial", "2"],
    ]
    shown = runner.invoke(app, ["study", "show", "few"])
    assert shown.exit_code == 0 and _table_rows(shown.output)[:2] == few_rows, shown.output
    few_json = {"dataset": "digits", "classes": 6, "subset_classes": 6, "subset_per_class": 20, "epochs_per_trial": 2}
    assert json.loads(runner.invoke(app, ["study", "show", "few", "--json"]).output)["trains_on"] == few_json
    plain = runner.invoke(app, ["study", "show", "plain"])
    assert plain.exit_code == 0 and "Traceback" not in plain.output, plain.output
    assert _table_rows(plain.output)[0] == ["data", "not recorded (a study of plain Optuna or of an older dlops)"]
    assert json.loads(runner.invoke(app, ["study", "show", "plain", "--json"]).output)["trains_on"] is None
    older = runner.invoke(app, ["study", "show", "older"])
    assert older.exit_code == 0, older.output
    assert _table_rows(older.output)[:2] == [
        ["data", "digits (subset not recorded)"],
        ["epochs per trial", "not recorded"],
    ]

    listed = runner.invoke(app, ["study", "list"])
    assert listed.exit_code == 0, listed.output
    rows = _table_rows(listed.output)
    assert [r[:3] for r in rows] == [
        ["tiny-ce", "digits", "1"],
        ["few", "digits, 6 classes x 20", "2"],
        ["plain", "?", "?"],
        ["older", "digits, subset ?", "?"],
    ]
    assert rows[0][3:7] == rows[1][3:7] == ["1", "1", "0", "0"]  # trials, complete, pruned, fail: in place
    assert "?: not recorded (a study of plain Optuna or of an older dlops)" in listed.output.splitlines()
    listing = json.loads(runner.invoke(app, ["study", "list", "--json"]).output)["studies"]
    no_subset = {"subset_classes": None, "subset_per_class": None}
    assert [r["trains_on"] for r in listing] == [
        {"dataset": "digits", "classes": 10, **no_subset, "epochs_per_trial": 1},
        few_json,
        None,
        {"dataset": "digits", "classes": None, **no_subset, "epochs_per_trial": None},  # only its dataset recorded
    ]

    # a study from before dlops recorded its settings reads them from its latest trial's config
    optuna.load_study(study_name="few", storage=url).set_user_attr("settings", None)
    assert json.loads(runner.invoke(app, ["study", "show", "few", "--json"]).output)["trains_on"] == few_json
    listed = runner.invoke(app, ["study", "list"])
    assert _table_rows(listed.output)[1][:3] == ["few", "digits, 6 classes x 20", "2"]
