"""`dlops final`: reference runs from a study's best trial, the baseline or a file;
the test split read once per seed and never by a study; exact resumption; final.json
figures equal a recomputation from the saved weights; the dashboard sees the files."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from typer.testing import CliRunner

from dlops import data as dlops_data
from dlops.data import DATASETS, forbid_test_split
from dlops.data.digits import load_digits_dataset
from dlops.errors import DlopsError
from dlops.final import FinalOptions, Interrupted, final_checkpoint_dir, recompute_test_metrics, run_final

SEARCH = {
    "lr": 'type = "float"\nlow = 1e-3\nhigh = 1e-1\nlog = true',
    "margin": 'type = "float"\nlow = 0.05\nhigh = 1.0',
}


def write_spec(
    directory: Path,
    name: str,
    loss: str,
    dataset: str = "digits",
    params: tuple[str, ...] = ("lr",),
    final_epochs: int = 2,
    final_seeds: int = 2,
    study_epochs: int = 1,
) -> Path:
    """A ResNet18 spec small enough for a test: width 8, 10 images per class."""
    search = "\n".join(f"[search.{p}]\n{SEARCH[p]}" for p in params)
    baseline = "\n".join(f"{p} = {0.2 if p == 'margin' else 0.01}" for p in params)
    path = directory / f"{name}.toml"
    path.write_text(
        textwrap.dedent(f"""\
        name = "{name}"
        description = "test spec {name}"
        trainer = "resnet18"
        n_trials = 3
        [train]
        loss = "{loss}"
        dataset = "{dataset}"
        epochs = {study_epochs}
        width = 8
        subset_per_class = 10
        batch_size = 40
        eval_batch_size = 256
        augment = true
        [final]
        epochs = {final_epochs}
        seeds = {final_seeds}
        [baseline]
        {baseline}
        [pruner]
        type = "none"
        """)
        + search
        + "\n"
    )
    return path


class CountedDigits:
    """digits, whose test split counts its loads (a read inside a study raises first)."""

    def __init__(self) -> None:
        self.loads = 0

    def __call__(self, root: Path | None = None):
        ds = load_digits_dataset()
        inner = ds.load_test

        def load_test():
            self.loads += 1
            return inner()

        ds.load_test = load_test
        return ds


@pytest.fixture(scope="module")
def studied(tmp_path_factory: pytest.TempPathFactory):
    """A 3-trial study of a two-parameter spec on a counted digits dataset, then
    `final` from its best trial with 2 seeds. Shared by the tests below."""
    from dlops.objective import RunOptions
    from dlops.runner import run_study
    from dlops.spec import load_spec
    from dlops.studies import state_counts

    root = tmp_path_factory.mktemp("final")
    mp = pytest.MonkeyPatch()
    mp.setenv("DLOPS_HOME", str(root / "home"))
    mp.delenv("DLOPS_STORAGE", raising=False)
    counter = CountedDigits()
    mp.setitem(DATASETS, "counted-digits", counter)
    spec_path = write_spec(root, "tiny-triplet", "triplet", dataset="counted-digits", params=("lr", "margin"))
    result = run_study(load_spec(str(spec_path)), RunOptions(device="cpu"))
    loads_in_study = counter.loads
    counts = state_counts(result.study)
    messages: list[str] = []
    final = run_final(str(spec_path), FinalOptions(device="cpu"), say=messages.append)
    yield SimpleNamespace(
        root=root,
        home=root / "home",
        spec=spec_path,
        study=result.study,
        counts=counts,
        loads_in_study=loads_in_study,
        loads_after_final=counter.loads,
        final=final,
        messages=messages,
    )
    mp.undo()


def test_no_study_trial_reads_the_test_split_and_final_reads_it_once_per_seed(studied):
    assert studied.counts["COMPLETE"] == 3 and studied.counts["FAIL"] == 0  # a read would have failed a trial
    assert studied.loads_in_study == 0
    assert studied.loads_after_final == 2  # two seeds, one read each
    sizes = studied.final.final["dataset"]["splits"]
    assert sizes == {"train": 100, "val": 100, "test": 359}


def test_the_test_split_guard_raises_inside_a_study():
    ds = load_digits_dataset()
    with forbid_test_split(), pytest.raises(dlops_data.TestSplitForbidden):
        ds.test()
    assert ds.test_reads == 0


def test_final_json_records_the_run(studied):
    final = json.loads((studied.home / "reports" / "tiny-triplet" / "final.json").read_text())
    best = studied.study.best_trial
    assert final["params"] == best.params
    assert final["params_source"] == {
        "kind": "trial",
        "study": "tiny-triplet",
        "trial": best.number,
        "value": best.value,
        "metric": "val_top5",
        "baseline": bool(best.user_attrs.get("baseline", False)),
    }
    assert final["seeds"] == [0, 1] and final["epochs"] == 2 and final["config"]["width"] == 8
    assert final["dataset"]["name"] == "counted-digits" and final["dataset"]["num_classes"] == 10
    for entry in final["per_seed"]:
        assert len(entry["history"]["val_top5"]) == 2 and entry["resumed_from_epoch"] == 0
        assert 0.0 <= entry["test_top1"] <= entry["test_top5"] <= 1.0
        assert entry["test_loss"] is None  # a triplet model has no classifier: no test cross-entropy
    tops = [e["test_top5"] for e in final["per_seed"]]
    assert final["mean"]["test_top5"] == pytest.approx(sum(tops) / 2)
    assert final["std"]["test_top5"] == pytest.approx(abs(tops[0] - tops[1]) / 2**0.5)
    assert final["versions"]["torch"] and final["versions"]["optuna"] and final["device"] == "cpu"
    assert final["wall_seconds"] > 0 and final["study"]["name"] == "tiny-triplet"


def test_final_json_figures_equal_a_recomputation_from_the_saved_weights(studied, monkeypatch):
    monkeypatch.setenv("DLOPS_HOME", str(studied.home))
    monkeypatch.setitem(DATASETS, "counted-digits", CountedDigits())
    path = studied.home / "reports" / "tiny-triplet" / "final.json"
    final = json.loads(path.read_text())
    again = recompute_test_metrics(path)
    for stored, recomputed in zip(final["per_seed"], again):
        assert recomputed["test_top1"] == stored["test_top1"]
        assert recomputed["test_top5"] == stored["test_top5"]
    # ...and the two seeds' weights differ, so the check compares something.
    run = final_checkpoint_dir("tiny-triplet").relative_to(studied.home)
    weights = [Path(e["weights"]) for e in final["per_seed"]]
    assert [(w.parent.parent.parent, w.parent.name, w.name) for w in weights] == [
        (run, "seed0", "weights.pt"),
        (run, "seed1", "weights.pt"),
    ]
    assert weights[0].parent.parent.name.startswith("run-") and (studied.home / weights[1]).is_file()


def test_final_writes_the_report_folder(studied):
    from PIL import Image

    out = studied.home / "reports" / "tiny-triplet"
    for name in (
        "final.json",
        "curves.png",
        "report.md",
        "study/optimization_history.png",
        "study/intermediate_values.png",
        "study/slice.png",
        "study/param_importances.png",
        "study/parallel_coordinate.png",
    ):
        assert (out / name).is_file(), name
    for png in out.rglob("*.png"):
        with Image.open(png) as im:
            assert im.size[0] > 300 and im.size[1] > 200, png
    report = (out / "report.md").read_text()
    assert "![training curves](curves.png)" in report and "study/param_importances.png" in report
    assert f"{studied.final.final['mean']['test_top5']:.4f}" in report


def test_the_dashboard_shows_the_files_on_the_best_trial(studied, monkeypatch):
    """Through optuna-dashboard's own WSGI app: the best trial lists final.json,
    curves.png and (a triplet run) triplet.png, and serves their bytes."""
    import optuna_dashboard
    from optuna.artifacts import FileSystemArtifactStore

    monkeypatch.setenv("DLOPS_HOME", str(studied.home))
    storage = studied.study._storage
    app = optuna_dashboard.wsgi(storage, artifact_store=FileSystemArtifactStore(str(studied.home / "artifacts")))

    def get(path: str) -> tuple[str, bytes]:
        from wsgiref.util import setup_testing_defaults

        environ: dict = {"PATH_INFO": path, "REQUEST_METHOD": "GET", "QUERY_STRING": "after=0"}
        setup_testing_defaults(environ)
        status = []
        body = b"".join(app(environ, lambda s, h, *a: status.append(s)))
        return status[0], body

    study_id = studied.study._study_id
    status, body = get(f"/api/studies/{study_id}")
    assert status.startswith("200")
    trials = {t["number"]: t for t in json.loads(body)["trials"]}
    best = studied.study.best_trial.number
    files = {a["filename"]: a for a in trials[best]["artifacts"]}
    assert set(files) == {"final.json", "curves.png", "triplet.png"}
    assert all(not t["artifacts"] for n, t in trials.items() if n != best)
    status, body = get(f"/artifacts/{study_id}/{trials[best]['trial_id']}/{files['final.json']['artifact_id']}")
    assert status.startswith("200")
    assert json.loads(body) == json.loads((studied.home / "reports" / "tiny-triplet" / "final.json").read_text())


def test_a_second_final_replaces_the_trial_attachments(studied, monkeypatch):
    from dlops.dashboard import attach_artifacts

    monkeypatch.setenv("DLOPS_HOME", str(studied.home))
    out = studied.home / "reports" / "tiny-triplet"
    before = set(p.name for p in (studied.home / "artifacts").iterdir())
    ids = attach_artifacts(
        studied.study, [out / "curves.png"], trial_number=studied.study.best_trial.number, tag="tiny-triplet"
    )
    after = set(p.name for p in (studied.home / "artifacts").iterdir())
    assert after == set(ids) | (before - set(studied.final.artifacts))
    # restore the fixture's state for any later test
    studied.final.artifacts = attach_artifacts(
        studied.study,
        [out / "final.json", out / "curves.png"],
        trial_number=studied.study.best_trial.number,
        tag="tiny-triplet",
    )


class Interrupt(Exception):
    pass


def test_resume_after_an_interruption_gives_the_same_numbers(tmp_path, monkeypatch):
    spec = str(write_spec(tmp_path, "tiny-ce", "ce", final_epochs=3, final_seeds=2))
    options = FinalOptions(params="baseline", device="cpu")
    monkeypatch.setenv("DLOPS_HOME", str(tmp_path / "uninterrupted"))
    whole = run_final(spec, options).final

    monkeypatch.setenv("DLOPS_HOME", str(tmp_path / "interrupted"))

    def kill_at(seed: int, epoch: int):
        def on_epoch(s: int, e: int, metrics: dict, restored: bool) -> None:
            if (s, e) == (seed, epoch):
                raise KeyboardInterrupt  # Ctrl-C, after the checkpoint of that epoch is written

        return on_epoch

    with pytest.raises(Interrupted, match="--resume continues"):
        run_final(spec, options, on_epoch=kill_at(1, 0))
    assert not (tmp_path / "interrupted" / "reports" / "tiny-ce" / "final.json").exists()
    restored_epochs: list[tuple[int, int]] = []
    resumed = run_final(
        spec,
        FinalOptions(params="baseline", device="cpu", resume=True),
        on_epoch=lambda s, e, m, restored: restored and restored_epochs.append((s, e)),
    ).final
    assert restored_epochs == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert [s["resumed_from_epoch"] for s in resumed["per_seed"]] == [3, 1]
    for a, b in zip(whole["per_seed"], resumed["per_seed"]):
        assert (a["test_top1"], a["test_top5"], a["test_loss"]) == (b["test_top1"], b["test_top5"], b["test_loss"])
        for key in ("train_loss", "train_acc", "val_loss", "val_top5"):
            assert a["history"][key] == b["history"][key]
    assert whole["mean"] == resumed["mean"]


def test_without_resume_a_stale_checkpoint_is_discarded_and_a_changed_config_is_refused(tmp_path, monkeypatch):
    spec = str(write_spec(tmp_path, "tiny-ce", "ce", final_epochs=2, final_seeds=1))
    monkeypatch.setenv("DLOPS_HOME", str(tmp_path / "home"))

    def stop(s: int, e: int, metrics: dict, restored: bool) -> None:
        if e == 0:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_final(spec, FinalOptions(params="baseline", device="cpu"), on_epoch=stop)
    messages: list[str] = []
    fresh = run_final(spec, FinalOptions(params="baseline", device="cpu"), say=messages.append).final
    assert fresh["per_seed"][0]["resumed_from_epoch"] == 0 and fresh["per_seed"][0]["epochs_trained"] == 2
    assert any("discarded" in m for m in messages)
    with pytest.raises(Interrupt):
        run_final(spec, FinalOptions(params="baseline", device="cpu"), on_epoch=stop)
    with pytest.raises(DlopsError, match=r"epochs=2.*epochs=3"):
        run_final(spec, FinalOptions(params="baseline", device="cpu", epochs=3, resume=True))


def test_params_from_a_json_file(tmp_path, monkeypatch):
    spec = str(write_spec(tmp_path, "tiny-ce", "ce", final_epochs=1, final_seeds=1))
    monkeypatch.setenv("DLOPS_HOME", str(tmp_path / "home"))
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"lr": 0.05}))
    final = run_final(spec, FinalOptions(params=str(params), device="cpu")).final
    assert final["params"] == {"lr": 0.05} and final["config"]["lr"] == 0.05
    assert final["params_source"] == {"kind": "file", "path": str(params)}
    # from another working directory, a relative path: final.json names the file itself
    monkeypatch.chdir(tmp_path)
    relative = run_final(spec, FinalOptions(params="params.json", device="cpu")).final
    assert relative["params_source"] == {"kind": "file", "path": str(params)}
    # an earlier final.json can be given back as the params file
    again = run_final(spec, FinalOptions(params=str(tmp_path / "home/reports/tiny-ce/final.json"), device="cpu")).final
    assert again["params"] == {"lr": 0.05} and again["mean"] == final["mean"]
    params.write_text(json.dumps({"learning_rate": 0.05}))
    with pytest.raises(DlopsError, match="learning_rate"):
        run_final(spec, FinalOptions(params=str(params), device="cpu"))


# One cheap reference run from the command line: the baseline of resnet18-ce, 1 epoch, 1 seed, 5 images a class.
BASELINE_FINAL = [
    "final",
    "--params",
    "baseline",
    "--loss",
    "ce",
    "--dataset",
    "digits",
    "--epochs",
    "1",
    "--seeds",
    "1",
    "--subset-per-class",
    "5",
]


def test_cli_final_baseline_on_fresh_storage(dlops_home):
    from dlops.cli import app

    result = CliRunner().invoke(app, [*BASELINE_FINAL, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "test_top5" in result.output and "no study 'resnet18-ce-digits'" in result.output
    final = json.loads((dlops_home / "reports" / "resnet18-ce" / "final.json").read_text())
    assert final["params_source"] == {"kind": "baseline"} and final["params"] == {"lr": 0.001}
    assert final["config"]["width"] == 16 and final["epochs"] == 1 and final["study"] is None  # [datasets.digits]
    assert (dlops_home / "reports" / "resnet18-ce" / "curves.png").is_file()
    assert not (dlops_home / "reports" / "resnet18-ce" / "study").exists()


def test_a_typo_of_a_seed_count_is_one_line_before_anything_is_built(dlops_home):
    """`--seeds 2000000000` built two billion configs (memory, minutes) before any check."""
    from data_trees import one_error_line
    from dlops.cli import app

    args = [*BASELINE_FINAL[:-4], "--seeds", "2000000000", "--device", "cpu"]
    line = one_error_line(CliRunner().invoke(app, args))
    assert line == "error: 2000000000 seeds: a reference run trains at most 1000 (each seed is a whole training run)"
    assert not (dlops_home / "reports").exists()


def test_final_baseline_trains_a_searched_setting_as_its_dataset_sets_it(tmp_path, dlops_home):
    """`--params baseline --dataset digits` of a spec that searches width and sets it in
    [datasets.digits]: the run trains that width (it trained [train]'s, 8)."""
    from dlops.cli import app
    from specs import write_spec as write_table

    table = {
        "name": "wid",
        "trainer": "resnet18",
        "train": {"loss": "ce", "dataset": "tiny-imagenet", "epochs": 1, "width": 8, "batch_size": 40},
        "datasets": {"digits": {"width": 6, "eval_batch_size": 64}},
        "search": {"width": {"type": "int", "low": 4, "high": 8}},
        "final": {"epochs": 1, "seeds": 1},
    }
    path = write_table(tmp_path / "wid.toml", table)
    args = ["final", str(path), "--params", "baseline", "--dataset", "digits", "--subset-per-class", "5"]
    result = CliRunner().invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    final = json.loads((dlops_home / "reports" / "wid" / "final.json").read_text())
    assert final["params"] == {"width": 6} and final["config"]["width"] == 6


def test_final_of_a_spec_refuses_another_specs_study(tmp_path, dlops_home):
    """`dlops final autoencoder --study-name S` where S is a ResNet study names the spec S
    belongs to (it said that trial 0 trained augment = True and the spec should be restored)."""
    from dlops.cli import app

    spec = write_spec(tmp_path, "tiny-ce", "ce")
    study = ["study", "run", str(spec), "--n-trials", "1", "--study-name", "shared", "--device", "cpu"]
    assert CliRunner().invoke(app, study).exit_code == 0
    result = CliRunner().invoke(app, ["final", "autoencoder", "--study-name", "shared", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        "error: study 'shared' belongs to the spec tiny-ce (trainer resnet18), not autoencoder: "
        "give that spec, or the --study-name of a study of autoencoder"
    ]
    assert not (dlops_home / "reports").exists()


def test_a_baseline_run_takes_no_other_specs_study(tmp_path, dlops_home):
    """`--params baseline` reads no trial, but a run attaches its files to its spec's study:
    another spec's study named with --study-name is refused; one that only shares the
    spec's name is not this run's (no plots of it, no files attached to it)."""
    from dlops.cli import app

    ce = write_spec(tmp_path, "tiny-ce", "ce")
    study = ["study", "run", str(ce), "--n-trials", "1", "--study-name", "tiny-center", "--device", "cpu"]
    assert CliRunner().invoke(app, study).exit_code == 0
    center = write_spec(tmp_path, "tiny-center", "center")
    args = ["final", str(center), "--params", "baseline", "--device", "cpu", "--epochs", "1"]
    result = CliRunner().invoke(app, [*args, "--study-name", "tiny-center"])
    assert result.exit_code == 2 and "belongs to the spec tiny-ce" in result.output, result.output
    assert not (dlops_home / "reports").exists()

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    final = json.loads((dlops_home / "reports" / "tiny-center" / "final.json").read_text())
    assert final["study"] is None
    assert not (dlops_home / "reports" / "tiny-center" / "study").exists()
    other = optuna.load_study(study_name="tiny-center", storage=f"sqlite:///{dlops_home / 'dlops.db'}")
    assert not {"curves.png", "final.json"} & set(_live_attachments(other))  # its own study plots stay


def test_the_original_configuration_reruns_with_a_constant_lr_and_no_weight_decay(dlops_home):
    """`dlops final resnet18-ce-original --params baseline` trains the original setup: the lr
    stays at 1e-3 through every epoch (resnet18-ce's cosine would lower it), and final.json
    records the settings that make it the original."""
    from dlops.cli import app

    args = ["final", "resnet18-ce-original", "--params", "baseline", "--dataset", "digits"]
    result = CliRunner().invoke(app, [*args, "--epochs", "3", "--subset-per-class", "5", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    final = json.loads((dlops_home / "reports" / "resnet18-ce-original" / "final.json").read_text())
    config = final["config"]
    assert (config["weight_decay"], config["lr_schedule"], config["augment"]) == (0.0, "constant", False)
    assert final["per_seed"][0]["history"]["lr"] == pytest.approx([1e-3] * 3)
    assert 0.0 <= final["per_seed"][0]["test_top5"] <= 1.0 and final["epochs"] == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["final", "--loss", "ce"], "no study named 'resnet18-ce'"),
        (["final", "--loss", "ce"], "run `dlops study run resnet18-ce` first"),
        (["final", "--loss", "ce", "--dataset", "digits"], "run `dlops study run resnet18-ce --dataset digits` first"),
        (
            ["final", "--loss", "ce", "--dataset", "digits", "--study-name", "mine"],
            "run `dlops study run resnet18-ce --dataset digits --study-name mine` first",
        ),
        (["final", "--loss", "ce", "--params", "nope.json"], "no such file"),
        (["final", "--loss", "ce", "--params", "."], "--params .: a directory, not a file"),
        (["final", "--loss", "hinge"], "'hinge' is not one of 'ce', 'triplet', 'center'"),
        (["final", "--loss", "ce", "--params", "baseline", "--dataset", "mnist"], "unknown dataset"),
    ],
)
def test_cli_final_user_errors_are_one_line(dlops_home, args, message):
    from dlops.cli import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert not (dlops_home / "reports").exists()


def test_cli_final_of_a_spec_file_without_its_study_names_the_file(dlops_home, tmp_path):
    """`dlops final ./my.toml` before any study: the command it suggests runs that file
    (`dlops study run my-ce`, the spec's name, was an unknown spec)."""
    from data_trees import one_error_line
    from dlops.cli import app
    from dlops.spec import spec_table
    from specs import write_spec

    spec = write_spec(tmp_path / "my spec.toml", spec_table("resnet18-ce", {"name": "my-ce"}))
    result = CliRunner().invoke(app, ["final", str(spec), "--dataset", "digits"])
    line = one_error_line(result)
    assert f"run `dlops study run '{spec}' --dataset digits` first" in line, line
    assert not (dlops_home / "reports").exists()


@pytest.mark.parametrize(
    "params, message",
    [
        ({"lr": "abc"}, "lr = 'abc' should be a number"),
        ({"lr": 0.01, "augment": 1}, "augment = 1 should be true or false"),
        ({"lr": 0.01, "width": 2.5}, "width = 2.5 should be an integer"),
    ],
)
def test_cli_final_refuses_a_params_file_of_the_wrong_types(dlops_home, tmp_path, params, message):
    from dlops.cli import app

    path = tmp_path / "params.json"
    path.write_text(json.dumps(params))
    result = CliRunner().invoke(app, ["final", "--loss", "ce", "--dataset", "digits", "--params", str(path)])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert not (dlops_home / "reports").exists()


def test_a_params_file_that_is_another_trainers_final_json_is_refused(dlops_home, tmp_path):
    """`final autoencoder --params <a resnet18-ce final.json>` took its lr silently."""
    from dlops.cli import app

    path = tmp_path / "final.json"
    path.write_text(json.dumps({"spec": "resnet18-ce", "trainer": "resnet18", "params": {"lr": 0.05}}))
    result = CliRunner().invoke(app, ["final", "autoencoder", "--dataset", "digits", "--params", str(path)])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        f"error: --params {path}: a reference run of spec 'resnet18-ce' (trainer resnet18), and autoencoder "
        "trains with autoencoder: its settings do not apply; give that spec"
    ]
    assert not (dlops_home / "reports").exists()


def test_a_final_json_with_no_params_retrains_the_spec_as_it_is(dlops_home, tmp_path):
    """A reference run of a spec that searches nothing has `"params": {}`; giving its
    final.json back trains the same settings (it was refused as "expected a JSON object")."""
    from dlops.cli import app

    path = tmp_path / "final.json"
    path.write_text(json.dumps({"spec": "resnet18-ce", "trainer": "resnet18", "params": {}}))
    args = ["final", "--loss", "ce", "--dataset", "digits", "--params", str(path), "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--epochs", "1", "--subset-per-class", "5"])
    assert result.exit_code == 0, result.output
    from dlops.spec import load_spec

    final = json.loads((dlops_home / "reports" / "resnet18-ce" / "final.json").read_text())
    assert final["params"] == {} and final["params_source"]["kind"] == "file"
    assert final["config"]["lr"] == load_spec("resnet18-ce").config("digits").lr


@pytest.mark.parametrize(
    "params, message",
    [
        # tracebacks from torch once (or a TypeError's words), after the run had started
        ({"weight_decay": -1}, "--params params.json: weight_decay must be a finite number >= 0, got -1"),
        ({"momentum": -1}, "--params params.json: momentum must be a finite number in [0, 1), got -1"),
        ({"lr": 1e308}, "--params params.json: lr must be a finite number in (0, 1e+30], got 1e+308"),
        ({"lr": None}, "--params params.json: lr must be set: null is not a value of lr"),
        ({"width": 0}, "--params params.json: width must be an integer >= 1, got 0"),
    ],
)
def test_cli_final_refuses_a_params_file_value_no_run_could_use(dlops_home, tmp_path, monkeypatch, params, message):
    from dlops.cli import app

    monkeypatch.chdir(tmp_path)
    Path("params.json").write_text(json.dumps(params))
    args = ["final", "--loss", "ce", "--dataset", "digits", "--params", "params.json", "--epochs", "1", "--seeds", "1"]
    result = CliRunner().invoke(app, [*args, "--subset-per-class", "5", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [f"error: {message}"]
    assert not dlops_home.exists()  # no lock, no checkpoint, no report


@pytest.mark.parametrize(
    "loss, params, message",
    [
        ("ce", {"lr": 0.01, "epochs": 1}, "'epochs' is not a setting a params file may change: use --epochs"),
        ("ce", {"seed": 7}, "'seed' is not a setting a params file may change: a run trains seeds 0..N-1"),
        ("ce", {"device": "cuda"}, "'device' is not a setting a params file may change: use --device"),
        ("ce", {"loss": "center"}, "'loss' is not a setting a params file may change: the spec defines it"),
        ("ce", {"dataset": "stl10"}, "'dataset' is not a setting a params file may change: use --dataset"),
        ("ce", {"subset_per_class": 3}, "use --subset-per-class"),
        ("ce", {"margin": 0.3}, "'margin' is read only by the triplet loss, and resnet18-ce trains the ce loss"),
        ("ce", {"samples_per_class": 8}, "'samples_per_class' is read only by the triplet loss"),
        ("center", {"triplet_soft": True}, "'triplet_soft' is read only by the triplet loss"),
        ("ce", {"triplet_mining": "weighted"}, "'triplet_mining' is read only by the triplet loss"),
        ("triplet", {"triplet_mining": "semi-hard"}, "unknown triplet_mining 'semi-hard' (hard, weighted)"),
        ("triplet", {"center_lambda": 0.1}, "'center_lambda' is read only by the center loss"),
    ],
)
def test_cli_final_refuses_params_the_run_would_ignore_or_misreport(dlops_home, tmp_path, loss, params, message):
    from dlops.cli import app

    path = tmp_path / "params.json"
    path.write_text(json.dumps(params))
    args = ["final", "--loss", loss, "--dataset", "digits", "--params", str(path), "--epochs", "1", "--seeds", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (dlops_home / "reports").exists()


def test_a_params_file_may_set_every_setting_of_the_specs_own_loss(dlops_home, tmp_path):
    from dlops.params import FinalOptions, choose_params
    from dlops.spec import load_spec

    settings = {
        "ce": {
            "lr": 0.01,
            "momentum": 0.8,
            "weight_decay": 0.0,
            "width": 8,
            "batch_size": 16,
            "eval_batch_size": 64,
            "lr_schedule": "constant",
            "augment": False,
            "warmup_epochs": 1,
            "embedding_dim": 32,
        },
        "triplet": {
            "margin": 0.3,
            "triplet_soft": True,
            "triplet_mining": "weighted",
            "samples_per_class": 2,
            "centroid_images_per_class": 5,
        },
        "center": {"center_lambda": 0.01, "center_alpha": 0.3},
    }
    for loss, params in settings.items():
        path = tmp_path / f"{loss}.json"
        path.write_text(json.dumps(params))
        chosen = choose_params(load_spec(f"resnet18-{loss}"), FinalOptions(params=str(path)), None)
        assert chosen.params == params


def write_ae_spec(directory: Path) -> Path:
    path = directory / "tiny-ae.toml"
    path.write_text(
        textwrap.dedent("""\
        name = "tiny-ae"
        trainer = "autoencoder"
        metric = "val_top1"
        [train]
        dataset = "digits"
        hidden_sizes = [16, 8, 8, 8]
        pretrain_epochs = 1
        epochs = 1
        batch_size = 32
        subset_per_class = 10
        [final]
        epochs = 2
        seeds = 1
        [search.lr]
        type = "float"
        low = 1e-4
        high = 1e-2
        log = true
        [baseline]
        lr = 1e-2
        """)
    )
    return path


def test_final_autoencoder_writes_accuracy_per_class_tsne_and_losses(tmp_path, monkeypatch):
    monkeypatch.setenv("DLOPS_HOME", str(tmp_path / "home"))
    spec = str(write_ae_spec(tmp_path))
    lines: list[tuple[int, str]] = []
    result = run_final(
        spec, FinalOptions(params="baseline", device="cpu"), progress=lambda seed, line: lines.append((seed, line))
    )
    final = result.final
    # pretraining progress, one epoch per layer
    layers = [(seed, *map(int, re.match(r"pretraining AE (\d) epoch +(\d+) ", line).groups())) for seed, line in lines]
    assert layers == [(0, 0, 1), (0, 1, 1), (0, 2, 1), (0, 3, 1)]
    out = tmp_path / "home" / "reports" / "tiny-ae"
    for name in ("final.json", "curves.png", "class_accuracy.png", "tsne.png", "ae_losses.png", "report.md"):
        assert (out / name).is_file(), name
    seed = final["per_seed"][0]
    assert set(final["class_accuracy"]) == {str(i) for i in range(10)}
    assert final["mean"]["test_accuracy"] == seed["test_accuracy"] == seed["test_top1"]
    # per-class accuracies weighted by the class sizes give the overall accuracy
    from collections import Counter

    sizes = Counter(int(y) for y in load_digits_dataset().test().labels)
    weighted = sum(seed["class_accuracy"][str(c)] * n for c, n in sizes.items()) / sum(sizes.values())
    assert weighted == pytest.approx(seed["test_accuracy"])
    assert len(seed["layer_history"]["ae0_train_loss"]) == 1
    again = recompute_test_metrics(out / "final.json")[0]
    assert again["test_accuracy"] == seed["test_accuracy"] and again["class_accuracy"] == seed["class_accuracy"]
    assert "Per-class test accuracy" in (out / "report.md").read_text()
    # pretraining learnt from the training split, all of it
    train = final["dataset"]["splits"]["train"]
    assert final["dataset"]["pretraining"] == {"split": "train", "images": train, "available": train}
    assert (
        f"| pretraining images | the training split's {train} images (labels unused) |"
        in (out / "report.md").read_text()
    )


def test_an_autoencoder_pretrained_on_stl10_s_unlabeled_images_says_so_in_its_report(tmp_path, dlops_home):
    """pretrain_data = 'unlabeled': final.json, report.md and index.md say which images
    pretraining learnt from and how many (the report read as if it were the training split)."""
    from data_trees import write_stl10
    from dlops.cli import app
    from dlops.data.manage import prepare_dataset

    tree, _ = write_stl10(tmp_path / "raw", train=100, test=20, unlabeled=40)
    prepare_dataset("stl10", raw=tree.parent, progress=False)
    path = write_ae_spec(tmp_path)
    text = path.read_text().replace('dataset = "digits"', 'dataset = "stl10"')
    text = text.replace("hidden_sizes = [16, 8, 8, 8]", 'hidden_sizes = [16, 8, 8, 8]\npretrain_data = "unlabeled"')
    path.write_text(text.replace("subset_per_class = 10", "subset_per_class = 5\npretrain_limit = 32"))
    final = run_final(str(path), FinalOptions(params="baseline", device="cpu", epochs=1)).final
    assert final["dataset"]["pretraining"] == {"split": "unlabeled", "images": 32, "available": 40}
    row = "| pretraining images | the first 32 of stl10's 40 unlabeled images |"
    assert row in (dlops_home / "reports" / "tiny-ae" / "report.md").read_text()
    result = CliRunner().invoke(app, ["report"])
    assert result.exit_code == 0, result.output
    assert row in (dlops_home / "reports" / "index.md").read_text()
    assert row in (dlops_home / "reports" / "tiny-ae" / "report.md").read_text()  # redrawn by the report


def test_final_autoencoder_of_a_one_unit_layer_writes_its_report(tmp_path, monkeypatch):
    """hidden_sizes = [16, 8, 8, 1]: the t-SNE of the one-unit X[3] was a traceback after
    training (PCA cannot make 2 components of 1 feature), and no report was written."""
    monkeypatch.setenv("DLOPS_HOME", str(tmp_path / "home"))
    path = write_ae_spec(tmp_path)
    path.write_text(path.read_text().replace("hidden_sizes = [16, 8, 8, 8]", "hidden_sizes = [16, 8, 8, 1]"))
    run_final(str(path), FinalOptions(params="baseline", device="cpu", epochs=1))
    out = tmp_path / "home" / "reports" / "tiny-ae"
    assert (out / "tsne.png").is_file() and (out / "final.json").is_file()


def test_final_autoencoder_resumes_from_another_data_root(tmp_path, monkeypatch):
    """The data root says where the files are, not what they are: a reference run
    interrupted on one machine resumes on another (final.py and the trainer agree)."""
    spec = str(write_ae_spec(tmp_path))
    monkeypatch.setenv("DLOPS_HOME", str(tmp_path / "whole"))
    whole = run_final(spec, FinalOptions(params="baseline", device="cpu")).final
    monkeypatch.setenv("DLOPS_HOME", str(tmp_path / "home"))

    def stop(seed: int, epoch: int, metrics: dict, restored: bool) -> None:
        if epoch == 0:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted):
        run_final(spec, FinalOptions(params="baseline", device="cpu"), on_epoch=stop)
    moved = FinalOptions(
        params="baseline", device="cpu", resume=True, train_overrides={"data_root": str(tmp_path / "elsewhere")}
    )
    resumed = run_final(spec, moved).final
    assert resumed["per_seed"][0]["resumed_from_epoch"] == 1
    assert resumed["config"]["data_root"] == str(tmp_path / "elsewhere")
    assert resumed["per_seed"][0]["test_accuracy"] == whole["per_seed"][0]["test_accuracy"]
    assert resumed["per_seed"][0]["history"] == whole["per_seed"][0]["history"] | {
        "epoch_seconds": resumed["per_seed"][0]["history"]["epoch_seconds"]
    }


def test_an_autoencoder_resumed_inside_pretraining_says_where_in_its_report(tmp_path, monkeypatch):
    """A seed resumed in pretraining layer 2 read "resumed at 0" in report.md (0 fine-tuning
    epochs came from its checkpoint); it names the pretraining epoch, as final.json records."""
    monkeypatch.setenv("DLOPS_HOME", str(tmp_path / "home"))
    path = write_ae_spec(tmp_path)
    path.write_text(path.read_text().replace("pretrain_epochs = 1", "pretrain_epochs = 2"))

    def stop_in_layer_2(seed: int, line: str) -> None:
        if line.startswith("pretraining AE 2 epoch   1 "):
            raise KeyboardInterrupt

    with pytest.raises(Interrupted):
        run_final(str(path), FinalOptions(params="baseline", device="cpu"), progress=stop_in_layer_2)
    final = run_final(str(path), FinalOptions(params="baseline", device="cpu", resume=True)).final
    seed = final["per_seed"][0]
    assert seed["resumed_pretraining_epochs"] == [2, 2, 1, 0] and seed["resumed_from_epoch"] == 0
    report = (tmp_path / "home" / "reports" / "tiny-ae" / "report.md").read_text()
    assert f"| {seed['epochs_trained']} (after pretraining AE 2 epoch 1) |" in report, report


# --------------------------------------------------------------------------- a run never loses the previous one


def _snapshot(home: Path, spec_name: str) -> dict:
    """The previous run as a reader sees it: its report files and the weights final.json names."""
    out = home / "reports" / spec_name
    final = json.loads((out / "final.json").read_text())
    return {
        "report": {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()},
        "weights": {e["weights"]: (home / e["weights"]).read_bytes() for e in final["per_seed"]},
    }


def _full_disk_torch_save(obj, f, *args, **kwargs):
    """torch.save on a full disk: part of the file, then ENOSPC."""
    import errno

    if isinstance(f, (str, Path)):
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 half a checkpoint")
    else:
        f.write(b"PK\x03\x04 half a checkpoint")
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("failure", ["bad device", "Ctrl-C", "diverged", "full disk"])
def test_a_failed_run_leaves_the_previous_run_whole(tmp_path, monkeypatch, failure):
    import torch

    from dlops.trainers.base import NonFiniteLossError

    spec = str(write_spec(tmp_path, "tiny-ce", "ce", final_epochs=2, final_seeds=2))
    home = tmp_path / "home"
    monkeypatch.setenv("DLOPS_HOME", str(home))
    good = run_final(spec, FinalOptions(params="baseline", device="cpu")).final
    before = _snapshot(home, "tiny-ce")

    def fail_in_seed_1(seed: int, epoch: int, metrics: dict, restored: bool) -> None:
        if seed == 1:
            raise KeyboardInterrupt if failure == "Ctrl-C" else NonFiniteLossError(epoch, 0, float("nan"))

    options = FinalOptions(params="baseline", device="tpu" if failure == "bad device" else "cpu")
    if failure == "full disk":
        monkeypatch.setattr(torch, "save", _full_disk_torch_save)
    with pytest.raises(DlopsError):
        run_final(spec, options, on_epoch=fail_in_seed_1 if failure in ("Ctrl-C", "diverged") else None)
    monkeypatch.undo()
    monkeypatch.setenv("DLOPS_HOME", str(home))

    assert _snapshot(home, "tiny-ce") == before  # report and weights untouched
    again = recompute_test_metrics(home / "reports" / "tiny-ce" / "final.json")
    assert [(s["test_top1"], s["test_top5"]) for s in again] == [
        (s["test_top1"], s["test_top5"]) for s in good["per_seed"]
    ]
    assert not list(home.rglob("*.tmp"))


def test_an_interrupted_run_resumes_and_only_then_replaces_the_previous_one(tmp_path, monkeypatch):
    spec = str(write_spec(tmp_path, "tiny-ce", "ce", final_epochs=2, final_seeds=2))
    home = tmp_path / "home"
    monkeypatch.setenv("DLOPS_HOME", str(home))
    first = run_final(spec, FinalOptions(params="baseline", device="cpu")).final
    before = _snapshot(home, "tiny-ce")

    def ctrl_c(seed: int, epoch: int, metrics: dict, restored: bool) -> None:
        if (seed, epoch) == (1, 0):
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match="previous reference run is untouched"):
        run_final(spec, FinalOptions(params="baseline", device="cpu", epochs=3), on_epoch=ctrl_c)
    assert _snapshot(home, "tiny-ce") == before
    resumed = run_final(spec, FinalOptions(params="baseline", device="cpu", epochs=3, resume=True)).final
    assert [s["resumed_from_epoch"] for s in resumed["per_seed"]] == [3, 1]
    assert resumed["epochs"] == 3 and first["epochs"] == 2
    # now the new run is in place, and the previous run's files are gone
    runs = list(final_checkpoint_dir("tiny-ce").glob("run-*"))
    assert len(runs) == 1 and all((home / s["weights"]).is_file() for s in resumed["per_seed"])
    assert not any((home / w).exists() for w in before["weights"])
    assert json.loads((home / "reports" / "tiny-ce" / "final.json").read_text())["epochs"] == 3
    assert not (home / "reports" / ".staging").exists() and not (final_checkpoint_dir("tiny-ce") / "staging").exists()


def test_cli_final_on_a_bad_device_touches_nothing(tmp_path, dlops_home):
    from dlops.cli import app

    args = BASELINE_FINAL
    assert CliRunner().invoke(app, [*args, "--device", "cpu"]).exit_code == 0
    before = _snapshot(dlops_home, "resnet18-ce")
    result = CliRunner().invoke(app, [*args, "--device", "tpu"])
    assert result.exit_code == 2 and "unknown device 'tpu'" in result.output
    assert "discarded" not in result.output and "Traceback" not in result.output
    assert _snapshot(dlops_home, "resnet18-ce") == before


def test_cli_final_on_a_full_disk_is_one_line_and_leaves_no_half_written_file(tmp_path, dlops_home, monkeypatch):
    import torch

    from dlops.cli import app

    args = [*BASELINE_FINAL, "--device", "cpu"]
    assert CliRunner().invoke(app, args).exit_code == 0
    before = _snapshot(dlops_home, "resnet18-ce")
    monkeypatch.setattr(torch, "save", _full_disk_torch_save)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output
    assert errors[0].startswith("error: no space left on device while writing ") and errors[0].endswith("checkpoint.pt")
    assert not list(dlops_home.rglob("*.tmp"))
    assert _snapshot(dlops_home, "resnet18-ce") == before


# --------------------------------------------------------------------------- one run of a spec at a time


def test_a_second_final_of_the_same_spec_is_refused_while_one_runs(tmp_path, monkeypatch):
    import os
    import signal
    import subprocess
    import sys

    spec = str(write_spec(tmp_path, "tiny-ce", "ce", final_epochs=1, final_seeds=1))
    monkeypatch.setenv("DLOPS_HOME", str(tmp_path / "home"))
    refused: list[str] = []

    def second_run(seed: int, epoch: int, metrics: dict, restored: bool) -> None:
        with pytest.raises(DlopsError, match="already running") as info:
            run_final(spec, FinalOptions(params="baseline", device="cpu"))
        refused.append(str(info.value))

    first = run_final(spec, FinalOptions(params="baseline", device="cpu"), on_epoch=second_run).final
    lock = final_checkpoint_dir("tiny-ce") / "lock"
    assert len(refused) == 1
    assert refused[0].startswith(f"another `dlops final` of tiny-ce is already running (pid {os.getpid()} on ")
    assert refused[0].endswith(f"; lock {lock}): wait for it to end")
    assert (tmp_path / "home" / first["per_seed"][0]["weights"]).is_file()  # the first run was not disturbed

    # A lock left by a process that died (kill -9) blocks nothing: the kernel released it.
    hold = (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX); "
        "print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold, str(lock)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(DlopsError, match="already running"):
        run_final(spec, FinalOptions(params="baseline", device="cpu"))
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert run_final(spec, FinalOptions(params="baseline", device="cpu")).final["per_seed"][0]["epochs_trained"] == 1


# --------------------------------------------------------------------------- damaged checkpoints, folder names


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_resume_discards_a_damaged_checkpoint_and_that_seed_starts_over(tmp_path, monkeypatch, damage):
    spec = str(write_spec(tmp_path, "tiny-ce", "ce", final_epochs=2, final_seeds=1))
    monkeypatch.setenv("DLOPS_HOME", str(tmp_path / "whole"))
    whole = run_final(spec, FinalOptions(params="baseline", device="cpu")).final
    monkeypatch.setenv("DLOPS_HOME", str(tmp_path / "home"))

    def ctrl_c(seed: int, epoch: int, metrics: dict, restored: bool) -> None:
        if epoch == 0:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted):
        run_final(spec, FinalOptions(params="baseline", device="cpu"), on_epoch=ctrl_c)
    [ckpt] = (tmp_path / "home" / "checkpoints" / "final").rglob("checkpoint.pt")
    data = ckpt.read_bytes()
    if damage == "truncate":
        ckpt.write_bytes(data[:5000])
    else:  # one byte of the weights, in place: the file still loads without a checksum
        garbled = bytearray(data)
        garbled[len(data) // 2] ^= 0x01
        ckpt.write_bytes(bytes(garbled))
    messages: list[str] = []
    resumed = run_final(spec, FinalOptions(params="baseline", device="cpu", resume=True), say=messages.append).final
    assert any(str(ckpt) in m and "discarded, this seed starts from epoch 0" in m for m in messages), messages
    seed = resumed["per_seed"][0]
    assert seed["resumed_from_epoch"] == 0 and seed["epochs_trained"] == 2
    for key in ("train_loss", "val_loss", "val_top5"):  # the same numbers as a run never interrupted
        assert seed["history"][key] == whole["per_seed"][0]["history"][key]
    assert (seed["test_top1"], seed["test_top5"]) == (
        whole["per_seed"][0]["test_top1"],
        whole["per_seed"][0]["test_top5"],
    )


def test_final_checkpoint_folders_cannot_collide_or_leave_the_home(dlops_home):
    root = dlops_home / "checkpoints" / "final"
    folders = {name: final_checkpoint_dir(name) for name in ("a/b", "a_b", "a", "../evil", "..")}
    assert len(set(folders.values())) == len(folders)
    assert all(f.parent == root for f in folders.values())
    assert folders["a/b"].name.startswith("a_b-") and folders["a_b"].name.startswith("a_b-")
    from dlops.final import report_staging_dir

    assert report_staging_dir("a/b") != report_staging_dir("a_b")


def _final_process(spec: Path, **popen):
    """`dlops final SPEC --params baseline --device cpu` in a process of its own, its output
    piped, line by line."""
    import os
    import subprocess
    import sys

    repo = str(Path(__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "dlops.cli", "final", str(spec), "--params", "baseline", "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **popen,
    )


def _signal_at_epoch_2(proc, signum: int) -> tuple[str, str]:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("seed 0  epoch   2"):
            proc.send_signal(signum)
            break
    return proc.communicate(timeout=300)


def test_sigterm_stops_final_like_ctrl_c_and_prints_the_resume_command(tmp_path, dlops_home):
    import shlex
    import signal

    from dlops.cli import app

    spec = write_spec(tmp_path, "tiny-ce", "ce", final_epochs=20, final_seeds=1)
    proc = _final_process(spec)
    out, err = _signal_at_epoch_2(proc, signal.SIGTERM)
    assert proc.returncode == 143, out + err
    assert "stopped by SIGTERM during seed 0" in err and "Traceback" not in err
    command = err.split("--resume continues:")[1].strip().splitlines()[0]
    assert command == f"dlops final {spec} --params baseline --device cpu --resume"
    result = CliRunner().invoke(app, shlex.split(command)[1:])
    assert result.exit_code == 0, result.output
    final = json.loads((dlops_home / "reports" / "tiny-ce" / "final.json").read_text())
    assert final["per_seed"][0]["resumed_from_epoch"] >= 2 and len(final["per_seed"][0]["history"]["val_top5"]) == 20


def test_sigint_stops_final_started_with_sigint_ignored_and_it_resumes(tmp_path, dlops_home):
    """A shell script's background job (`dlops final ... &`) starts with SIGINT ignored:
    `kill -INT` did nothing and the run trained on to the end. It stops as Ctrl-C does."""
    import shlex
    import signal

    from dlops.cli import app
    from dlops.final import staging_dir

    spec = write_spec(tmp_path, "tiny-ce", "ce", final_epochs=20, final_seeds=1)
    proc = _final_process(spec, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    out, err = _signal_at_epoch_2(proc, signal.SIGINT)
    assert proc.returncode == 130, out + err
    assert "stopped by SIGINT during seed 0" in err and "Traceback" not in err
    assert (staging_dir("tiny-ce") / "seed0" / "checkpoint.pt").is_file()
    assert not (dlops_home / "reports" / "tiny-ce").exists()
    command = err.split("--resume continues:")[1].strip().splitlines()[0]
    result = CliRunner().invoke(app, shlex.split(command)[1:])
    assert result.exit_code == 0, result.output
    final = json.loads((dlops_home / "reports" / "tiny-ce" / "final.json").read_text())
    assert final["per_seed"][0]["resumed_from_epoch"] >= 2 and len(final["per_seed"][0]["history"]["val_top5"]) == 20


def test_a_copied_tree_names_its_commit_from_the_environment(monkeypatch, tmp_path):
    """On a machine that got a copy of the tree without .git (the GPU machine), final.json's
    commit comes from $DLOPS_GIT_COMMIT; in a checkout, git's own answer wins."""
    import subprocess

    from dlops import versions as provenance

    in_checkout = provenance.git_commit()
    assert in_checkout is not None and re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", in_checkout)
    monkeypatch.setenv("DLOPS_GIT_COMMIT", "abc1234")
    assert provenance.git_commit() == in_checkout

    def no_checkout(*args, **kwargs):
        return subprocess.CompletedProcess(args, 128, "", "fatal: not a git repository")

    monkeypatch.setattr(provenance.subprocess, "run", no_checkout)
    assert provenance.git_commit() == "abc1234"
    monkeypatch.delenv("DLOPS_GIT_COMMIT")
    assert provenance.git_commit() is None


def test_a_run_says_which_reference_run_it_replaces(tmp_path, monkeypatch):
    spec = str(write_spec(tmp_path, "tiny-ce", "ce", final_epochs=1, final_seeds=2))
    monkeypatch.setenv("DLOPS_HOME", str(tmp_path / "home"))
    messages: list[str] = []
    first = run_final(spec, FinalOptions(params="baseline", device="cpu"), say=messages.append).final
    assert not any("replaces" in m for m in messages)
    messages.clear()
    run_final(spec, FinalOptions(params="baseline", device="cpu", seeds=1), say=messages.append)
    said = f"replaces the reference run of {first['created'][:16]} (digits, 1 epoch x 2 seeds) when this one finishes"
    assert said in messages


def test_after_resume_the_recorded_times_cover_the_whole_run(tmp_path, monkeypatch):
    import time

    spec = str(write_spec(tmp_path, "tiny-ce", "ce", final_epochs=3, final_seeds=2))
    monkeypatch.setenv("DLOPS_HOME", str(tmp_path / "home"))

    def slow_then_stop(s: int, e: int, metrics: dict, restored: bool) -> None:
        if (s, e) == (1, 0):
            raise KeyboardInterrupt
        time.sleep(0.4)  # the interrupted process spends >= 0.8 s on seed 0 before its last epoch ends

    with pytest.raises(Interrupted):
        run_final(spec, FinalOptions(params="baseline", device="cpu"), on_epoch=slow_then_stop)
    final = run_final(spec, FinalOptions(params="baseline", device="cpu", resume=True)).final
    seed0, seed1 = final["per_seed"]
    assert seed0["resumed_from_epoch"] == 3 and seed0["train_seconds"] >= 0.8
    assert seed0["earlier_seconds"] >= 0.8 and seed1["earlier_seconds"] > 0  # seed 1's epoch 0
    assert seed0["train_seconds"] >= sum(seed0["history"]["epoch_seconds"])
    assert final["wall_seconds"] >= seed0["train_seconds"] + seed1["train_seconds"]


def test_params_best_refuses_a_spec_edited_since_the_study(tmp_path, dlops_home):
    """`--params best` retrains what the best trial trained: after the spec's batch size
    changed, the run is refused in one line (it would train another recipe under the trial's
    name); a run on a subset study's full data, with other epochs, is what it is for."""
    from dlops.cli import app
    from dlops.spec import spec_table
    from specs import write_spec

    table = spec_table("resnet18-ce", {"name": "my-ce"})
    spec = write_spec(tmp_path / "my-ce.toml", table)
    runner = CliRunner()
    study = ["study", "run", str(spec), "--dataset", "digits", "--n-trials", "1", "--epochs", "1", "--device", "cpu"]
    assert runner.invoke(app, [*study, "--subset-per-class", "5"]).exit_code == 0
    final = ["final", str(spec), "--dataset", "digits", "--epochs", "2", "--device", "cpu"]

    table["train"]["batch_size"] = 32
    write_spec(spec, table)
    result = runner.invoke(app, final)
    assert result.exit_code == 2, result.output
    assert "trial 0 of study 'my-ce-digits' trained with batch_size = 128, the spec now gives batch_size = 32" in (
        result.output
    )
    assert not (dlops_home / "reports" / "my-ce").exists()

    table["train"]["batch_size"] = 128
    write_spec(spec, table)
    result = runner.invoke(app, [*final, "--subset-per-class", "10"])
    assert result.exit_code == 0, result.output
    done = json.loads((dlops_home / "reports" / "my-ce" / "final.json").read_text())
    assert done["params_source"]["kind"] == "trial" and done["config"]["subset_per_class"] == 10


def _live_attachments(study) -> list[str]:
    """The file names the dashboard lists on ``study`` and its trials (not deleted ones)."""
    attrs = study._storage.get_study_system_attrs(study._study_id)
    metas = [json.loads(v or "null") for k, v in attrs.items() if k.startswith(("artifacts:", "dashboard:artifacts:"))]
    return sorted(meta["filename"] for meta in metas if meta is not None)


@pytest.mark.parametrize("then", ["another study", "no study", "the same name in another storage"])
def test_a_replaced_reference_run_leaves_no_file_on_the_study_it_was_attached_to(tmp_path, monkeypatch, then):
    """The reference run's files once stayed on the dashboard page of the study an earlier
    run was attached to, after a run attached to another study had replaced it."""
    import optuna

    spec = str(write_spec(tmp_path, "tiny-ce", "ce", final_epochs=1, final_seeds=1))
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("DLOPS_HOME", str(home))
    monkeypatch.delenv("DLOPS_STORAGE", raising=False)
    first_url, second_url = f"sqlite:///{home / 'dlops.db'}", f"sqlite:///{home / 'dlops.db'}"
    first_name, second_name = "first", "second"
    if then == "the same name in another storage":
        second_url, second_name = f"sqlite:///{home / 'other.db'}", "first"
    for url, name in ((first_url, first_name), (second_url, second_name)):
        if then != "no study" or name == first_name:
            study = optuna.create_study(study_name=name, storage=url, direction="maximize")
            study.set_user_attr("spec", "tiny-ce")
            study.optimize(lambda t: t.suggest_float("lr", 1e-3, 1e-1, log=True), n_trials=1)

    def run(url: str, name: str) -> list[str]:
        options = FinalOptions(params="baseline", device="cpu", storage=url, study_name=name)
        return run_final(spec, options).artifacts

    first_ids = run(first_url, first_name)
    first = optuna.load_study(study_name=first_name, storage=first_url)
    assert _live_attachments(first) == ["curves.png", "final.json"]
    second_ids = run(second_url, second_name)

    assert _live_attachments(first) == []
    assert not [i for i in first_ids if (home / "artifacts" / i).exists()]
    if then != "no study":
        second = optuna.load_study(study_name=second_name, storage=second_url)
        assert _live_attachments(second) == ["curves.png", "final.json"]
        assert all((home / "artifacts" / i).exists() for i in second_ids)


def test_the_replaced_runs_files_stay_on_a_storage_it_cannot_open_and_a_line_says_so(dlops_home):
    from dlops.final import withdraw_replaced

    said: list[str] = []
    previous = ("first", "postgresql://user:***@db.example/dlops")
    withdraw_replaced(previous, f"sqlite:///{dlops_home / 'dlops.db'}", None, "tiny-ce", said.append)
    assert said == [
        "the replaced reference run's files stay attached to study 'first' in "
        "postgresql://user:***@db.example/dlops: its password is not recorded"
    ]


def test_a_study_deleted_while_its_final_run_trains_leaves_a_whole_report(tmp_path, monkeypatch):
    """`dlops study delete` of the study a `dlops final --params best` run took its trial
    from, while that run trained, once ended the run in a KeyError traceback after all its
    training, with no report written."""
    from dlops.removal import delete_study
    from dlops.storage import connect

    spec = str(write_spec(tmp_path, "tiny-ce", "ce", final_epochs=1, final_seeds=1))
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("DLOPS_HOME", str(home))
    monkeypatch.delenv("DLOPS_STORAGE", raising=False)
    url = f"sqlite:///{home / 'dlops.db'}"

    study = optuna.create_study(study_name="tiny-ce", storage=url, direction="maximize")
    study.set_user_attr("spec", "tiny-ce")
    study.optimize(lambda t: t.suggest_float("lr", 1e-3, 1e-1, log=True), n_trials=1)

    def delete_it(seed, epoch, metrics, restored) -> None:  # what a second terminal does meanwhile
        delete_study(connect(url), "tiny-ce")

    said: list[str] = []
    result = run_final(spec, FinalOptions(device="cpu", storage=url), on_epoch=delete_it, say=said.append)

    final = json.loads((home / "reports" / "tiny-ce" / "final.json").read_text())
    assert final["params_source"]["study"] == "tiny-ce" and final["study"]["name"] == "tiny-ce"
    assert (home / "reports" / "tiny-ce" / "report.md").exists()
    assert result.artifacts == [] and not list((home / "artifacts").glob("*"))
    assert "study 'tiny-ce' was deleted during this run: study plots and artifacts skipped" in said


@pytest.mark.parametrize(
    "error, asked",
    [
        (
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
            "to allocate 360000000000 bytes. Error code 12 (Cannot allocate memory)",
            "tried to allocate 360000000000 bytes",
        ),
        (
            "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 139.8 GiB",
            "tried to allocate 20.00 GiB",
        ),
    ],
)
def test_cli_final_out_of_memory_is_one_line_and_leaves_the_previous_run_whole(dlops_home, monkeypatch, error, asked):
    """A params file with an absurd width (`{"width": 100000}`) once ended `dlops final` in
    torch's allocator traceback."""
    import torch

    from dlops.cli import app
    from dlops.trainers import resnet

    args = [*BASELINE_FINAL, "--device", "cpu"]
    assert CliRunner().invoke(app, args).exit_code == 0
    before = _snapshot(dlops_home, "resnet18-ce")
    kind = torch.OutOfMemoryError if "CUDA" in error else RuntimeError

    def out_of_memory(*args, **kwargs):
        raise kind(error)

    monkeypatch.setattr(resnet, "fit", out_of_memory)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: seed 0 ran out of memory ({asked}): a smaller model or batch size needs less; the previous "
        "reference run is untouched"
    ]
    assert _snapshot(dlops_home, "resnet18-ce") == before


def test_an_unknown_dataset_and_a_params_file_wrong_for_the_run_s_dataset_are_one_line(
    tmp_path: Path, dlops_home: Path
) -> None:
    """An unknown --dataset is named as such (it was 'no study named autoencoder-nope: run
    `dlops study run autoencoder --dataset nope` first', a command that fails too); a params
    file is checked on the run's dataset, so its error names the file."""
    from data_trees import one_error_line
    from dlops.cli import app

    line = one_error_line(CliRunner().invoke(app, ["final", "autoencoder", "--dataset", "nope"]))
    assert line.startswith("error: unknown dataset 'nope' (known: ") and "digits, stl10, tiny-imagenet" in line
    params = tmp_path / "p.json"
    params.write_text('{"pretrain_data": "unlabeled"}')
    args = ["final", "autoencoder", "--dataset", "digits", "--params", str(params), "--epochs", "1"]
    line = one_error_line(CliRunner().invoke(app, args))
    assert line.startswith(f"error: --params {params}: pretrain_data = 'unlabeled' needs dataset stl10 (got 'digits')")
    assert line.endswith("set pretrain_data = 'train' for digits (in a spec, under [datasets.digits])"), line
    assert not (dlops_home / "reports").exists() and not (dlops_home / "checkpoints").exists()


def test_a_run_resumed_with_fewer_seeds_keeps_no_checkpoint_of_the_others(tmp_path, monkeypatch):
    """`dlops final --seeds 2` stopped during seed 1, then `--seeds 1 --resume`: the
    reference run's folder held run-*/seed1/checkpoint.pt, a half-trained seed that no
    final.json names. It goes once the run is complete, with a line; until then it stays."""
    spec = str(write_spec(tmp_path, "tiny-ce", "ce", final_epochs=2, final_seeds=2))
    home = tmp_path / "home"
    monkeypatch.setenv("DLOPS_HOME", str(home))

    def ctrl_c(seed: int, epoch: int, metrics: dict, restored: bool) -> None:
        if (seed, epoch) == (1, 0):
            raise KeyboardInterrupt

    with pytest.raises(Interrupted):
        run_final(spec, FinalOptions(params="baseline", device="cpu"), on_epoch=ctrl_c)
    seed1 = final_checkpoint_dir("tiny-ce") / "staging" / "seed1" / "checkpoint.pt"
    assert seed1.is_file()

    def ctrl_c_again(seed: int, epoch: int, metrics: dict, restored: bool) -> None:
        raise KeyboardInterrupt

    with pytest.raises(Interrupted):  # stopped again before it is complete: seed 1's checkpoint stays
        run_final(spec, FinalOptions(params="baseline", device="cpu", seeds=1, resume=True), on_epoch=ctrl_c_again)
    assert seed1.is_file()
    messages: list[str] = []
    final = run_final(spec, FinalOptions(params="baseline", device="cpu", seeds=1, resume=True), say=messages.append)
    assert final.final["seeds"] == [0]
    (run,) = final_checkpoint_dir("tiny-ce").glob("run-*")
    assert sorted(p.name for p in run.iterdir()) == ["seed0"]
    assert any("discarded the checkpoints of seed 1 of an interrupted run" in m for m in messages), messages
