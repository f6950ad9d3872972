"""The autoencoder's analysis: per-class accuracy, t-SNE selection, its report tables and plots."""

from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib.figure import Figure

from dlops.plots import plot_ae_losses, plot_class_accuracy, plot_tsne
from dlops.report import markdown_table
from dlops.trainers.autoencoder import TRAINER, class_accuracy, layer_seconds_per_epoch, tsne_embedding, tsne_selection

NAMES = [f"class{i}" for i in range(10)]


def test_class_accuracy_on_a_hand_made_case() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2])
    predictions = np.array([0, 1, 0, 1, 1, 0])
    acc = class_accuracy(labels, predictions, ["a", "b", "c", "d"])
    assert list(acc) == ["a", "b", "c", "d"]
    assert acc["a"] == pytest.approx(2 / 3) and acc["b"] == 1.0 and acc["c"] == 0.0
    assert math.isnan(acc["d"])  # no images of that class


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_class_accuracies_weighted_by_class_counts_give_the_overall_accuracy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.choice(10, size=997, p=rng.dirichlet(np.ones(10)))  # unbalanced classes
    predictions = np.where(rng.random(997) < 0.6, labels, rng.integers(0, 10, size=997))
    acc = class_accuracy(labels, predictions, NAMES)
    counts = np.bincount(labels, minlength=10)
    weighted = sum(acc[name] * counts[i] for i, name in enumerate(NAMES) if counts[i])
    assert weighted / counts.sum() == pytest.approx(float(np.mean(predictions == labels)), abs=1e-12)


def test_report_tables_list_every_class_mean_over_seeds_and_the_cost_of_every_layer() -> None:
    labels = np.array([0, 0, 1, 1, 1])
    seeds = [
        {"class_accuracy": class_accuracy(labels, predictions, ["cat", "dog"])}
        for predictions in (np.array([0, 1, 1, 1, 0]), np.array([0, 0, 1, 0, 0]))
    ]
    final = {
        **TRAINER.summary(seeds),
        "per_seed": [
            {
                "layer_history": {
                    "hidden_sizes": [16, 8],
                    "ae0_train_loss": [0.5, 0.25],
                    "ae0_val_loss": [0.6, 0.3],
                    "ae0_epoch_seconds": [0.5, 1.5],
                    "ae1_train_loss": [],
                    "ae1_val_loss": [],
                    "ae1_epoch_seconds": [],
                }
            }
        ],
    }
    classes, cost = ("\n".join(markdown_table(t)) for t in TRAINER.report_tables(final))
    assert "| cat | 0.7500 |" in classes  # (1/2 + 2/2) / 2
    assert "| dog | 0.5000 |" in classes  # (2/3 + 1/3) / 2
    assert "| X[0] | 16 | 2 | 1.000 | 2.00 | 0.250 | 0.300 |" in cost
    assert "| X[1] | 8 | 0 | 0 (skipped) | 0.00 | - | - |" in cost


def test_tsne_selection_is_the_first_n_of_each_class_in_test_order() -> None:
    labels = np.array([2, 0, 2, 1, 0, 2, 2, 0, 1, 0])
    # first 2 of class 0: 1, 4; class 1 (only 2): 3, 8; class 2: 0, 2
    np.testing.assert_array_equal(tsne_selection(labels, per_class=2), [0, 1, 2, 3, 4, 8])
    np.testing.assert_array_equal(tsne_selection(labels, per_class=100), np.arange(10))


def test_tsne_selection_matches_a_naive_loop_on_stl10_sized_labels() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=8000)
    labels[labels == 7] = 3  # class 7 has no images, class 3 many
    labels[np.flatnonzero(labels == 5)[300:]] = 4  # class 5 has fewer than 500
    chosen = tsne_selection(labels, per_class=500)
    seen: dict[int, int] = {}
    expected = []
    for i, label in enumerate(labels):
        if seen.get(label, 0) < 500:
            expected.append(i)
            seen[label] = seen.get(label, 0) + 1
    np.testing.assert_array_equal(chosen, expected)
    counts = np.bincount(labels[chosen], minlength=10)
    assert counts[5] == 300 and counts[7] == 0 and set(counts[[0, 1, 2, 3, 4, 6, 8, 9]]) == {500}


def test_tsne_embedding_is_seeded() -> None:
    features = np.random.default_rng(0).normal(size=(40, 16)).astype(np.float32)
    a, b = tsne_embedding(features, seed=0), tsne_embedding(features, seed=0)
    assert a.shape == (40, 2)
    np.testing.assert_array_equal(a, b)


def test_plots_are_figures_with_the_expected_panels() -> None:
    layer_history = {"hidden_sizes": [16, 8, 4]}
    for k, n in enumerate([3, 0, 2]):
        layer_history[f"ae{k}_train_loss"] = list(np.linspace(1.0, 0.5, n))
        layer_history[f"ae{k}_val_loss"] = list(np.linspace(1.1, 0.6, n))
        layer_history[f"ae{k}_epoch_seconds"] = [0.1] * n
    history = {"train_loss": [2.0, 1.0], "val_loss": [2.1, None], "train_acc": [0.3, 0.6], "val_top1": [0.2, 0.5]}
    fig = plot_ae_losses(history, layer_history, layer_seconds_per_epoch(layer_history))
    assert isinstance(fig, Figure) and len(fig.axes) == 3 + 2
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0] == "AE 0 (16 units)\n0.10 s/epoch" and titles[1] == "AE 1 (8 units)"
    assert any("not pretrained" in t.get_text() for t in fig.axes[1].texts)

    bars = plot_class_accuracy({"cat": 0.5, "dog": 1.0, "owl": float("nan")})
    assert [round(p.get_height(), 3) for p in bars.axes[0].patches] == [0.5, 1.0, 0.0]

    points = np.random.default_rng(0).normal(size=(30, 2))
    labels = np.repeat(np.arange(3), 10)
    scatter = plot_tsne(points, labels, ["a", "b", "c"])
    legend = [t.get_text() for t in scatter.axes[0].get_legend().get_texts()]
    assert legend == ["a (10)", "b (10)", "c (10)"]


def test_the_autoencoder_figures_keep_the_default_style_after_optuna_switched_to_ggplot() -> None:
    """Optuna's study plots switch pyplot to ggplot; a figure drawn after them (the
    autoencoder's, in a report) keeps matplotlib's default look like every other run figure."""
    import matplotlib.style
    from matplotlib.colors import to_hex

    with matplotlib.style.context("ggplot"):
        layer_history = {
            "hidden_sizes": [4],
            "ae0_train_loss": [1.0],
            "ae0_val_loss": [1.1],
            "ae0_epoch_seconds": [0.1],
        }
        history = {"train_loss": [2.0], "val_loss": [2.1], "train_acc": [0.3], "val_top1": [0.2]}
        figures = [
            plot_ae_losses(history, layer_history),
            plot_class_accuracy({"cat": 0.5, "dog": 1.0}),
            plot_tsne(np.zeros((4, 2)), np.array([0, 0, 1, 1]), ["a", "b"]),
        ]
    for fig in figures:
        assert to_hex(fig.axes[0].get_facecolor()) == "#ffffff"  # ggplot's panels are #e5e5e5


def test_the_final_plots_say_which_seeds_they_show(tmp_path, monkeypatch) -> None:
    """With two seeds, class_accuracy.png's bars are each class's mean over the seeds and
    ae_losses.png is the first seed's run: each title says so (they once read as one
    model's figures beside a curves.png of the mean over seeds)."""
    from dlops import plots

    layer_history = {"hidden_sizes": [8], "ae0_train_loss": [0.3, 0.2], "ae0_val_loss": [0.4, 0.3]}
    layer_history["ae0_epoch_seconds"] = [0.1, 0.1]
    history = {"train_loss": [2.0, 1.0], "val_loss": [2.1, 1.1], "train_acc": [0.3, 0.6], "val_top1": [0.2, 0.5]}
    per_seed = [
        {"seed": s, "history": history, "layer_history": layer_history, "class_accuracy": {"a": acc, "b": 1.0}}
        for s, acc in ((0, 0.2), (1, 0.6))
    ]
    final = {"per_seed": per_seed, "class_accuracy": {"a": 0.4, "b": 1.0}}
    drawn = {}
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, dpi=120: drawn.setdefault(path.name, fig) and path)

    TRAINER.final_plots(final, tmp_path)
    bars = drawn["class_accuracy.png"].axes[0]
    assert [round(p.get_height(), 3) for p in bars.patches] == [0.4, 1.0]
    assert bars.get_title().startswith("Per-class test accuracy, mean over 2 seeds (dashed: mean of classes, 0.700)")
    assert drawn["ae_losses.png"].get_suptitle().endswith(", seed 0")

    drawn.clear()
    TRAINER.final_plots({**final, "per_seed": per_seed[:1]}, tmp_path)  # one seed: a plain title
    assert drawn["class_accuracy.png"].axes[0].get_title() == "Per-class test accuracy (dashed: mean of classes, 0.700)"


def test_the_tsne_title_names_the_seed_of_its_model(tmp_path, monkeypatch) -> None:
    from dlops import plots
    from dlops.trainers.autoencoder import AEConfig, fit

    config = AEConfig(
        dataset="digits",
        hidden_sizes=[16, 12, 10, 8],
        pretrain_epochs=0,
        epochs=1,
        subset_per_class=5,
        seed=3,
        device="cpu",
    )
    result = fit(config)
    drawn = {}
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, dpi=120: drawn.setdefault(path.name, fig) and path)
    TRAINER.seed_files(result, result.dataset.test(), tmp_path)
    assert drawn["tsne.png"].axes[0].get_title().startswith("t-SNE of the 8-unit layer X[3] (seed 3): ")


def test_a_final_json_with_an_unmeasured_pretraining_epoch_is_reported_and_drawn(tmp_path) -> None:
    """final.json may hold null for a number (a stored NaN; the check accepts it): the
    seconds of a layer are then the mean of its measured epochs, and the report's table
    and ae_losses.png are still drawn (it was a TypeError inside `dlops report`)."""
    layers = {
        "hidden_sizes": [16, 8],
        "ae0_train_loss": [0.5, 0.25, 0.2],
        "ae0_val_loss": [0.6, 0.3, 0.25],
        "ae0_epoch_seconds": [0.5, None, 1.5],
        "ae1_train_loss": [0.4],
        "ae1_val_loss": [0.5],
        "ae1_epoch_seconds": [None],
    }
    assert layer_seconds_per_epoch(layers) == [1.0, None]
    history = {"train_loss": [1.0], "train_acc": [0.5], "val_loss": [1.1], "val_top1": [0.4]}
    final = {"per_seed": [{"seed": 0, "history": history, "layer_history": layers}]}
    assert TRAINER.final_problem(final) is None
    (cost,) = ("\n".join(markdown_table(t)) for t in TRAINER.report_tables(final))
    assert "| X[0] | 16 | 3 | 1.000 | 2.00 | 0.200 | 0.250 |" in cost
    assert "| X[1] | 8 | 1 | - | 0.00 | 0.400 | 0.500 |" in cost  # trained, but its time is unknown
    assert [p.name for p in TRAINER.final_plots(final, tmp_path)] == ["ae_losses.png"]


def test_the_tsne_caption_names_x3_or_the_last_layer_of_a_shorter_stack() -> None:
    from dlops.trainers.autoencoder import tsne_caption

    assert tsne_caption([1024, 1000, 500, 256, 128, 64]) == "t-SNE of the 256-unit hidden layer X[3], test images"
    assert tsne_caption([8, 16, 32, 64]) == "t-SNE of the 64-unit hidden layer X[3], test images"
    one = "t-SNE of the 5-unit hidden layer X[0] (the last: the stack has 1 hidden layer), test images"
    assert tsne_caption([5]) == one
    final = {"per_seed": [{"layer_history": {"hidden_sizes": [12, 6, 3]}}], "config": {"hidden_sizes": [99]}}
    captions = dict(TRAINER.figure_captions(final))
    assert captions["tsne.png"].startswith("t-SNE of the 3-unit hidden layer X[2] (the last")
    captions = dict(TRAINER.figure_captions({"per_seed": [{}], "config": {"hidden_sizes": [7, 4]}}))
    assert captions["tsne.png"].startswith("t-SNE of the 4-unit hidden layer X[1]")


def test_epoch_axes_of_a_one_epoch_run_tick_whole_epochs() -> None:
    """One pretraining epoch per layer and one fine-tuning epoch: every epoch axis of
    ae_losses.png and curves.png ticks at epoch 1 alone (it read 0.945, 0.960, ... 1.050,
    overprinted, under a single point)."""
    from dlops.plots import plot_training_curves

    layers = {"hidden_sizes": [16, 8]}
    for k in range(2):
        layers.update({f"ae{k}_train_loss": [0.5], f"ae{k}_val_loss": [0.4], f"ae{k}_epoch_seconds": [0.1]})
    history = {"train_loss": [1.0], "train_acc": [0.5], "val_loss": [1.1], "val_top1": [0.4], "val_top5": [0.9]}
    for fig in (plot_ae_losses(history, layers, seed=0), plot_training_curves([history], title="t")):
        fig.draw_without_rendering()
        epoch_axes = [ax for ax in fig.axes if "epoch" in ax.get_xlabel()]
        assert len(epoch_axes) in (4, 3)  # two layers and two fine-tuning panels; three curves
        for ax in epoch_axes:
            low, high = ax.get_xlim()
            assert [t for t in ax.get_xticks() if low <= t <= high] == [1.0], ax.get_xlabel()


def test_the_per_class_table_says_over_which_seeds() -> None:
    """One seed's table is that seed's, not "mean over seeds"; two seeds' says how many."""
    per_seed = [{"seed": s, "class_accuracy": {"a": acc}} for s, acc in ((3, 0.2), (4, 0.6))]
    final = {"per_seed": per_seed, "class_accuracy": {"a": 0.4}}
    titles = [t.title for t in TRAINER.report_tables(final)]
    assert titles == ["Per-class test accuracy (mean over 2 seeds)"]
    titles = [t.title for t in TRAINER.report_tables({**final, "per_seed": per_seed[:1]})]
    assert titles == ["Per-class test accuracy (seed 3)"]
