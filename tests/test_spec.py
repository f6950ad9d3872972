"""Study specs: the built-ins load; bad ones end in one clear line; overrides apply
exactly where they say or fail."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from dlops.cli import app
from dlops.errors import SpecError
from dlops.spec import REMOVE, Add, Replace, builtin_specs, load_spec, override_table, spec_table
from specs import toml_text, write_spec

GOOD: dict[str, Any] = {
    "name": "tiny",
    "trainer": "resnet18",
    "train": {"loss": "ce", "dataset": "digits", "epochs": 1},
    "search": {"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}},
    "baseline": {"lr": 1e-3},
}


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
        # the baseline mines batch-hard triplets; the study may soften the mining
        assert spec.search["triplet_mining"].choices == ("hard", "weighted") and base.triplet_mining == "hard"
    if loss == "center":
        assert {"center_lambda", "center_alpha"} <= set(spec.search)


def test_the_original_configuration_ships_as_a_spec() -> None:
    """resnet18-ce-original's baseline is the original experiment, setting by setting; its
    reference run is 15 epochs (`dlops final resnet18-ce-original --params baseline`)."""
    spec = load_spec("resnet18-ce-original")
    base = spec.config(params=spec.baseline_params())
    tuned = load_spec("resnet18-ce").config(params=spec.baseline_params())
    original = {
        "model": "resnet18",
        "loss": "ce",
        "dataset": "tiny-imagenet",
        "batch_size": 128,
        "lr": 1e-3,
        "momentum": 0.9,
        "nesterov": False,
        "weight_decay": 0.0,
        "lr_schedule": "constant",
        "warmup_epochs": 0,
        "augment": False,
        "epochs": 15,
        "width": 64,
    }
    assert {k: getattr(base, k) for k in original} == original
    assert spec.final["epochs"] == 15 and spec.metric == "val_top5"
    # The rest is resnet18-ce's: the original differs from it in the recipe only.
    differs = {k for k, v in base.to_dict().items() if tuned.to_dict()[k] != v}
    assert differs == {"weight_decay", "lr_schedule", "augment"}


def test_specs_are_found_from_any_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert {"resnet18-ce", "resnet18-triplet", "resnet18-center"} <= set(builtin_specs())
    assert load_spec("resnet18-ce").path.is_file()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"train": {"bogus": Add(1)}}, "unknown key 'bogus' in [train]"),
        ({"colour": Add("red")}, "unknown key 'colour' in the spec"),
        ({"search": {"lr": {"low": 1e-1, "high": 1e-4}}}, "low (0.1) > high (0.0001)"),
        ({"train": {"loss": "hinge"}}, "unknown loss 'hinge'"),
        ({"baseline": {"lr": 5.0}}, "outside its search range"),
        ({"train": {"epochs": "ten"}}, "epochs = 'ten' should be an integer"),
        ({"search": {"lr": {"type": "complex"}}}, "unknown type 'complex'"),
        # a type written as a list was a TypeError traceback (unhashable), not one line
        ({"search": {"lr": {"type": ["float"]}}}, "[search.lr]: unknown type ['float']"),
        ({"sampler": Add({"type": ["tpe"]})}, "[sampler]: unknown type ['tpe']"),
        ({"trainer": ["resnet18"]}, "unknown trainer ['resnet18']"),
        ({"search": {"lr": REMOVE, "lr_decay": Add(GOOD["search"]["lr"])}}, "'lr_decay' is not a setting"),
        ({"search": {"lr": {"low2": Add(3)}}}, "unknown key 'low2' in [search.lr]"),
        ({"datasets": Add({"digits": {"metric": 5}})}, "[datasets.digits] metric must name a validation metric"),
        ({"metric": Add("top5")}, "metric must name a validation metric"),
        # a metric the trainer never reports: refused when the spec loads, not after an epoch of each trial
        ({"metric": Add("val_nope")}, "metric must name a validation metric"),
        ({"datasets": Add({"digits": {"metric": "val_nope"}})}, "[datasets.digits] metric must name"),
        # a metric edited without its direction (or the other way round): the study ranked its worst trial best
        (
            {"metric": Add("val_loss")},
            "metric = 'val_loss' needs direction = 'minimize', the spec has 'maximize': its study would rank",
        ),
        (
            {
                "metric": Add("val_loss"),
                "direction": Add("minimize"),
                "datasets": Add({"digits": {"metric": "val_top1"}}),
            },
            "[datasets.digits] metric = 'val_top1' needs direction = 'maximize', the spec has 'minimize'",
        ),
        (
            {"pruner": Add({"type": "median", "n_startup_trials": -3})},
            "[pruner]: Number of startup trials cannot be negative",
        ),
        ({"pruner": Add({"type": "median", "warmup": 2})}, "[pruner]: "),
        # [final] as dlops final reads it: once refused only there, after the study, without the file's name
        ({"final": Add({"epochs": "30"})}, "[final]: epochs = '30' should be a positive integer"),
        ({"final": Add({"epochs": True})}, "[final]: epochs = True should be a positive integer"),
        ({"final": Add({"seeds": 0})}, "[final]: seeds = 0 should be a positive integer"),
        (
            {"final": Add({"seeds": 2_000_000_000})},
            "[final]: seeds = 2000000000 is more than the 1000 a reference run trains",
        ),
        ({"sampler": Add({"seed": "x"})}, "[sampler]: seed = 'x' should be an integer"),
        ({"sampler": Add({"seed": -1})}, "[sampler]: seed = -1 should be an integer"),
        ({"sampler": Add({"n_startup_trials": 1.5})}, "[sampler]: n_startup_trials = 1.5"),
        (
            {"sampler": Add({"type": "random", "n_startup_trials": 5})},
            "[sampler]: type random does not take n_startup_trials",
        ),
        # a typo in a dataset's table once left it unused without a word
        ({"datasets": Add({"digit": {"epochs": 2}})}, "[datasets.digit]: unknown dataset 'digit' (known: digits,"),
        # a dataset's table naming another dataset: --dataset digits trained STL-10 under a digits study
        (
            {"datasets": Add({"digits": {"dataset": "stl10"}})},
            "[datasets.digits]: dataset = 'stl10' cannot stand in it: the table's name is the dataset",
        ),
        # a setting the baseline cannot change: trial 0 trained without it, silently
        ({"baseline": {"momentum": Add(0.0)}}, "[baseline]: momentum is not searched"),
        ({"train": Replace(5)}, "[train] must be a table, got 5"),
        ({"datasets": Add({"digits": 5})}, "[datasets.digits] must be a table, got 5"),
        ({"timeout": Add("soon")}, "timeout must be a positive number of seconds, got 'soon'"),
        ({"timeout": Add(0)}, "timeout must be a positive number of seconds, got 0"),
        # nan passed `timeout <= 0` and stopped nothing (no elapsed time is more than nan)
        ({"timeout": Add(float("nan"))}, "timeout must be a positive number of seconds, got nan"),
        # the name names folders under $DLOPS_HOME: reports/../data would have been the data
        ({"name": "../data"}, "name = '../data': a spec's name is up to 100 letters"),
        ({"name": "."}, "name = '.'"),
        ({"name": "a/b"}, "name = 'a/b'"),
        ({"name": "data"}, "name = 'data' is taken: reports/data holds the PNGs of `dlops data show`"),
        ({"name": "Index.md"}, "name = 'Index.md' is taken: reports/Index.md holds the index of every spec's report"),
        # settings of the run are not hyperparameters: a study of them would mix runs that do not compare
        *(
            ({"search": {key: Add(table)}}, f"[search.{key}]: {key} is a setting of the run, not a hyperparameter")
            for key, table in {
                "epochs": {"type": "int", "low": 1, "high": 3},
                "seed": {"type": "int", "low": 0, "high": 9},
                "loss": {"type": "categorical", "choices": ["ce", "center"]},
                "device": {"type": "categorical", "choices": ["cpu"]},
                "dataset": {"type": "categorical", "choices": ["digits", "stl10"]},
                "data_root": {"type": "categorical", "choices": ["/tmp"]},
                "subset_classes": {"type": "int", "low": 2, "high": 5},
                "subset_per_class": {"type": "int", "low": 5, "high": 10},
            }.items()
        ),
        # a range or choice the trainer would refuse once a trial drew it
        (
            {"search": {"weight_decay": Add({"type": "float", "low": -0.1, "high": 0.1})}},
            "[search.weight_decay]: low = -0.1 is not a value a run can use (weight_decay must be a finite number >= 0",
        ),
        (
            {"search": {"momentum": Add({"type": "float", "low": 0.5, "high": 1.0})}},
            "[search.momentum]: high = 1.0 is not a value a run can use (momentum must be a finite number in [0, 1)",
        ),
        (
            {"search": {"lr_schedule": Add({"type": "categorical", "choices": ["cosine", "bogus"]})}},
            "[search.lr_schedule]: choice 'bogus' is not a value a run can use (unknown lr_schedule 'bogus'",
        ),
        (
            {"search": {"triplet_mining": Add({"type": "categorical", "choices": ["hard", "semi-hard"]})}},
            "[search.triplet_mining]: triplet_mining is read only by the triplet loss",
        ),
        (
            {"search": {"augment": Add({"type": "categorical", "choices": ["yes", "no"]})}},
            "[search.augment]: augment = 'yes' should be true or false",
        ),
        (
            {"search": {"width": Add({"type": "float", "low": 8, "high": 16})}, "baseline": {"width": Add(8)}},
            '[search.width]: width = 8.0 should be an integer (type = "int" searches integers',
        ),
        (
            {"search": {"width": Add({"type": "categorical", "choices": [[8, 16]]})}},
            "[search.width]: a choice is a number, a string or true/false, not [8, 16]",
        ),
        # a setting the spec's loss never reads: a dimension of the search that changes nothing
        (
            {"search": {"margin": Add({"type": "float", "low": 0.1, "high": 0.5})}},
            "[search.margin]: margin is read only by the triplet loss, and this spec trains the ce loss: "
            "searching it would have no effect",
        ),
        (
            {"search": {"center_lambda": Add({"type": "float", "low": 1e-3, "high": 0.5, "log": True})}},
            "[search.center_lambda]: center_lambda is read only by the center loss, and this spec trains the ce",
        ),
        # a range one of the spec's runs could not train: every trial that drew its end failed
        (
            {
                "train": {"epochs": 20},
                "search": {"warmup_epochs": Add({"type": "int", "low": 0, "high": 10})},
                "datasets": Add({"stl10": {"epochs": 5}}),
            },
            "[search.warmup_epochs]: high = 10 is not a value a run on stl10 can use (warmup_epochs = 10 is more "
            "than the 5 epochs of the run",
        ),
        (
            {
                "train": {"epochs": 20},
                "search": {"warmup_epochs": Add({"type": "int", "low": 0, "high": 10})},
                "final": Add({"epochs": 5}),
            },
            "[search.warmup_epochs]: high = 10 is not a value dlops final ([final] epochs = 5) can use",
        ),
        # [final] epochs the fixed settings cannot train: refused by dlops final only, after the study
        (
            {"train": {"epochs": 20, "warmup_epochs": Add(3)}, "final": Add({"epochs": 2})},
            "[final] epochs = 2: warmup_epochs = 3 is more than the 2 epochs of the run",
        ),
        # a choice written twice (a typo) weighs it double
        (
            {"search": {"momentum": Add({"type": "categorical", "choices": [0.9, 0.5, 0.9]})}},
            "[search.momentum]: choice 0.9 is listed twice",
        ),
        (
            {"search": {"weight_decay": Add({"type": "categorical", "choices": [0, 5e-4, 0.0]})}},
            "[search.weight_decay]: choice 0.0 is listed twice",
        ),
        # a pruner key the type does not take is refused, not ignored
        (
            {"pruner": Add({"type": "none", "n_startup_trials": 5})},
            "[pruner]: type none does not take 'n_startup_trials' (takes no settings)",
        ),
        ({"pruner": Add({"type": "none", "bogus": 1})}, "[pruner]: type none does not take 'bogus'"),
        (
            {"pruner": Add({"type": "median", "min_resource": 1})},
            "[pruner]: type median does not take 'min_resource' (takes n_startup_trials, n_warmup_steps",
        ),
        ({"pruner": Add({"type": ["median"]})}, "[pruner]: unknown type ['median']"),
        # a setting of the wrong type, once taken as it is (5.0 start-up trials) or a traceback-like line
        (
            {"pruner": Add({"type": "median", "n_startup_trials": 5.0})},
            "[pruner]: median n_startup_trials = 5.0 should be an integer",
        ),
        (
            {"pruner": Add({"type": "successive_halving", "min_resource": "1"})},
            "[pruner]: successive_halving min_resource = '1' should be an integer or 'auto'",
        ),
        ({"pruner": Add({"type": "percentile"})}, "[pruner]: percentile needs the setting percentile"),
        # hyperband settings Optuna checks only inside the first trial it prunes (every trial failed)
        (
            {"pruner": Add({"type": "hyperband", "max_resource": 0})},
            "[pruner]: hyperband max_resource = 0 should be 'auto' or an integer >= min_resource (1)",
        ),
        (
            {"pruner": Add({"type": "hyperband", "min_resource": 3, "max_resource": 2})},
            "[pruner]: hyperband max_resource = 2 should be 'auto' or an integer >= min_resource (3)",
        ),
        (
            {"pruner": Add({"type": "hyperband", "reduction_factor": 1})},
            "[pruner]: hyperband reduction_factor = 1 should be an integer >= 2",
        ),
        (
            {"pruner": Add({"type": "hyperband", "min_resource": "auto"})},
            "[pruner]: hyperband min_resource = 'auto' should be an integer >= 1",
        ),
        (
            {"pruner": Add({"type": "hyperband", "max_resource": 9, "bootstrap_count": -1})},
            "[pruner]: hyperband bootstrap_count = -1 should be an integer >= 0",
        ),
        # log and step as Optuna takes them: a string is not false, a step divides the range
        ({"search": {"lr": {"log": "false"}}}, "[search.lr]: log = 'false' should be true or false"),
        (
            {"search": {"lr": {"log": False, "step": Add(0.5)}}},
            "[search.lr]: high - low (0.1 - 0.0001) is not a whole multiple of step = 0.5: "
            "Optuna would shrink the range to high = 0.0001",
        ),
        (
            {"search": {"momentum": Add({"type": "float", "low": 0.1, "high": 0.95, "step": 0.2})}},
            "[search.momentum]: high - low (0.95 - 0.1) is not a whole multiple of step = 0.2: "
            "Optuna would shrink the range to high = 0.9",
        ),
        (
            {"search": {"width": Add({"type": "int", "low": 4, "high": 11, "step": 3})}},
            "[search.width]: high - low (11 - 4) is not a whole multiple of step = 3: "
            "Optuna would shrink the range to high = 10",
        ),
        ({"search": {"lr": {"log": False, "step": Add(True)}}}, "[search.lr]: step = True should be a positive number"),
        ({"search": {"lr": {"log": False, "step": Add("a")}}}, "[search.lr]: step = 'a' should be a positive number"),
        ({"search": {"lr": {"log": False, "step": Add(-0.1)}}}, "[search.lr]: step = -0.1 should be a positive number"),
        (
            {"search": {"width": Add({"type": "int", "low": 4, "high": 10, "step": 0.5})}},
            "[search.width]: step = 0.5 should be a positive integer",
        ),
        ({"search": {"lr": {"step": Add(1e-4)}}}, "[search.lr]: step cannot be combined with log = true"),
        # the baseline, explicit or implicit, lies on the grid a step makes
        (
            {
                "search": {"width": Add({"type": "int", "low": 4, "high": 10, "step": 3})},
                "baseline": {"width": Add(5)},
            },
            "[baseline]: width = 5 lies outside its search range (4..10 step 3)",
        ),
        (
            {"search": {"momentum": Add({"type": "float", "low": 0.05, "high": 0.95, "step": 0.3})}},
            "the baseline (trial 0) on digits would train momentum = 0.9 (the trainer's default), outside "
            "[search.momentum] (0.05..0.95 step 0.3)",
        ),
        # fixed values the trainer refuses: one line at load, not a FAIL trial per attempt
        ({"train": {"weight_decay": Add(-1)}}, "[train]: weight_decay must be a finite number >= 0, got -1"),
        ({"train": {"momentum": Add(-1)}}, "[train]: momentum must be a finite number in [0, 1), got -1"),
        ({"datasets": Add({"digits": {"lr": 0}})}, "[datasets.digits]: lr must be a finite number in (0, 1e+30]"),
        # a searched parameter the baseline leaves out trains the run's value, which must lie in its range
        (
            {"search": {"momentum": Add({"type": "float", "low": 0.95, "high": 0.99})}},
            "the baseline (trial 0) on digits would train momentum = 0.9 (the trainer's default), outside "
            "[search.momentum] (0.95..0.99): add momentum to [baseline] or widen the range",
        ),
        (
            {
                "train": {"width": Add(8)},
                "datasets": Add({"digits": {"width": 16}}),
                "search": {"width": Add({"type": "int", "low": 4, "high": 8})},
            },
            "the baseline (trial 0) on digits would train width = 16 ([datasets.digits]), outside [search.width]",
        ),
        (
            {"search": {"augment": Add({"type": "categorical", "choices": [False]})}},
            "would train augment = true (the trainer's default), outside [search.augment] (choices false)",
        ),
    ],
)
def test_invalid_specs_are_rejected_with_one_line(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    load_spec(str(write_spec(tmp_path / "good.toml", GOOD)))  # the change alone makes it bad
    path = write_spec(tmp_path / "bad.toml", GOOD)
    with pytest.raises(SpecError) as info:
        load_spec(str(path), change)
    assert message in str(info.value) and "bad.toml" in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(SpecError) as info:  # the same through the file, as the CLI reads it
        load_spec(str(write_spec(tmp_path / "bad.toml", override_table(GOOD, change))))
    assert message in str(info.value) and "bad.toml" in str(info.value)


def test_a_step_that_divides_the_range_searches_the_whole_grid(tmp_path: Path) -> None:
    """The range a spec writes is the range Optuna searches, and the baseline lies on its grid."""
    from dlops.objective import distribution

    change = {
        "search": {
            "momentum": Add({"type": "float", "low": 0.1, "high": 0.9, "step": 0.2}),
            "width": Add({"type": "int", "low": 4, "high": 10, "step": 3}),
        },
        "baseline": {"width": Add(7)},
    }
    spec = load_spec(str(write_spec(tmp_path / "grid.toml", GOOD)), change)
    momentum, width = distribution(spec.search["momentum"]), distribution(spec.search["width"])
    assert (momentum.low, momentum.high, momentum.step) == (0.1, 0.9, 0.2)
    assert (width.low, width.high, width.step) == (4, 10, 3)
    assert spec.baseline_params("digits") == {"lr": 1e-3, "momentum": 0.9, "width": 7}
    assert spec.search["width"].contains(7) and not spec.search["width"].contains(5)
    assert spec.search["momentum"].contains(0.7) and not spec.search["momentum"].contains(0.8)


def refused_run(args: list[str], home: Path) -> list[str]:
    """The output lines of a `dlops` command line that must be refused: exit 2, no storage made."""
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert not (home / "dlops.db").exists()  # nothing written
    return result.output.strip().splitlines()


def test_cli_reports_a_bad_spec_in_one_line_and_exits_nonzero(tmp_path: Path, dlops_home: Path) -> None:
    path = tmp_path / "bad.toml"
    write_spec(path, override_table(GOOD, {"train": {"loss": "hinge"}}))
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


BASELINE_FROM_THE_RUN = {
    "name": "wid",
    "trainer": "resnet18",
    "train": {"loss": "ce", "dataset": "tiny-imagenet", "epochs": 1, "width": 6, "batch_size": 40},
    "datasets": {"digits": {"width": 8}},
    "search": {"width": {"type": "int", "low": 4, "high": 8}},
    "pruner": {"type": "none"},
}


def test_the_implicit_baseline_takes_the_value_of_the_runs_dataset() -> None:
    """A searched parameter that [baseline] leaves out trains, in trial 0, what the run's
    config gives it: the [datasets.NAME] override on that dataset, [train] elsewhere."""
    from dlops.spec import parse_spec

    spec = parse_spec(BASELINE_FROM_THE_RUN)
    assert spec.baseline_params() == {"width": 6}
    assert spec.baseline_params("digits") == {"width": 8}
    assert spec.baseline_params("stl10") == {"width": 6}
    assert spec.config("digits", spec.baseline_params("digits")).width == 8


def test_cli_refuses_a_run_whose_implicit_baseline_lies_outside_its_range(tmp_path: Path, dlops_home: Path) -> None:
    """Caught when the spec loads for the datasets it names; on another dataset, when the run
    is checked: one line, exit 2, no study (Optuna only warned, and trial 0 trained the value)."""
    path = write_spec(
        tmp_path / "wide.toml", override_table(BASELINE_FROM_THE_RUN, {"datasets": {"digits": {"width": 16}}})
    )
    args = ["study", "run", str(path), "--dataset", "digits", "--subset-per-class", "10", "--n-trials", "1"]
    assert refused_run(args, dlops_home) == [
        "error: wide.toml: the baseline (trial 0) on digits would train width = 16 ([datasets.digits]), outside "
        "[search.width] (4..8): add width to [baseline] or widen the range"
    ]

    # tiny-imagenet (the spec's own) and digits are in range; stl10 trains [train]'s width
    path = write_spec(
        tmp_path / "own.toml",
        override_table(
            BASELINE_FROM_THE_RUN,
            {"train": {"width": 12}, "datasets": {"tiny-imagenet": Add({"width": 6})}},
        ),
    )
    load_spec(str(path))
    assert refused_run(["study", "run", str(path), "--dataset", "stl10", "--n-trials", "1"], dlops_home) == [
        "error: own.toml: the baseline (trial 0) on stl10 would train width = 12 ([train]), outside "
        "[search.width] (4..8): add width to [baseline] or widen the range"
    ]


def test_cli_refuses_a_run_whose_epochs_a_searched_range_exceeds(tmp_path: Path, dlops_home: Path) -> None:
    """`--epochs 1` with warmup_epochs searched up to 4: one line before any study, where every
    trial that drew more than 1 failed (and the run gave up after three)."""
    table = override_table(
        GOOD, {"train": {"epochs": 5}, "search": {"warmup_epochs": Add({"type": "int", "low": 0, "high": 4})}}
    )
    path = write_spec(tmp_path / "warm.toml", table)
    load_spec(str(path))  # its own 5 epochs can train the whole range
    args = ["study", "run", str(path), "--epochs", "1", "--subset-per-class", "10", "--n-trials", "2"]
    assert refused_run(args, dlops_home) == [
        "error: warm.toml: [search.warmup_epochs]: high = 4 is not a value this run can use (warmup_epochs = 4 "
        "is more than the 1 epochs of the run: its lr would never reach lr)"
    ]


def test_cli_names_the_search_key_of_a_bad_parameter(tmp_path: Path, dlops_home: Path) -> None:
    """The table name in brackets is text, not rich markup swallowed from the message."""
    path = tmp_path / "cat_empty.toml"
    write_spec(
        path,
        override_table(
            GOOD, {"search": {"lr": Replace({"type": "categorical", "choices": []})}, "baseline": {"lr": REMOVE}}
        ),
    )
    result = CliRunner().invoke(app, ["study", "run", str(path)])
    assert result.exit_code == 2, result.output
    assert "cat_empty.toml: [search.lr]: categorical needs a non-empty list 'choices'" in result.output
    bad_metric = tmp_path / "nope.toml"
    write_spec(bad_metric, override_table(GOOD, {"metric": Add("val_nope")}))
    result = CliRunner().invoke(app, ["study", "run", str(bad_metric), "--n-trials", "1"])
    assert result.exit_code == 2 and "metric must name a validation metric" in result.output
    assert "Traceback" not in result.output and not (dlops_home / "dlops.db").exists()


def test_cli_rejects_unknown_loss_and_unknown_spec(dlops_home: Path) -> None:
    r = CliRunner().invoke(app, ["study", "run", "--loss", "arcface"])
    assert r.exit_code == 2 and "'arcface' is not one of 'ce', 'triplet', 'center'" in r.output
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

    from dlops.objective import suggest_params

    path = tmp_path / "cond.toml"
    path.write_text(CONDITIONAL)
    spec = load_spec(str(path))
    assert spec.baseline_params() == {"triplet_soft": False, "margin": 0.3}
    # the margin is dead where the baseline takes the soft margin
    assert load_spec(str(path), {"baseline": {"triplet_soft": True}}).baseline_params() == {"triplet_soft": True}
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
        ({"when": Replace({"lr": 0.1})}, "can only name a categorical parameter searched before it"),
        ({"when": {"triplet_soft": "no"}}, "is not one of its choices"),
        ({"when": 3}, "'when' must be a table"),
    ],
)
def test_bad_conditions_are_rejected_with_one_line(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(CONDITIONAL)
    with pytest.raises(SpecError) as info:
        load_spec(str(path), {"search": {"margin": change}})
    assert message in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------- overrides


def test_overrides_change_exactly_what_they_name(tmp_path: Path) -> None:
    table = spec_table(
        "resnet18-ce",
        {
            "name": "tiny-ce",
            "train": {"dataset": "digits", "width": Add(8)},
            "datasets": {"digits": {"epochs": 1, "width": REMOVE}},
            "pruner": Replace({"type": "none"}),
        },
    )
    builtin = spec_table("resnet18-ce")
    assert table["name"] == "tiny-ce" and table["pruner"] == {"type": "none"}
    assert table["train"] == {**builtin["train"], "dataset": "digits", "width": 8}
    assert table["datasets"]["digits"] == {"epochs": 1, "metric": "val_top1"}
    assert {k: v for k, v in table.items() if k not in ("name", "train", "datasets", "pruner")} == {
        k: v for k, v in builtin.items() if k not in ("name", "train", "datasets", "pruner")
    }
    spec = load_spec(str(write_spec(tmp_path / "tiny-ce.toml", table)))
    assert spec.name == "tiny-ce" and spec.config().width == 8 and spec.config().dataset == "digits"
    assert spec.config().epochs == 1 and spec.pruner == {"type": "none"}
    assert load_spec("resnet18-ce", {"train": {"width": Add(8)}}).config().width == 8
    assert load_spec("resnet18-ce").name == "resnet18-ce"  # the file itself is left alone


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train": {"widht": 8}}, "override of 'train.widht', which the spec does not have"),
        ({"nmae": "x"}, "override of 'nmae', which the spec does not have"),
        ({"search": {"lr": {"hihg": 1.0}}}, "override of 'search.lr.hihg'"),
        ({"datasets": {"mnist": {"epochs": 1}}}, "override of 'datasets.mnist'"),
        ({"train": {"width": REMOVE}}, "override of 'train.width', which the spec does not have"),
        ({"train": {"batch_size": Add(8)}}, "override adds 'train.batch_size', which the spec already has"),
        ({"train": {"dataset": Replace(REMOVE)}}, "cannot stand inside an added or replaced value"),
    ],
)
def test_an_override_of_a_key_the_spec_lacks_raises(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError) as info:
        load_spec("resnet18-ce", overrides)
    assert message in str(info.value) and "resnet18-ce.toml" in str(info.value)
    with pytest.raises(SpecError, match="which the spec"):
        spec_table("resnet18-ce", {"train": {"widht": 8}})


@pytest.mark.parametrize("name", builtin_specs())
def test_a_spec_table_written_as_toml_reads_back_the_same(name: str) -> None:
    table = spec_table(name)
    assert tomllib.loads(toml_text(table)) == table


def test_a_spec_file_that_is_not_utf8_is_one_line(tmp_path: Path, dlops_home: Path) -> None:
    path = tmp_path / "latin.toml"
    path.write_bytes(toml_text(GOOD).replace('name = "', 'name = "caf\xe9-').encode("latin-1"))
    for command in (["study", "run", str(path)], ["final", str(path), "--params", "baseline"]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2, result.output
        (line,) = result.output.strip().splitlines()
        assert f"{path}: not UTF-8 text (TOML files are UTF-8)" in line, line
    assert not dlops_home.exists()
