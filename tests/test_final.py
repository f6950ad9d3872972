"""`dlops final`: reference runs from a study's best trial, the baseline or a file;
the test split read once per seed and never by a study; exact resumption; final.json
figures equal a recomputation from the saved weights; the dashboard sees the files."""

from __future__ import annotations

import io
import json
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from dlops import data as dlops_data
from dlops.data import DATASETS, forbid_test_split
from dlops.data.digits import load_digits_dataset
from dlops.errors import DlopsError
from dlops.final import FinalOptions, Interrupted, recompute_test_metrics, run_final

SEARCH = {
    "lr": 'type = "float"\nlow = 1e-3\nhigh = 1e-1\nlog = true',
    "margin": 'type = "float"\nlow = 0.05\nhigh = 1.0',
}


def write_spec(directory: Path, name: str, loss: str, dataset: str = "digits", params: tuple[str, ...] = ("lr",),
               final_epochs: int = 2, final_seeds: int = 2, study_epochs: int = 1) -> Path:
    """A ResNet18 spec small enough for a test: width 8, 10 images per class."""
    search = "\n".join(f"[search.{p}]\n{SEARCH[p]}" for p in params)
    baseline = "\n".join(f"{p} = {0.2 if p == 'margin' else 0.01}" for p in params)
    path = directory / f"{name}.toml"
    path.write_text(textwrap.dedent(f"""\
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
        """) + search + "\n")
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
    from dlops.search import RunOptions, run_study, state_counts
    from dlops.spec import load_spec

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
    final = run_final(str(spec_path), FinalOptions(device="cpu"), notify=messages.append)
    yield SimpleNamespace(root=root, home=root / "home", spec=spec_path, study=result.study, counts=counts,
                          loads_in_study=loads_in_study, loads_after_final=counter.loads, final=final,
                          messages=messages)
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
    assert final["params_source"] == {"kind": "trial", "study": "tiny-triplet", "trial": best.number,
                                      "value": best.value, "metric": "val_top5",
                                      "baseline": bool(best.user_attrs.get("baseline", False))}
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
    assert [e["weights"] for e in final["per_seed"]] == ["checkpoints/final/tiny-triplet/seed0/weights.pt",
                                                          "checkpoints/final/tiny-triplet/seed1/weights.pt"]


def test_final_writes_the_report_folder(studied):
    from PIL import Image

    out = studied.home / "reports" / "tiny-triplet"
    for name in ("final.json", "curves.png", "report.md", "study/optimization_history.png",
                 "study/intermediate_values.png", "study/slice.png", "study/param_importances.png",
                 "study/parallel_coordinate.png"):
        assert (out / name).is_file(), name
    for png in out.rglob("*.png"):
        with Image.open(png) as im:
            assert im.size[0] > 300 and im.size[1] > 200, png
    report = (out / "report.md").read_text()
    assert "![training curves](curves.png)" in report and "study/param_importances.png" in report
    assert f"{studied.final.final['mean']['test_top5']:.4f}" in report


def test_the_dashboard_shows_the_files_on_the_best_trial(studied, monkeypatch):
    """Through optuna-dashboard's own WSGI app: the best trial lists final.json and
    curves.png, and serves their bytes."""
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
    assert set(files) == {"final.json", "curves.png"}
    assert all(not t["artifacts"] for n, t in trials.items() if n != best)
    status, body = get(f"/artifacts/{study_id}/{trials[best]['trial_id']}/{files['final.json']['artifact_id']}")
    assert status.startswith("200")
    assert json.loads(body) == json.loads((studied.home / "reports" / "tiny-triplet" / "final.json").read_text())


def test_a_second_final_replaces_the_trial_attachments(studied, monkeypatch):
    from dlops.report import attach_artifacts

    monkeypatch.setenv("DLOPS_HOME", str(studied.home))
    out = studied.home / "reports" / "tiny-triplet"
    before = set(p.name for p in (studied.home / "artifacts").iterdir())
    ids = attach_artifacts(studied.study, [out / "curves.png"], trial_number=studied.study.best_trial.number,
                           tag="tiny-triplet")
    after = set(p.name for p in (studied.home / "artifacts").iterdir())
    assert after == set(ids) | (before - set(studied.final.artifacts))
    # restore the fixture's state for any later test
    studied.final.artifacts = attach_artifacts(studied.study, [out / "final.json", out / "curves.png"],
                                               trial_number=studied.study.best_trial.number, tag="tiny-triplet")


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
    resumed = run_final(spec, FinalOptions(params="baseline", device="cpu", resume=True),
                        on_epoch=lambda s, e, m, restored: restored and restored_epochs.append((s, e))).final
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
    fresh = run_final(spec, FinalOptions(params="baseline", device="cpu"), notify=messages.append).final
    assert fresh["per_seed"][0]["resumed_from_epoch"] == 0 and fresh["per_seed"][0]["epochs_trained"] == 2
    assert any("discarded" in m for m in messages)
    with pytest.raises(Interrupt):
        run_final(spec, FinalOptions(params="baseline", device="cpu"), on_epoch=stop)
    with pytest.raises(DlopsError, match="epochs=2.*epochs=3"):
        run_final(spec, FinalOptions(params="baseline", device="cpu", epochs=3, resume=True))


def test_params_from_a_json_file(tmp_path, monkeypatch):
    spec = str(write_spec(tmp_path, "tiny-ce", "ce", final_epochs=1, final_seeds=1))
    monkeypatch.setenv("DLOPS_HOME", str(tmp_path / "home"))
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"lr": 0.05}))
    final = run_final(spec, FinalOptions(params=str(params), device="cpu")).final
    assert final["params"] == {"lr": 0.05} and final["config"]["lr"] == 0.05
    assert final["params_source"] == {"kind": "file", "path": str(params)}
    # an earlier final.json can be given back as the params file
    again = run_final(spec, FinalOptions(params=str(tmp_path / "home/reports/tiny-ce/final.json"), device="cpu")).final
    assert again["params"] == {"lr": 0.05} and again["mean"] == final["mean"]
    params.write_text(json.dumps({"learning_rate": 0.05}))
    with pytest.raises(DlopsError, match="learning_rate"):
        run_final(spec, FinalOptions(params=str(params), device="cpu"))


def test_cli_final_baseline_on_fresh_storage(dlops_home):
    from dlops.cli import app

    result = CliRunner().invoke(app, ["final", "--params", "baseline", "--loss", "ce", "--dataset", "digits",
                                      "--epochs", "1", "--seeds", "1", "--subset-per-class", "5", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "test_top5" in result.output and "no study 'resnet18-ce-digits'" in result.output
    final = json.loads((dlops_home / "reports" / "resnet18-ce" / "final.json").read_text())
    assert final["params_source"] == {"kind": "baseline"} and final["params"] == {"lr": 0.001}
    assert final["config"]["width"] == 64 and final["epochs"] == 1 and final["study"] is None
    assert (dlops_home / "reports" / "resnet18-ce" / "curves.png").is_file()
    assert not (dlops_home / "reports" / "resnet18-ce" / "study").exists()


@pytest.mark.parametrize("args, message", [
    (["final", "--loss", "ce"], "no study named 'resnet18-ce'"),
    (["final", "--loss", "ce", "--params", "nope.json"], "no such file"),
    (["final", "--loss", "hinge"], "unknown loss"),
    (["final", "--loss", "ce", "--params", "baseline", "--dataset", "mnist"], "unknown dataset"),
])
def test_cli_final_user_errors_are_one_line(dlops_home, args, message):
    from dlops.cli import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert not (dlops_home / "reports").exists()


def write_ae_spec(directory: Path) -> Path:
    path = directory / "tiny-ae.toml"
    path.write_text(textwrap.dedent("""\
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
        """))
    return path


def test_final_autoencoder_writes_accuracy_per_class_tsne_and_losses(tmp_path, monkeypatch):
    monkeypatch.setenv("DLOPS_HOME", str(tmp_path / "home"))
    spec = str(write_ae_spec(tmp_path))
    layers: list[tuple[int, int, int]] = []
    result = run_final(spec, FinalOptions(params="baseline", device="cpu"),
                       on_layer_epoch=lambda seed, layer, epoch, m: layers.append((seed, layer, epoch)))
    final = result.final
    assert layers == [(0, 0, 0), (0, 1, 0), (0, 2, 0), (0, 3, 0)]  # pretraining progress, one epoch per layer
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
