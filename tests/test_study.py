"""Studies end to end on digits, with a narrow ResNet18 so that each trial takes a second."""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from dlops.cli import app
from dlops.errors import DlopsError
from dlops.search import RunOptions, run_study
from dlops.spec import load_spec
from dlops.train import HISTORY_KEYS


def tiny_spec(tmp_path: Path, loss: str, *, extra_train: str = "", lr_range=(1e-4, 1e-1), baseline_lr=1e-3,
              pruner: str = 'type = "median"\nn_startup_trials = 3\nn_warmup_steps = 1', epochs: int = 2,
              per_class: int = 20, digits_metric: bool = False) -> Path:
    """The built-in spec of ``loss``, made cheap: width 8, 20 images per class."""
    src = load_spec(f"resnet18-{loss}").path.read_text()
    text = src.replace('dataset = "tiny-imagenet"', f'dataset = "digits"\nwidth = 8\nsubset_per_class = {per_class}\neval_batch_size = 64\n{extra_train}')
    text = text.replace("[datasets.digits]            # the embedded 8x8 dataset: a few epochs suffice\nepochs = 5",
                        f"[datasets.digits]\nepochs = {epochs}")
    if not digits_metric:  # keep the spec's own objective (top-5) on digits too
        text = "\n".join(line for line in text.splitlines() if not line.startswith('metric = "val_top1"')) + "\n"
    text = text.replace(f'name = "resnet18-{loss}"', f'name = "tiny-{loss}"')
    text = text.replace("low = 1e-4\nhigh = 1e-1", f"low = {lr_range[0]}\nhigh = {lr_range[1]}", 1)
    text = text.replace("[baseline]\nlr = 1e-3", f"[baseline]\nlr = {baseline_lr}")
    text = text.replace("batch_size = 128", "batch_size = 32")
    head, _, _ = text.partition("[pruner]")
    text = head + f"[pruner]\n{pruner}\n\n[sampler]\ntype = \"tpe\"\nseed = 0\n"
    path = tmp_path / f"tiny-{loss}.toml"
    path.write_text(text)
    return path


def check_history(trial: optuna.trial.FrozenTrial, epochs: int) -> None:
    history = trial.user_attrs["history"]
    assert set(HISTORY_KEYS) <= set(history)
    assert {len(v) for v in history.values()} == {epochs}
    assert sorted(trial.intermediate_values) == list(range(epochs))
    assert [trial.intermediate_values[e] for e in range(epochs)] == history["val_top5"]


@pytest.mark.parametrize("loss", ["ce", "triplet", "center"])
def test_study_of_each_loss_runs_with_baseline_first(loss: str, tmp_path: Path, dlops_home: Path) -> None:
    spec = load_spec(str(tiny_spec(tmp_path, loss)))
    result = run_study(spec, RunOptions(n_trials=2, device="cpu"))
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
    assert info["trials"][0]["params"] == {"lr": 1e-3, "triplet_soft": False, "margin": 0.2} and info["trials"][0]["baseline"]
    for t in info["trials"]:
        assert ("margin" in t["params"]) == (t["params"]["triplet_soft"] is False)
    assert math.isclose(info["best"]["value"], max(t["value"] for t in info["trials"] if t["value"] is not None))

    listed = runner.invoke(app, ["study", "list"])
    assert listed.exit_code == 0 and "tiny-triplet" in listed.output

    # running again adds trials to the same study
    again = runner.invoke(app, ["study", "run", str(spec), "--n-trials", "1", "--device", "cpu", "--seed", "5"])
    assert again.exit_code == 0, again.output
    info = json.loads(runner.invoke(app, ["study", "show", "tiny-triplet", "--json"]).output)
    assert info["n_trials"] == 3

    missing = runner.invoke(app, ["study", "show", "nope"])
    assert missing.exit_code != 0 and "no study named 'nope'" in missing.output


def test_a_hopeless_trial_is_pruned(tmp_path: Path, dlops_home: Path) -> None:
    spec = load_spec(str(tiny_spec(tmp_path, "ce", lr_range=(1e-7, 1.0), baseline_lr=0.02, epochs=3, per_class=50,
                                   pruner='type = "median"\nn_startup_trials = 1\nn_warmup_steps = 0')))
    run_study(spec, RunOptions(n_trials=1, device="cpu"))
    study = optuna.load_study(study_name="tiny-ce", storage=f"sqlite:///{dlops_home / 'dlops.db'}")
    study.enqueue_trial({"lr": 1e-7})  # learns nothing in 3 epochs
    run_study(spec, RunOptions(n_trials=1, device="cpu"))
    hopeless = study.get_trials()[1]
    assert hopeless.params["lr"] == 1e-7
    assert hopeless.state == TrialState.PRUNED
    assert len(hopeless.intermediate_values) < 3
    assert study.get_trials()[0].value > 0.9  # while the baseline learned
    assert "pruned after epoch" in hopeless.user_attrs["stopped_reason"]


def test_a_diverging_trial_is_pruned_with_its_reason_and_the_study_goes_on(tmp_path: Path, dlops_home: Path) -> None:
    spec = load_spec(str(tiny_spec(tmp_path, "center", lr_range=(1e-4, 1e9), baseline_lr=1e9, epochs=1,
                                   pruner='type = "none"')))
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
