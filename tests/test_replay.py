"""Replaying pruners on recorded learning curves (dlops.replay, `dlops study replay`)."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from dlops.cli import app
from dlops.replay import (
    DEFAULT_CANDIDATES,
    Curves,
    ReplayError,
    TrialCurve,
    choose,
    curves_from_study,
    parse_pruner,
    read_curves,
    replay,
    write_curves,
)

ROOT = Path(__file__).resolve().parents[1]
RECORDED = ROOT / "benchmarks" / "results" / "pruning"
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

# Four trials of three epochs, maximised. Trial 2 starts worst and ends best.
KNOWN = {0: [0.5, 0.6, 0.7], 1: [0.6, 0.7, 0.8], 2: [0.1, 0.9, 0.95], 3: [0.7, 0.75, 0.85]}


def known_study(pruned: dict[int, int] | None = None, diverged: dict[int, int] | None = None) -> optuna.Study:
    """An in-memory study with the KNOWN curves; ``pruned``/``diverged``: trial -> epochs
    it ran before its own pruner (or a non-finite loss) stopped it."""
    study = optuna.create_study(
        storage=None, study_name="known", direction="maximize", pruner=optuna.pruners.NopPruner()
    )
    study.set_metric_names(["val_top1"])
    for number, values in KNOWN.items():
        trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)})
        stop = (pruned or {}).get(number) or (diverged or {}).get(number)
        for step, v in enumerate(values[:stop]):
            trial.report(v, step)
        if number in (pruned or {}):
            trial.set_user_attr("stopped_reason", f"pruned after epoch {stop} (val_top1={values[stop - 1]:.4f})")
            study.tell(trial, state=TrialState.PRUNED)
        elif number in (diverged or {}):
            trial.set_user_attr("stopped_reason", f"non-finite loss nan at epoch {stop}, step 3")
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, values[-1])
    return study


def test_median_replay_counts_epochs_and_loses_the_late_bloomer():
    curves = curves_from_study(known_study())
    assert [t.values for t in curves.trials] == list(KNOWN.values())
    none, median = replay(curves, ["none", "median:n_startup_trials=2,n_warmup_steps=0"])
    # Unpruned: 4 x 3 = 12 epochs, best trial 2 (0.95), then 3 (0.85), 1 (0.8), 0 (0.7).
    assert (none.epochs, none.total_epochs, none.best_trial, none.best_rank, none.gap) == (12, 12, 2, 1, 0.0)
    assert none.top3 == [2, 3, 1] and none.top3_kept == 3 and none.kept_best
    # Median, 2 start-up trials: trials 0 and 1 run in full (6 epochs). Trial 2's 0.1 after
    # epoch 1 is below the median of 0.5 and 0.6: pruned after 1 epoch. Trial 3: 0.7 > 0.55,
    # 0.75 > 0.65, 0.85 > 0.75: runs in full. 3 + 3 + 1 + 3 = 10 epochs.
    assert median.epochs == 10 and median.share == pytest.approx(10 / 12)
    assert median.pruned_at == {2: 1} and median.completed == [0, 1, 3]
    # The unpruned best is lost: the best survivor is trial 3, rank 2, 0.10 below.
    assert (median.best_trial, median.best_rank, median.best_value) == (3, 2, 0.85)
    assert median.gap == pytest.approx(0.10)
    assert median.top3_kept == 2 and not median.kept_best
    assert choose([none, median]) is none


def test_a_pruner_that_keeps_the_best_is_chosen_for_fewer_epochs():
    # Trial 2 leads from its first epoch; trial 3 trails from its first: median prunes
    # only trial 3, after 1 epoch, and keeps the best with 10 of 12 epochs.
    curves = Curves(
        trials=[
            TrialCurve(0, [0.5, 0.6, 0.7]),
            TrialCurve(1, [0.6, 0.7, 0.8]),
            TrialCurve(2, [0.8, 0.9, 0.95]),
            TrialCurve(3, [0.2, 0.3, 0.4]),
        ]
    )
    none, median = replay(curves, ["none", "median:n_startup_trials=2"])
    assert median.epochs == 10 and median.pruned_at == {3: 1} and median.kept_best
    assert choose([none, median]) is median


def test_replay_is_deterministic_for_every_default_pruner():
    curves = curves_from_study(known_study())
    first = [r.to_dict() for r in replay(curves)]
    assert [r["pruner"] for r in first] == list(DEFAULT_CANDIDATES)
    assert first == [r.to_dict() for r in replay(curves)]


def test_pruned_study_is_refused_unless_complete_only():
    curves = curves_from_study(known_study(pruned={2: 1}))
    assert [t.end for t in curves.trials] == ["complete", "complete", "pruned", "complete"]
    with pytest.raises(ReplayError, match=r"1 of 4 trials were pruned .*--complete-only"):
        replay(curves, ["median"])
    (none,) = replay(curves, ["none"], complete_only=True)
    assert none.total_epochs == 9 and none.best_trial == 3


def test_diverged_trial_costs_its_epochs_under_every_pruner_and_ranks_nowhere():
    curves = curves_from_study(known_study(diverged={2: 2}))
    assert curves.trials[2].end == "diverged" and curves.trials[2].values == [0.1, 0.9]
    (none,) = replay(curves, ["none"])
    assert none.total_epochs == 11 and none.epochs == 11
    assert none.top3 == [3, 1, 0] and none.best_trial == 3


def test_curves_json_round_trip_and_bad_files(tmp_path: Path):
    curves = curves_from_study(known_study())
    path = tmp_path / "c.json"
    write_curves(curves, path)
    again = read_curves(path)
    assert [(t.number, t.values, t.end, t.value) for t in again.trials] == [
        (t.number, t.values, t.end, t.value) for t in curves.trials
    ]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "dlops-curves", "trials": [{"values": [0.1, "x"]}]}))
    with pytest.raises(ReplayError, match="values must be finite"):
        read_curves(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ReplayError, match="not a dlops-curves file"):
        read_curves(bad)


BIG = "9" * 400  # an integer no float holds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"number": "abc", "values": [0.5]}', "trials[0]: number must be a non-negative integer, not 'abc'"),
        ('{"number": null, "values": [0.5]}', "trials[0]: number must be a non-negative integer, not None"),
        ('{"number": 0, "values": [0.5], "params": "xyz"}', "trials[0]: params must be an object or null, not 'xyz'"),
        ('{"number": 0, "values": [' + BIG + "]}", "trials[0]: values must be finite numbers"),
        ('{"number": 0, "values": [0.5], "value": ' + BIG + "}", "trials[0]: value must be a finite number or null"),
        (
            '{"number": 5, "values": [0.5, 0.9]}, {"number": 5, "values": [0.05, 0.1]}',
            "trials[1]: trial number 5 appears twice (also trials[0])",
        ),
    ],
)
def test_a_malformed_trial_in_a_curves_file_is_refused_in_one_line(tmp_path: Path, text: str, message: str):
    path = tmp_path / "bad.json"
    path.write_text('{"format": "dlops-curves", "trials": [' + text + "]}")
    with pytest.raises(ReplayError) as info:
        read_curves(path)
    assert str(info.value) == f"{path}: {message}"
    out = CliRunner().invoke(app, ["study", "replay", str(path)])
    assert out.exit_code != 0 and out.output.strip().splitlines() == [f"error: {path}: {message}"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"settings": [1, 2]}, "settings must be an object or null, not [1, 2]"),
        ({"spec": 123}, "spec must be a string or null, not 123"),
        ({"metric": ["val_top1"]}, "metric must be a string or null, not ['val_top1']"),
    ],
)
def test_a_malformed_curves_file_header_is_refused_in_one_line(tmp_path: Path, extra: dict, message: str):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"format": "dlops-curves", "trials": [{"number": 0, "values": [0.5]}], **extra}))
    out = CliRunner().invoke(app, ["study", "replay", str(path)])
    assert out.exit_code != 0 and out.output.strip().splitlines() == [f"error: {path}: {message}"]


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_an_empty_curves_file_is_called_empty(tmp_path: Path, content: str):
    path = tmp_path / "curves.json"
    path.write_text(content)
    out = CliRunner().invoke(app, ["study", "replay", str(path)])
    expected = f"error: {path}: the file is empty, not a dlops-curves file"
    assert out.exit_code != 0 and out.output.strip().splitlines() == [expected]


def test_a_curves_file_that_is_not_utf8_is_refused_in_one_line(tmp_path: Path):
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{"format": "dlops-curves", "source": "caf\xe9", "trials": []}')
    out = CliRunner().invoke(app, ["study", "replay", str(path)])
    assert out.exit_code != 0 and out.output.strip().splitlines() == [f"error: {path}: not JSON (not UTF-8 text)"]


def test_parse_pruner_matches_the_spec_table():
    assert parse_pruner("median:n_startup_trials=3,n_warmup_steps=1") == {
        "type": "median",
        "n_startup_trials": 3,
        "n_warmup_steps": 1,
    }
    assert parse_pruner("hyperband:min_resource=1,max_resource=auto") == {
        "type": "hyperband",
        "min_resource": 1,
        "max_resource": "auto",
    }
    with pytest.raises(ReplayError, match="unknown pruner 'patient'"):
        parse_pruner("patient")
    with pytest.raises(ReplayError, match="n_warmup"):
        replay(Curves(trials=[TrialCurve(0, [0.5])]), ["median:n_warmup=1"])
    # a setting the type does not take, or a second type, is refused, not ignored
    with pytest.raises(ReplayError, match=r"pruner 'none:foo=bar': type none does not take 'foo' \(takes no"):
        parse_pruner("none:foo=bar")
    with pytest.raises(ReplayError, match="the type comes before the colon"):
        parse_pruner("median:type=hyperband")
    with pytest.raises(ReplayError, match="'n_warmup_steps' appears twice"):
        parse_pruner("median:n_warmup_steps=1,n_warmup_steps=2")
    with pytest.raises(ReplayError, match="type median does not take 'min_resource'"):
        replay(Curves(trials=[TrialCurve(0, [0.5])]), [{"type": "median", "min_resource": 1}])


@pytest.mark.parametrize(
    ("pruner", "message"),
    [
        ("none:foo=bar", "type none does not take 'foo'"),
        ("median:type=hyperband", "the type comes before the colon"),
        # a bad hyperband setting was a traceback from inside Optuna (math domain error)
        ("hyperband:max_resource=0", "hyperband max_resource = 0 should be 'auto' or an integer >= min_resource"),
        ("hyperband:reduction_factor=1", "hyperband reduction_factor = 1 should be an integer >= 2"),
        # a setting of the wrong type was Optuna's "'<' not supported between instances of 'str' and 'int'",
        # or was taken as it is (1.5 start-up trials, true warm-up steps)
        ("median:n_startup_trials=abc", "median n_startup_trials = 'abc' should be an integer"),
        ("median:n_startup_trials=3:n_warmup_steps=1", "n_startup_trials = '3:n_warmup_steps=1' should be an integer"),
        ("median:n_startup_trials=1.5", "median n_startup_trials = 1.5 should be an integer"),
        ("percentile:percentile=25,n_warmup_steps=true", "percentile n_warmup_steps = True should be an integer"),
        ("percentile:percentile=high", "percentile percentile = 'high' should be a number from 0 to 100"),
        ("successive_halving:reduction_factor=2.5", "successive_halving reduction_factor = 2.5 should be an integer"),
        ("sha:min_resource=one", "successive_halving min_resource = 'one' should be an integer or 'auto'"),
        # a missing setting was "PercentilePruner.__init__() missing 1 required positional argument"
        ("percentile", "pruner 'percentile': percentile needs the setting percentile (a number from 0 to 100)"),
    ],
)
def test_cli_refuses_a_pruner_setting_the_type_does_not_take(tmp_path: Path, pruner: str, message: str):
    path = tmp_path / "c.json"
    write_curves(curves_from_study(known_study()), path)
    out = CliRunner().invoke(app, ["study", "replay", str(path), "--pruner", pruner])
    assert out.exit_code != 0
    lines = out.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("error:"), out.output


def test_cli_replays_a_stored_study_and_refuses_a_pruned_one(dlops_home: Path):
    url = f"sqlite:///{dlops_home / 'db.sqlite'}"
    dlops_home.mkdir(parents=True)
    for name, pruned in (("whole", None), ("cut", {2: 1})):
        src = known_study(pruned=pruned)
        dst = optuna.create_study(storage=url, study_name=name, direction="maximize")
        dst.set_metric_names(["val_top1"])
        dst.add_trials(src.get_trials())
    runner = CliRunner()
    out = runner.invoke(
        app,
        [
            "study",
            "replay",
            "whole",
            "--storage",
            url,
            "--pruner",
            "none",
            "--pruner",
            "median:n_startup_trials=2,n_warmup_steps=0",
        ],
    )
    assert out.exit_code == 0, out.output
    assert "4 trials, 12 epochs unpruned" in out.output
    row = next(line for line in out.output.splitlines() if line.startswith("median"))
    assert row.split()[1:4] == ["10/12", "83%", "#2"]
    out = runner.invoke(app, ["study", "replay", "cut", "--storage", url])
    assert out.exit_code != 0 and "--complete-only" in out.output and len(out.output.strip().splitlines()) == 1
    out = runner.invoke(
        app, ["study", "replay", "cut", "--storage", url, "--complete-only", "--json", "--pruner", "none"]
    )
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["results"][0]["total_epochs"] == 9


@pytest.mark.skipif(not (RECORDED / "resnet18-ce-digits.json").exists(), reason="no recorded digits curves")
def test_cli_replays_the_recorded_digits_curves():
    out = CliRunner().invoke(app, ["study", "replay", str(RECORDED / "resnet18-ce-digits.json")])
    assert out.exit_code == 0, out.output
    assert all(any(line.startswith(p) for line in out.output.splitlines()) for p in DEFAULT_CANDIDATES)


def _stored_known_study(url: str, name: str, pruned: dict[int, int]) -> None:
    src = known_study(pruned=pruned)
    dst = optuna.create_study(storage=url, study_name=name, direction="maximize")
    dst.set_metric_names(["val_top1"])
    for t in src.get_trials():
        t.user_attrs["config"] = {"epochs": 3}
        dst.add_trial(t)


def test_study_show_gives_epochs_trained_against_unpruned(dlops_home: Path):
    dlops_home.mkdir(parents=True)
    url = f"sqlite:///{dlops_home / 'dlops.db'}"
    _stored_known_study(url, "cut", {2: 1, 0: 2})
    runner = CliRunner()
    info = json.loads(runner.invoke(app, ["study", "show", "cut", "--json"]).output)
    # trials 1 and 3 train 3 epochs each, trial 0 stops after 2, trial 2 after 1: 9 of 12
    assert info["epochs"] == {"trained": 9, "unpruned": 12, "share": 0.75, "pruned_stop_epochs": {"0": 2, "2": 1}}
    assert [t["stop_epoch"] for t in info["trials"]] == [2, None, 1, None]
    out = runner.invoke(app, ["study", "show", "cut"])
    assert out.exit_code == 0, out.output
    assert (
        "epochs trained: 9 of the 12 the same trials would train unpruned (75%); pruned trials stopped after "
        "epoch 2 (#0), 1 (#2)" in " ".join(out.output.split())
    )


def test_report_gives_each_study_its_pruning_line(dlops_home: Path):
    from dlops.report import StudyFacts, build_report

    dlops_home.mkdir(parents=True)
    url = f"sqlite:///{dlops_home / 'dlops.db'}"
    _stored_known_study(url, "cut", {2: 1})
    facts = StudyFacts.of(optuna.load_study(study_name="cut", storage=url))
    assert facts.pruning_text == "10 of 12 epochs unpruned (83%); 1 pruned, stopped after epoch 1"
    result = build_report(url)
    assert (
        "| pruning: epochs trained | 10 of 12 epochs unpruned (83%); 1 pruned, stopped after epoch 1 |"
        in result.index.read_text()
    )
    assert "- pruning: 10 of 12 epochs unpruned (83%)" in (dlops_home / "reports" / "cut" / "report.md").read_text()


def test_a_study_without_learning_curves_is_refused_in_one_line_and_reported(dlops_home: Path):
    from dlops.report import build_report

    dlops_home.mkdir(parents=True)
    url = f"sqlite:///{dlops_home / 'dlops.db'}"
    plain = optuna.create_study(storage=url, study_name="plain", direction="maximize")
    plain.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)  # no trial.report: no curves
    out = CliRunner().invoke(app, ["study", "replay", "plain", "--storage", url])
    assert out.exit_code == 2, out.output
    assert out.output.strip().splitlines() == [
        "error: plain: no learning curves recorded (no trial reported a value per epoch)"
    ]
    index = build_report(url).index.read_text()
    assert "| pruning: epochs trained | no per-epoch values recorded |" in index
    assert "- pruning: no per-epoch values recorded" in (dlops_home / "reports" / "plain" / "report.md").read_text()


def _plain_optuna_study(url: str, name: str) -> None:
    """A study made by plain Optuna, whose user attrs mean nothing to dlops."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    study = optuna.create_study(storage=url, study_name=name, direction="maximize")
    study.set_user_attr("spec", 5)
    dist = {"x": FloatDistribution(0, 1)}
    for x, state, value, curve, config in (
        (0.1, TrialState.COMPLETE, 0.5, {0: 0.3, 1: 0.5}, "abc"),
        (0.2, TrialState.PRUNED, None, {0: 0.1}, {"epochs": "abc"}),
        (0.3, TrialState.PRUNED, None, {0: 0.2}, "zzz"),
    ):
        study.add_trial(
            create_trial(
                state=state,
                value=value,
                params={"x": x},
                distributions=dist,
                intermediate_values=curve,
                user_attrs={"config": config},
            )
        )


def test_show_and_replay_treat_malformed_attrs_of_a_plain_optuna_study_as_absent(dlops_home: Path):
    dlops_home.mkdir(parents=True)
    url = f"sqlite:///{dlops_home / 'plain.db'}"
    _plain_optuna_study(url, "plain")
    runner = CliRunner()
    out = runner.invoke(app, ["study", "show", "plain", "--storage", url, "--json"])
    assert out.exit_code == 0, out.output
    # the pruned trials count at the longest complete trial's 2 epochs: no config says otherwise
    assert json.loads(out.output)["epochs"] == {
        "trained": 4,
        "unpruned": 6,
        "share": 4 / 6,
        "pruned_stop_epochs": {"1": 1, "2": 1},
    }
    out = runner.invoke(app, ["study", "show", "plain", "--storage", url])
    assert out.exit_code == 0 and "epochs trained: 4 of the 6" in out.output, out.output
    out = runner.invoke(app, ["study", "replay", "plain", "--storage", url, "--complete-only", "--json"])
    assert out.exit_code == 0, out.output
    replayed = json.loads(out.output)
    assert replayed["spec"] is None and replayed["results"][0]["total_epochs"] == 2 and replayed["chosen"] == "none"


def _strict_json(text: str) -> object:
    def refuse(constant: str) -> None:
        raise AssertionError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_json_output_is_strict_and_an_infinite_best_is_kept_by_the_pruner_that_keeps_it(dlops_home: Path):
    """A plain Optuna study may hold inf: --json writes null for it (Infinity is not JSON),
    and a pruner that keeps the trial of value inf keeps the best (inf - inf is no gap)."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    dlops_home.mkdir(parents=True)
    url = f"sqlite:///{dlops_home / 'inf.db'}"
    study = optuna.create_study(storage=url, study_name="inf", direction="maximize")
    dist = {"x": FloatDistribution(0, 1)}
    for x, curve in ((0.1, {0: 0.2, 1: 0.5}), (0.2, {0: 0.3, 1: float("inf")})):
        study.add_trial(create_trial(value=curve[1], params={"x": x}, distributions=dist, intermediate_values=curve))
    runner = CliRunner()
    out = runner.invoke(app, ["study", "show", "inf", "--storage", url, "--json"])
    assert out.exit_code == 0, out.output
    shown = _strict_json(out.output)
    assert [t["value"] for t in shown["trials"]] == [0.5, None] and shown["best"]["number"] == 1
    out = runner.invoke(app, ["study", "replay", "inf", "--storage", url, "--pruner", "none", "--json"])
    assert out.exit_code == 0, out.output
    (none,) = _strict_json(out.output)["results"]
    assert none["best_trial"] == 1 and none["best_value"] is None and none["gap"] == 0.0 and none["kept_best"]
    out = runner.invoke(app, ["study", "replay", "inf", "--storage", url, "--pruner", "none"])
    assert out.exit_code == 0, out.output
    row = next(line for line in out.output.splitlines() if line.startswith("none"))
    assert row.split()[-1] == "yes"
