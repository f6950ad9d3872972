"""Study specs: the built-ins load; bad ones end in one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from dlops.cli import app
from dlops.errors import SpecError
from dlops.spec import builtin_specs, load_spec

GOOD = """
name = "tiny"
trainer = "resnet18"
[train]
loss = "ce"
dataset = "digits"
epochs = 1
[search.lr]
type = "float"
low = 1e-4
high = 1e-1
log = true
[baseline]
lr = 1e-3
"""


@pytest.mark.parametrize("loss", ["ce", "triplet", "center"])
def test_builtin_resnet_specs_search_lr_around_the_baseline(loss: str) -> None:
    spec = load_spec(f"resnet18-{loss}")
    assert spec.name == f"resnet18-{loss}" and spec.metric == "val_top5" and spec.direction == "maximize"
    lr = spec.search["lr"]
    assert lr.log and lr.low <= 1e-4 and lr.high >= 1e-1
    base = spec.config(params=spec.baseline_params())
    assert base.lr == 1e-3 and base.momentum == 0.9 and base.loss == loss and base.dataset == "tiny-imagenet"
    assert spec.config("digits").epochs < base.epochs  # quick on the embedded dataset
    # top-5 on Tiny ImageNet; top-1 on the 10 digits, where top-5 is 1.0 after an epoch
    assert spec.for_dataset(None).metric == spec.for_dataset("tiny-imagenet").metric == "val_top5"
    assert spec.for_dataset("digits").metric == "val_top1" and spec.metric == "val_top5"
    if loss == "triplet":
        # soft margin or hinge; the margin only where it is live (the hinge)
        assert spec.search["triplet_soft"].choices == (True, False)
        assert spec.search["margin"].when == (("triplet_soft", False),)
        assert base.embedding_dim > 0 and base.embedding_bn
    if loss == "center":
        assert {"center_lambda", "center_alpha"} <= set(spec.search)


def test_specs_are_found_from_any_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert {"resnet18-ce", "resnet18-triplet", "resnet18-center"} <= set(builtin_specs())
    assert load_spec("resnet18-ce").path.is_file()


@pytest.mark.parametrize(
    "change, message",
    [
        (("[train]", "[train]\nbogus = 1"), "unknown key 'bogus' in [train]"),
        (('name = "tiny"', 'name = "tiny"\ncolour = "red"'), "unknown key 'colour' in the spec"),
        (("low = 1e-4\nhigh = 1e-1", "low = 1e-1\nhigh = 1e-4"), "low (0.1) > high (0.0001)"),
        (('loss = "ce"', 'loss = "hinge"'), "unknown loss 'hinge'"),
        (("[baseline]\nlr = 1e-3", "[baseline]\nlr = 5.0"), "outside its search range"),
        (("epochs = 1", 'epochs = "ten"'), "epochs = 'ten' should be a int"),
        (('type = "float"', 'type = "complex"'), "unknown type 'complex'"),
        (("[search.lr]", "[search.lr_decay]"), "'lr_decay' is not a setting"),
        (("log = true", "log = true\nlow2 = 3"), "unknown key 'low2' in [search.lr]"),
        (
            ("[baseline]", "[datasets.digits]\nmetric = 5\n[baseline]"),
            "[datasets.digits] metric must name a validation metric",
        ),
        (('name = "tiny"', 'name = "tiny"\nmetric = "top5"'), "metric must name a validation metric"),
        # a metric the trainer never reports: refused when the spec loads, not after an epoch of each trial
        (('name = "tiny"', 'name = "tiny"\nmetric = "val_nope"'), "metric must name a validation metric"),
        (("[baseline]", '[datasets.digits]\nmetric = "val_nope"\n[baseline]'), "[datasets.digits] metric must name"),
        (
            ("[baseline]", '[pruner]\ntype = "median"\nn_startup_trials = -3\n[baseline]'),
            "[pruner]: Number of startup trials cannot be negative",
        ),
        (("[baseline]", '[pruner]\ntype = "median"\nwarmup = 2\n[baseline]'), "[pruner]: "),
        (("[baseline]", '[sampler]\nseed = "x"\n[baseline]'), "[sampler]: seed = 'x' should be an integer"),
        (("[baseline]", "[sampler]\nseed = -1\n[baseline]"), "[sampler]: seed = -1 should be an integer"),
        (("[baseline]", "[sampler]\nn_startup_trials = 1.5\n[baseline]"), "[sampler]: n_startup_trials = 1.5"),
    ],
)
def test_invalid_specs_are_rejected_with_one_line(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(GOOD.replace(*change, 1))
    with pytest.raises(SpecError) as info:
        load_spec(str(path))
    assert message in str(info.value) and "bad.toml" in str(info.value)
    assert "\n" not in str(info.value)


def test_cli_reports_a_bad_spec_in_one_line_and_exits_nonzero(tmp_path: Path, dlops_home: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(GOOD.replace('loss = "ce"', 'loss = "hinge"'))
    result = CliRunner().invoke(app, ["study", "run", str(path)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown loss 'hinge'" in lines[0]
    assert not (dlops_home / "dlops.db").exists()  # nothing written


@pytest.mark.parametrize("trainer_spec", ["resnet18-ce", "autoencoder"])
def test_the_allowed_metrics_are_what_the_trainer_reports(trainer_spec: str) -> None:
    from dlops.trainers import get_trainer

    spec = load_spec(trainer_spec)
    reported = get_trainer(spec.trainer).metrics
    assert spec.metric in reported and "val_top1" in reported and "val_nope" not in reported


def test_cli_names_the_search_key_of_a_bad_parameter(tmp_path: Path, dlops_home: Path) -> None:
    """The table name in brackets is text, not rich markup swallowed from the message."""
    path = tmp_path / "cat_empty.toml"
    path.write_text(
        GOOD.replace(
            'type = "float"\nlow = 1e-4\nhigh = 1e-1\nlog = true', 'type = "categorical"\nchoices = []'
        ).replace("[baseline]\nlr = 1e-3", "[baseline]")
    )
    result = CliRunner().invoke(app, ["study", "run", str(path)])
    assert result.exit_code == 2, result.output
    assert "cat_empty.toml: [search.lr]: categorical needs a non-empty list 'choices'" in result.output
    bad_metric = tmp_path / "nope.toml"
    bad_metric.write_text(GOOD.replace('name = "tiny"', 'name = "tiny"\nmetric = "val_nope"'))
    result = CliRunner().invoke(app, ["study", "run", str(bad_metric), "--n-trials", "1"])
    assert result.exit_code == 2 and "metric must name a validation metric" in result.output
    assert "Traceback" not in result.output and not (dlops_home / "dlops.db").exists()


def test_cli_rejects_unknown_loss_and_unknown_spec(dlops_home: Path) -> None:
    r = CliRunner().invoke(app, ["study", "run", "--loss", "arcface"])
    assert r.exit_code != 0 and "unknown loss 'arcface'" in r.output
    r = CliRunner().invoke(app, ["study", "run", "resnet50-ce"])
    assert r.exit_code != 0 and "unknown spec 'resnet50-ce'" in r.output
    r = CliRunner().invoke(app, ["study", "run", "missing.toml"])
    assert r.exit_code != 0 and "does not exist" in r.output


CONDITIONAL = """
name = "cond"
trainer = "resnet18"
[train]
loss = "triplet"
dataset = "digits"
[search.triplet_soft]
type = "categorical"
choices = [true, false]
[search.margin]
type = "float"
low = 0.05
high = 1.0
when = { triplet_soft = false }
[baseline]
triplet_soft = false
margin = 0.3
"""


def test_a_conditional_parameter_is_searched_only_where_it_is_live(tmp_path: Path) -> None:
    import optuna

    from dlops.search import suggest_params

    path = tmp_path / "cond.toml"
    path.write_text(CONDITIONAL)
    spec = load_spec(str(path))
    assert spec.baseline_params() == {"triplet_soft": False, "margin": 0.3}
    path.write_text(CONDITIONAL.replace("triplet_soft = false\nmargin", "triplet_soft = true\nmargin"))
    assert load_spec(str(path)).baseline_params() == {"triplet_soft": True}  # the margin is dead there
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        params = suggest_params(trial, spec)
        assert ("margin" in params) == (params["triplet_soft"] is False), params
        seen.add(params["triplet_soft"])
        study.tell(trial, 0.0)
    assert seen == {True, False}


@pytest.mark.parametrize(
    "change, message",
    [
        (
            ("when = { triplet_soft = false }", "when = { lr = 0.1 }"),
            "can only name a categorical parameter searched before it",
        ),
        (("when = { triplet_soft = false }", 'when = { triplet_soft = "no" }'), "is not one of its choices"),
        (("when = { triplet_soft = false }", "when = 3"), "'when' must be a table"),
    ],
)
def test_bad_conditions_are_rejected_with_one_line(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(CONDITIONAL.replace(*change, 1))
    with pytest.raises(SpecError) as info:
        load_spec(str(path))
    assert message in str(info.value) and "\n" not in str(info.value)
