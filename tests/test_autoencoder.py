"""Greedy layer-wise autoencoder pretraining, the stacked classifier and its study.

Most tests use narrow hidden layers (the architecture, not the sizes, is under test)
and 20 digits per class, so a whole fit takes well under a second.
"""

from __future__ import annotations

import copy
import signal
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from typer.testing import CliRunner

import dlops.trainers.autoencoder as ae
from data_trees import write_stl10
from dlops.cli import app
from dlops.errors import DlopsError, SpecError
from dlops.io import load_checkpoint
from dlops.spec import load_spec, parse_spec
from dlops.storage import connect
from dlops.trainers.autoencoder import (
    AEConfig,
    StackedClassifier,
    fit,
    predict,
    validate_config,
)
from dlops.trainers.base import HISTORY_KEYS, NonFiniteLossError

SMALL = [32, 24, 20, 16, 12, 8]


def small_config(**changes) -> AEConfig:
    base = dict(
        dataset="digits",
        hidden_sizes=list(SMALL),
        subset_per_class=20,
        pretrain_epochs=2,
        epochs=2,
        batch_size=32,
        device="cpu",
        seed=3,
    )
    base.update(changes)
    return AEConfig(**base)


def encoder_state(module: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    return [copy.deepcopy(e.state_dict()) for e in module.encoders]


def pretraining_epoch(line: str) -> tuple[int, int]:
    """(layer, epoch from 0) of a pretraining progress line."""
    import re

    match = re.fullmatch(r"pretraining AE (\d+) epoch +(\d+)  train_mse [\d.]+  val_mse [\d.]+  \([\d.]+s\)", line)
    assert match, line
    return int(match.group(1)), int(match.group(2)) - 1


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------- the spec


def test_builtin_spec_baseline_is_the_original_setting() -> None:
    spec = load_spec("autoencoder")
    assert spec.trainer == "autoencoder" and spec.metric == "val_top1"
    baseline = spec.baseline_params()
    assert baseline == {**{f"pretrain_epochs_{k}": 10 for k in range(6)}, "lr": 1e-3}
    for dataset in ("stl10", "digits"):
        config = spec.config(dataset, baseline)
        assert config.dataset == dataset and config.pretrain_data == "train"
        assert config.hidden_sizes == [1024, 1000, 500, 256, 128, 64]
        assert config.layer_epochs() == [10] * 6 and config.epochs == 20 and config.lr == 1e-3
    assert spec.config().dataset == "stl10"
    # 0 pretraining epochs lie in every layer's search range
    assert all(spec.search[f"pretrain_epochs_{k}"].low == 0 for k in range(6))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"pretrain_data": "web"}, "unknown pretrain_data"),
        ({"pretrain_data": "unlabeled"}, "needs dataset stl10"),
        ({"hidden_sizes": [8, 4], "pretrain_epochs_3": 1}, "pretrain_epochs_3 is set"),
        ({"pretrain_epochs_2": -1}, "layer 2"),
        ({"hidden_sizes": []}, "hidden_sizes"),
        ({"dropout": 1.0}, "dropout"),
        ({"lr": 0.0}, r"lr must be a finite number in \(0, 1e\+30\], got 0.0"),
        # values the optimizer or the config could not take: one line each, not a traceback mid-run
        ({"lr": 1e308}, r"lr must be a finite number in \(0, 1e\+30\], got 1e\+308"),
        ({"weight_decay": float("inf")}, r"weight_decay must be a finite number >= 0, got inf"),
        ({"pretrain_lr": 1e31}, r"pretrain_lr must be a finite number in \(0, 1e\+30\]"),
        ({"lr": None}, "lr must be set: null is not a value of lr"),
    ],
)
def test_validate_config_rejects_unusable_settings(changes: dict, message: str) -> None:
    with pytest.raises(DlopsError, match=message):
        validate_config(small_config(**changes))


def test_spec_with_a_bad_autoencoder_setting_is_one_error() -> None:
    with pytest.raises(SpecError, match="pretrain_data"):
        parse_spec({"trainer": "autoencoder", "train": {"dataset": "digits", "pretrain_data": "unlabeled"}})


# --------------------------------------------------------------- greedy pretraining


def test_earlier_encoders_stay_frozen_while_layer_k_pretrains(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, list, list]] = []
    original = ae.pretrain_epoch

    def watched(stack, layer, loader, optimizer, epoch=0):
        before = copy.deepcopy(stack.state_dict())
        loss = original(stack, layer, loader, optimizer, epoch)
        calls.append((layer, before, copy.deepcopy(stack.state_dict())))
        return loss

    monkeypatch.setattr(ae, "pretrain_epoch", watched)
    fit(small_config(pretrain_epochs=2, epochs=1))
    assert [c[0] for c in calls] == [k for k in range(len(SMALL)) for _ in range(2)]
    for layer, before, after in calls:
        for name in before:
            k, changed = int(name.split(".")[1]), not torch.equal(before[name], after[name])
            # only autoencoder `layer` (its encoder and decoder) learns
            assert changed == (k == layer), (layer, name)


def test_classifier_starts_from_the_pretrained_encoders(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}
    original_pretrain, original_finetune = ae.pretrain_epoch, ae.finetune_epoch

    def pretrain(stack, layer, loader, optimizer, epoch=0):
        seen.setdefault("initial", encoder_state(stack))
        loss = original_pretrain(stack, layer, loader, optimizer, epoch)
        seen["pretrained"] = encoder_state(stack)
        return loss

    def finetune(model, loader, optimizer, epoch):
        seen.setdefault("classifier", encoder_state(model))  # before the first fine-tuning step
        return original_finetune(model, loader, optimizer, epoch)

    monkeypatch.setattr(ae, "pretrain_epoch", pretrain)
    monkeypatch.setattr(ae, "finetune_epoch", finetune)
    result = fit(small_config(pretrain_epochs=1, epochs=2))
    for k in range(len(SMALL)):
        assert same(seen["classifier"][k], seen["pretrained"][k]), k
        assert not same(seen["pretrained"][k], seen["initial"][k]), k  # pretraining did move them
        # ...and fine-tuning moved them on from there
        assert not same(result.model.encoders[k].state_dict(), seen["pretrained"][k]), k


def test_zero_epoch_layers_cost_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    layers: list[int] = []
    original = ae.pretrain_epoch

    def counted(stack, layer, loader, optimizer, epoch=0):
        layers.append(layer)
        return original(stack, layer, loader, optimizer, epoch)

    monkeypatch.setattr(ae, "pretrain_epoch", counted)
    config = small_config(pretrain_epochs=0, pretrain_epochs_0=3, pretrain_epochs_2=1, epochs=1)
    result = fit(config)
    assert layers == [0, 0, 0, 2]
    h = result.layer_history
    assert h["hidden_sizes"] == SMALL
    for k, n in enumerate([3, 0, 1, 0, 0, 0]):
        for key in ("train_loss", "val_loss", "epoch_seconds"):
            assert len(h[f"ae{k}_{key}"]) == n
        assert all(s > 0 for s in h[f"ae{k}_epoch_seconds"])
    per_epoch = result.pretrain_seconds_per_epoch
    assert per_epoch[1] is None and per_epoch[3:] == [None, None, None]
    assert per_epoch[0] == pytest.approx(sum(h["ae0_epoch_seconds"]) / 3)
    from dlops.report import markdown_table
    from dlops.trainers.autoencoder import layer_cost_table

    table = "\n".join(markdown_table(layer_cost_table(h)))
    assert "| X[1] | 24 | 0 | 0 (skipped) | 0.00 |" in table
    assert "| X[0] | 32 | 3 |" in table


def test_history_has_the_resnet_keys_and_reports_each_finetuning_epoch() -> None:
    reported: list[tuple[int, dict]] = []
    layer_epochs: list[tuple[int, int]] = []
    result = fit(
        small_config(pretrain_epochs=1, epochs=3),
        report=lambda e, m: reported.append((e, m)),
        progress=lambda line: layer_epochs.append(pretraining_epoch(line)),
    )
    assert set(result.history) == set(HISTORY_KEYS)
    assert {len(v) for v in result.history.values()} == {3}
    assert [e for e, _ in reported] == [0, 1, 2]
    assert result.metrics == reported[-1][1]
    assert layer_epochs == [(k, 0) for k in range(len(SMALL))]
    for k in range(len(SMALL)):
        assert result.layer_history[f"ae{k}_train_loss"][0] > 0
    attrs = result.extra_user_attrs["layer_history"]
    assert attrs["ae3_val_loss"] == result.layer_history["ae3_val_loss"]


def test_resume_from_checkpoints_gives_the_same_numbers(tmp_path: Path) -> None:
    config = small_config(pretrain_epochs=2, epochs=3, dropout=0.2)
    whole = fit(config)

    class Stop(Exception):
        pass

    def stop_at(layer: int, epoch: int):
        def callback(line: str):
            if pretraining_epoch(line) == (layer, epoch):
                raise Stop

        return callback

    ckpt = tmp_path / "ae.pt"
    with pytest.raises(Stop):  # in the middle of layer 2's pretraining
        fit(config, checkpoint_path=ckpt, progress=stop_at(2, 0))
    saved = load_checkpoint(ckpt)
    assert (saved["phase"], saved["epoch"]) == ("pretrain", -1)  # "epoch": fine-tuning epochs, as in ResNet18
    assert [len(saved["layer_history"][f"ae{k}_train_loss"]) for k in range(6)] == [2, 2, 1, 0, 0, 0]

    def stop_finetune(e, m):
        if e == 1:
            raise Stop

    with pytest.raises(Stop):  # in the middle of fine-tuning
        fit(config, checkpoint_path=ckpt, report=stop_finetune)
    assert load_checkpoint(ckpt)["epoch"] == 1
    reported: list[int] = []
    resumed = fit(config, checkpoint_path=ckpt, report=lambda e, m: reported.append(e))
    assert resumed.start_epoch == 2 and reported == [0, 1, 2]  # restored epochs are reported again

    for key in ("train_loss", "train_acc", "val_loss", "val_top1", "val_top5"):
        assert resumed.history[key] == whole.history[key], key
    for key, values in whole.layer_history.items():
        if not key.endswith("epoch_seconds"):
            assert resumed.layer_history[key] == values, key
    assert same(resumed.model.state_dict(), whole.model.state_dict())

    with pytest.raises(DlopsError, match=r"another configuration.*lr"):
        fit(config.replace(lr=0.01), checkpoint_path=ckpt)


def test_a_seed_resumed_mid_pretraining_says_which_epochs_it_restored(tmp_path: Path) -> None:
    """``resumed_from_epoch`` counts fine-tuning epochs; the pretraining epochs a run took
    from its checkpoint are recorded per layer (final.json's ``resumed_pretraining_epochs``)."""
    config = small_config(pretrain_epochs=2, epochs=1)

    class Stop(Exception):
        pass

    def stop_in_layer_2(line: str) -> None:
        if pretraining_epoch(line) == (2, 0):
            raise Stop

    ckpt = tmp_path / "ae.pt"
    with pytest.raises(Stop):
        fit(config, checkpoint_path=ckpt, progress=stop_in_layer_2)
    trained: list[tuple[int, int]] = []
    resumed = fit(config, checkpoint_path=ckpt, progress=lambda line: trained.append(pretraining_epoch(line)))
    assert trained == [(2, 1), (3, 0), (3, 1), (4, 0), (4, 1), (5, 0), (5, 1)]
    assert resumed.start_epoch == 0 and resumed.restored_layer_epochs == [2, 2, 1, 0, 0, 0]
    record = ae.AutoencoderTrainer().seed_record(resumed)
    assert record["resumed_pretraining_epochs"] == [2, 2, 1, 0, 0, 0]
    assert ae.AutoencoderTrainer().seed_record(fit(config))["resumed_pretraining_epochs"] == [0] * 6


def test_a_checkpoint_resumes_on_another_device_data_root_and_eval_batch_size(tmp_path: Path) -> None:
    config = small_config(pretrain_epochs=1, epochs=2)

    class Stop(Exception):
        pass

    def stop(e, m):
        raise Stop

    ckpt = tmp_path / "ae.pt"
    with pytest.raises(Stop):
        fit(config, checkpoint_path=ckpt, report=stop)
    moved = config.replace(data_root=str(tmp_path / "elsewhere"), eval_batch_size=7, device="cpu")
    resumed = fit(moved, checkpoint_path=ckpt)
    assert resumed.start_epoch == 1
    assert resumed.history["val_top1"] == fit(config).history["val_top1"]


def test_layer_activations_are_those_of_hidden_layer_x3() -> None:
    from dlops.trainers.autoencoder import layer_activations

    torch.manual_seed(0)
    mean, std = np.array([0.3]), np.array([0.2])
    model = StackedClassifier((1, 8, 8), SMALL, 10, mean=mean, std=std)
    images = np.random.default_rng(0).integers(0, 256, size=(7, 1, 8, 8), dtype=np.uint8)
    x = torch.from_numpy((images.astype(np.float32) / 255.0 - 0.3) / 0.2).flatten(1)
    for k in range(4):
        x = torch.relu(model.encoders[k][0](x))
    got = layer_activations(model, images, batch_size=3)
    assert got.shape == (7, SMALL[3])
    np.testing.assert_allclose(got, x.detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "features",
    ["np.zeros((60, 4))", "np.ones((60, 3))", "np.zeros((60, 1))", "np.random.default_rng(0).random((60, 1))"],
)
def test_tsne_of_a_dead_or_one_unit_layer_is_drawn(features: str) -> None:
    """A layer whose ReLUs are all dead (every activation the same) crashed the process
    (segmentation fault in scikit-learn's PCA-initialised t-SNE) after a reference run had
    trained; a one-unit layer was a traceback. In a child process, so a crash is a failure."""
    import subprocess
    import sys

    code = (
        "import numpy as np\n"
        "from dlops.trainers.autoencoder import tsne_embedding\n"
        f"points = tsne_embedding({features})\n"
        "assert points.shape == (60, 2) and np.isfinite(points).all(), points\n"
    )
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_digits_baseline_shape_learns_quickly() -> None:
    """A cheap stand-in for the full baseline (README: 0.967 test accuracy on digits
    after 10 epochs per layer and 20 of fine-tuning): the real hidden sizes, 1 epoch per
    layer and 3 fine-tuning epochs of 32-image batches already pass 0.90 (0.944)."""
    config = load_spec("autoencoder").config("digits", device="cpu")
    config = config.replace(pretrain_epochs=1, epochs=3, batch_size=32)
    assert config.hidden_sizes == [1024, 1000, 500, 256, 128, 64] and config.lr == 1e-3
    result = fit(config)
    test = result.dataset.test()
    accuracy = float(np.mean(predict(result.model, test.images) == test.labels))
    assert accuracy >= 0.90


# ----------------------------------------------------------------------- the study


def tiny_autoencoder_spec(
    tmp_path: Path, *, dataset: str = "digits", pretrain_data: str = "train", train: dict | None = None
) -> Path:
    """The built-in spec with narrow layers; the searched ranges and the baseline stay
    (``train``: more overrides of its ``[train]``)."""
    from dlops.spec import Add, override_table, spec_table
    from specs import write_spec

    table = spec_table(
        "autoencoder",
        {
            "name": "tiny-autoencoder",
            "train": {
                "hidden_sizes": SMALL,
                "dataset": dataset,
                "subset_per_class": Add(10),
                "pretrain_data": pretrain_data,
            },
        },
    )
    return write_spec(tmp_path / "tiny-autoencoder.toml", override_table(table, {"train": train or {}}))


def test_cli_study_runs_with_the_original_setting_first(tmp_path: Path, dlops_home: Path) -> None:
    spec_path = tiny_autoencoder_spec(tmp_path)
    out = CliRunner().invoke(
        app,
        ["study", "run", str(spec_path), "--dataset", "digits", "--n-trials", "3", "--epochs", "2", "--device", "cpu"],
    )
    assert out.exit_code == 0, out.output
    study = optuna.load_study(study_name="tiny-autoencoder", storage=f"sqlite:///{dlops_home / 'dlops.db'}")
    trials = study.get_trials()
    assert len(trials) == 3 and study.metric_names == ["val_top1"]
    first = trials[0]
    assert first.user_attrs["baseline"] is True
    assert first.params == {**{f"pretrain_epochs_{k}": 10 for k in range(6)}, "lr": 1e-3}
    for t in trials:
        assert t.state == optuna.trial.TrialState.COMPLETE
        layers = t.user_attrs["layer_history"]
        for k in range(6):
            n = t.params[f"pretrain_epochs_{k}"]
            assert len(layers[f"ae{k}_train_loss"]) == len(layers[f"ae{k}_val_loss"]) == n
            assert len(layers[f"ae{k}_epoch_seconds"]) == n
        assert {len(v) for v in t.user_attrs["history"].values()} == {2}
        assert t.value == t.user_attrs["history"]["val_top1"][-1]


# ----------------------------------------------------- STL-10 fixture, whole pipeline


def test_stl10_fixture_pipeline_pretrains_on_unlabeled_and_reports(tmp_path: Path, dlops_home: Path) -> None:
    from dlops.data.manage import prepare_dataset
    from dlops.data.stl10 import load_unlabeled
    from dlops.plots import plot_ae_losses, plot_class_accuracy, plot_tsne
    from dlops.trainers.autoencoder import class_accuracy, layer_activations, tsne_embedding, tsne_selection

    # the official binary layout (tests/data_trees.py), through the real prepare path
    tree, _ = write_stl10(tmp_path / "raw", train=100, test=70, unlabeled=40)
    prepare_dataset("stl10", raw=tree.parent, progress=False)  # into $DLOPS_HOME/data
    assert len(load_unlabeled()) == 40

    config = AEConfig(
        dataset="stl10",
        hidden_sizes=[48, 40, 32, 24, 16, 8],
        pretrain_data="unlabeled",
        pretrain_limit=32,
        pretrain_epochs=1,
        epochs=3,
        batch_size=16,
        device="cpu",
    )
    result = fit(config)
    assert result.dataset.image_shape == (3, 96, 96)
    assert result.model.encoders[0][0].in_features == 27_648
    # pretraining saw the 32 unlabeled images: 2 batches of 16 per epoch
    assert all(len(result.layer_history[f"ae{k}_train_loss"]) == 1 for k in range(6))

    test = result.dataset.test()
    predictions = predict(result.model, test.images)
    acc = class_accuracy(test.labels, predictions, result.dataset.class_names)
    assert list(acc)[:2] == ["airplane", "bird"]
    chosen = tsne_selection(test.labels, per_class=5)
    assert len(chosen) == 50
    features = layer_activations(result.model, test.images[chosen])
    assert features.shape == (50, 24)  # X[3] of these hidden sizes
    points = tsne_embedding(features, seed=0)
    assert points.shape == (50, 2) and np.isfinite(points).all()
    for name, fig in {
        "losses": plot_ae_losses(result.history, result.layer_history),
        "class_accuracy": plot_class_accuracy(acc),
        "tsne": plot_tsne(points, test.labels[chosen], result.dataset.class_names),
    }.items():
        fig.savefig(tmp_path / f"{name}.png", dpi=50)
        assert (tmp_path / f"{name}.png").stat().st_size > 1000

    # The same pretraining option through a study on the prepared fixture.
    from dlops.spec import Add

    spec_path = tiny_autoencoder_spec(
        tmp_path, dataset="stl10", pretrain_data="unlabeled", train={"subset_per_class": 5, "pretrain_limit": Add(16)}
    )
    out = CliRunner().invoke(
        app, ["study", "run", str(spec_path), "--n-trials", "1", "--epochs", "1", "--device", "cpu"]
    )
    assert out.exit_code == 0, out.output
    trial = optuna.load_study(study_name="tiny-autoencoder", storage=f"sqlite:///{dlops_home / 'dlops.db'}").trials[0]
    assert trial.user_attrs["config"]["pretrain_data"] == "unlabeled"
    assert len(trial.user_attrs["layer_history"]["ae5_train_loss"]) == 10


def test_stl10_study_without_the_cache_is_one_line(tmp_path: Path, dlops_home: Path) -> None:
    out = CliRunner().invoke(app, ["study", "run", "autoencoder", "--n-trials", "1", "--device", "cpu"])
    assert out.exit_code == 2
    assert "stl10 is not prepared" in out.output and "Traceback" not in out.output


def _pretraining_lines(out: str) -> list[str]:
    import re

    return re.findall(
        r"(?:\[w\d+\] )?trial +(\d+) +pretraining AE (\d) epoch +(\d+) +train_mse [\d.]+ +val_mse [\d.]+", out
    )


def test_study_run_prints_a_line_per_pretraining_epoch(tmp_path: Path, dlops_home: Path) -> None:
    spec_path = tiny_autoencoder_spec(tmp_path)
    out = CliRunner().invoke(
        app,
        ["study", "run", str(spec_path), "--dataset", "digits", "--n-trials", "1", "--epochs", "1", "--device", "cpu"],
    )
    assert out.exit_code == 0, out.output
    lines = _pretraining_lines(out.output)
    # the baseline: 10 epochs of each of the six layers, in order
    assert lines == [("0", str(k), str(e)) for k in range(6) for e in range(1, 11)]


def test_workers_print_a_line_per_pretraining_epoch(
    tmp_path: Path, dlops_home: Path, capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec_path = tiny_autoencoder_spec(tmp_path)
    url = f"journal://{tmp_path / 'study.log'}"
    out = CliRunner().invoke(
        app,
        [
            "study",
            "run",
            str(spec_path),
            "--dataset",
            "digits",
            "--n-trials",
            "2",
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--storage",
            url,
            "--workers",
            "2",
        ],
    )
    text = out.output + "".join(capfd.readouterr())
    assert out.exit_code == 0, text
    study = optuna.load_study(study_name="tiny-autoencoder", storage=connect(url).optuna)
    lines = _pretraining_lines(text)
    for t in study.get_trials():
        expected = sum(t.params[f"pretrain_epochs_{k}"] for k in range(6))
        assert len([line for line in lines if line[0] == str(t.number)]) == expected
    assert any(line.startswith("[w") and "pretraining AE" in line for line in text.splitlines())


class _PruneAtOnce(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


def test_pruned_trial_keeps_its_layer_history(tmp_path: Path, dlops_home: Path) -> None:
    from dlops.objective import RunOptions, make_objective

    spec = load_spec(str(tiny_autoencoder_spec(tmp_path))).for_dataset("digits")
    study = optuna.create_study(storage=None, direction="maximize", pruner=_PruneAtOnce())
    study.enqueue_trial({**{f"pretrain_epochs_{k}": k % 2 for k in range(6)}, "lr": 1e-3})
    objective = make_objective(spec, RunOptions(dataset="digits", epochs=2, device="cpu"))
    study.optimize(objective, n_trials=1)
    (trial,) = study.get_trials()
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert trial.user_attrs["device"] == {"device": "cpu"}  # what ran it, pruned or not
    assert {len(v) for v in trial.user_attrs["history"].values()} == {1}
    layers = trial.user_attrs["layer_history"]
    assert layers["hidden_sizes"] == SMALL
    for k in range(6):
        assert len(layers[f"ae{k}_train_loss"]) == len(layers[f"ae{k}_val_loss"]) == k % 2


def test_a_complete_trial_records_its_device(tmp_path: Path, dlops_home: Path) -> None:
    """Every trial records what ran it in user_attrs["device"], the autoencoder's too."""
    from dlops.objective import RunOptions, make_objective

    spec = load_spec(str(tiny_autoencoder_spec(tmp_path))).for_dataset("digits")
    study = optuna.create_study(storage=None, direction="maximize")
    study.enqueue_trial({**{f"pretrain_epochs_{k}": 0 for k in range(6)}, "lr": 1e-3})
    study.optimize(make_objective(spec, RunOptions(dataset="digits", epochs=1, device="cpu")), n_trials=1)
    (trial,) = study.get_trials()
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert trial.user_attrs["device"] == {"device": "cpu"}


def test_a_stop_asked_for_during_pretraining_stops_the_trial_at_that_epoch(tmp_path: Path, dlops_home: Path) -> None:
    """Ctrl-C in a study while an autoencoder pretrains: the trial stops after the
    pretraining epoch in progress (checkpointed, queued to resume), not after the rest of
    the pretraining and a fine-tuning epoch (hours on STL-10)."""
    from dlops.objective import RunOptions, checkpoint_path, make_objective
    from dlops.stopping import GracefulStop, TrialInterrupted

    spec = load_spec(str(tiny_autoencoder_spec(tmp_path))).for_dataset("digits")
    study = optuna.create_study(study_name="stopped", storage=None, direction="maximize")
    study.enqueue_trial({**{f"pretrain_epochs_{k}": 2 for k in range(6)}, "lr": 1e-3})
    stop = GracefulStop()  # not entered: the test plays the signal's part
    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        if "pretraining AE 1 epoch   1" in line:
            stop.signum = signal.SIGINT

    objective = make_objective(spec, RunOptions(dataset="digits", epochs=2, device="cpu"), stop=stop, say=say)
    study.optimize(objective, n_trials=1, catch=(TrialInterrupted,))
    (trial,) = study.get_trials()
    assert trial.state == optuna.trial.TrialState.FAIL
    assert trial.user_attrs["stopped_reason"] == (
        "interrupted after pretraining AE 1 epoch 1; queued again to resume from its checkpoint"
    )
    assert [pretraining_epoch(line[line.index("pretraining") :]) for line in lines] == [(0, 0), (0, 1), (1, 0)]
    saved = load_checkpoint(checkpoint_path("stopped", 0))
    assert saved["phase"] == "pretrain" and saved["history"]["train_loss"] == []
    assert [len(saved["layer_history"][f"ae{k}_train_loss"]) for k in range(6)] == [2, 1, 0, 0, 0, 0]


def test_the_test_figures_count_one_set_of_predictions() -> None:
    """Accuracy, top-1, top-5, loss and the per-class table come from one pass over the test
    split: a model whose outputs differ from pass to pass (as a bf16 pass and a float32
    pass do on a GPU) still gives an accuracy equal to its top-1 and to the class-weighted
    per-class accuracies."""
    from dlops.data.base import Split

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(300, 1, 4, 4), dtype=np.uint8)
    labels = rng.integers(0, 10, size=300)
    model = StackedClassifier((1, 4, 4), [8], 10)

    class Jittery(StackedClassifier):
        def forward(self, x):
            embedding, logits = super().forward(x)
            return embedding, logits + torch.randn_like(logits)  # every pass ranks anew

    jittery = Jittery((1, 4, 4), [8], 10)
    jittery.load_state_dict(model.state_dict())
    names = [f"c{i}" for i in range(10)]
    figures = ae._test_figures(jittery, names, Split(images, labels), batch_size=64)
    counts = np.bincount(labels, minlength=10)
    weighted = sum(figures["class_accuracy"][n] * c for n, c in zip(names, counts, strict=True)) / len(labels)
    assert figures["test_accuracy"] == figures["test_top1"] == pytest.approx(weighted, abs=1e-12)
    assert 0 < figures["test_top1"] <= figures["test_top5"] < 1 and np.isfinite(figures["test_loss"])
    # Without the jitter the figures are what the model predicts.
    plain = ae._test_figures(model, names, Split(images, labels), batch_size=64)
    assert plain["test_top1"] == pytest.approx(float(np.mean(predict(model, images) == labels)))


def test_a_diverging_pretraining_names_pretrain_lr_not_the_finetuning_lr() -> None:
    """A NaN reconstruction loss comes from pretrain_lr: the error names the stage and that
    setting, so `dlops final` does not send the user to the fine-tuning lr."""
    config = small_config(pretrain_lr=1e20, lr=1e-3, pretrain_epochs=3)
    with pytest.raises(NonFiniteLossError, match=r"in the pretraining of AE \d") as caught:
        fit(config)
    assert caught.value.lr_setting == "pretrain_lr"
    # counted from 1, as the progress lines ("pretraining AE 0 epoch   1") count them
    assert f"at epoch {caught.value.epoch + 1}, step {caught.value.step + 1}" in str(caught.value)
    with pytest.raises(NonFiniteLossError) as caught:  # fine-tuning: the fine-tuning lr
        fit(small_config(lr=1e20, pretrain_epochs=0))
    assert caught.value.lr_setting == "lr" and "pretraining" not in str(caught.value)


def test_final_says_which_lr_diverged(tmp_path: Path, dlops_home: Path) -> None:
    params = tmp_path / "p.json"
    params.write_text('{"hidden_sizes": [16, 8], "pretrain_epochs": 2, "pretrain_lr": 1e20}')
    args = ["final", "autoencoder", "--dataset", "digits", "--params", str(params), "--epochs", "1"]
    result = CliRunner().invoke(app, [*args, "--subset-per-class", "20", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "(pretrain_lr 1e+20 too high?)" in result.output and "(lr 0.001" not in result.output


def test_the_report_names_the_layer_the_tsne_shows(tmp_path: Path, dlops_home: Path) -> None:
    """A stack of other hidden sizes: report.md and index.md caption tsne.png with the layer
    it shows (once always "the 256-unit hidden layer X[3]", whatever the stack)."""
    params = tmp_path / "p.json"
    params.write_text('{"hidden_sizes": [16, 8], "pretrain_epochs": 1}')
    args = ["final", "autoencoder", "--dataset", "digits", "--params", str(params), "--epochs", "1"]
    result = CliRunner().invoke(app, [*args, "--subset-per-class", "20", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    caption = "t-SNE of the 8-unit hidden layer X[1] (the last: the stack has 2 hidden layers), test images"
    report = (dlops_home / "reports" / "autoencoder" / "report.md").read_text()
    assert f"![{caption}](tsne.png)" in report and "256-unit" not in report
    result = CliRunner().invoke(app, ["report"])
    assert result.exit_code == 0, result.output
    index = (dlops_home / "reports" / "index.md").read_text()
    assert f"![{caption}](autoencoder/tsne.png)" in index and "256-unit" not in index
