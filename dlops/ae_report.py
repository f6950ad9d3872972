"""Report pieces of the autoencoder experiment: pure functions returning tables and
matplotlib Figures (the caller saves them).

* :func:`class_accuracy` / :func:`class_accuracy_table` / :func:`plot_class_accuracy`:
  test accuracy per class, with class names;
* :func:`plot_ae_losses`: reconstruction loss of every pretrained layer and the
  fine-tuning loss/accuracy, on training and validation data;
* :func:`layer_cost_table`: pretraining seconds per epoch of each layer;
* :func:`tsne_selection`, :func:`layer_activations`, :func:`tsne_embedding`,
  :func:`plot_tsne`: a t-SNE of the 256-unit layer ``X[3]`` for the first 500 test
  images of each class.

``python -m dlops.ae_report --dataset digits`` trains the baseline (trial 0 of
``study/autoencoder.toml``), evaluates it once on the test split and writes all of
these under ``$DLOPS_HOME/reports/autoencoder-<dataset>/``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from dlops.autoencoder import StackedClassifier, layer_seconds_per_epoch


# ------------------------------------------------------------------ per-class accuracy


def class_accuracy(labels: np.ndarray, predictions: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """Accuracy within each class (NaN for a class with no images), keyed by class name
    in class-index order. Weighted by the class counts they give the overall accuracy."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    out = {}
    for index, name in enumerate(class_names):
        mask = labels == index
        out[name] = float(np.mean(predictions[mask] == index)) if mask.any() else float("nan")
    return out


def class_accuracy_table(labels: np.ndarray, predictions: np.ndarray, class_names: Sequence[str]) -> str:
    """Markdown table: class, images, correct, accuracy; then the overall row."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    acc = class_accuracy(labels, predictions, class_names)
    rows = ["| class | images | correct | accuracy |", "| --- | ---: | ---: | ---: |"]
    for index, name in enumerate(class_names):
        mask = labels == index
        rows.append(f"| {name} | {int(mask.sum())} | {int((predictions[mask] == index).sum())} | {_fmt(acc[name])} |")
    overall = float(np.mean(predictions == labels)) if len(labels) else float("nan")
    rows.append(f"| **all** | {len(labels)} | {int((predictions == labels).sum())} | {_fmt(overall)} |")
    return "\n".join(rows)


def plot_class_accuracy(acc: dict[str, float]) -> Figure:
    """Bar chart of the per-class accuracies, with the unweighted mean as a dashed line."""
    names, values = list(acc), np.array(list(acc.values()), dtype=float)
    fig = Figure(figsize=(max(6.0, 0.6 * len(names) + 2), 4.0), layout="constrained")
    ax = fig.add_subplot()
    bars = ax.bar(range(len(names)), np.nan_to_num(values), color="tab:blue")
    for bar, v in zip(bars, values):  # inside the bar's top, clear of the mean line
        inside = bar.get_height() > 0.15
        ax.annotate(_fmt(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="top" if inside else "bottom", fontsize=8, color="white" if inside else "black",
                    xytext=(0, -3 if inside else 2), textcoords="offset points")
    title = "Per-class test accuracy"
    if np.isfinite(values).any():
        mean = float(np.nanmean(values))
        ax.axhline(mean, color="tab:red", ls="--", lw=1)
        title += f" (dashed: mean of classes, {mean:.3f})"
    long_names = max(map(len, names), default=0) > 3
    ax.set_xticks(range(len(names)), names, rotation=45 if long_names else 0, ha="right" if long_names else "center")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("class")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    return fig


def _fmt(v: float) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.3f}"


# ------------------------------------------------------------------------ loss curves


def _num_layers(layer_history: dict[str, Any]) -> int:
    if "hidden_sizes" in layer_history:
        return len(layer_history["hidden_sizes"])
    found = [int(m.group(1)) for k in layer_history if (m := re.fullmatch(r"ae(\d+)_train_loss", k))]
    return max(found) + 1 if found else 0


def plot_ae_losses(history: dict[str, list[float]], layer_history: dict[str, list[float]]) -> Figure:
    """Top row: reconstruction MSE of each autoencoder per pretraining epoch (train and
    validation). Bottom row: fine-tuning cross-entropy and accuracy per epoch (train
    and validation). ``None`` entries (stored NaN) are skipped."""
    n_layers = _num_layers(layer_history)
    hidden = layer_history.get("hidden_sizes", [None] * n_layers)
    seconds = layer_seconds_per_epoch(layer_history) if "hidden_sizes" in layer_history else [None] * n_layers
    cols = max(n_layers, 2)
    fig = Figure(figsize=(2.6 * cols, 6.2), layout="constrained")
    grid = fig.add_gridspec(2, cols)
    for k in range(n_layers):
        ax = fig.add_subplot(grid[0, k])
        train = _floats(layer_history.get(f"ae{k}_train_loss", []))
        val = _floats(layer_history.get(f"ae{k}_val_loss", []))
        title = f"AE {k}" + (f" ({hidden[k]} units)" if hidden[k] else "")
        if len(train) == 0:
            ax.text(0.5, 0.5, "0 epochs:\nnot pretrained", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            epochs = np.arange(1, len(train) + 1)
            ax.plot(epochs, train, marker=".", label="train")
            ax.plot(epochs, val, marker=".", label="validation")
            ax.set_yscale("log")
            ax.set_xlabel("pretraining epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if seconds[k] is not None:
                title += f"\n{seconds[k]:.2f} s/epoch"
        if k == 0:
            ax.set_ylabel("reconstruction MSE")
            if len(train):
                ax.legend(fontsize=8)
        ax.set_title(title, fontsize=9)
    half = cols // 2
    ax_loss, ax_acc = fig.add_subplot(grid[1, :half]), fig.add_subplot(grid[1, half:])
    epochs = np.arange(1, len(history.get("train_loss", [])) + 1)
    ax_loss.plot(epochs, _floats(history.get("train_loss", [])), marker=".", label="train")
    ax_loss.plot(epochs, _floats(history.get("val_loss", [])), marker=".", label="validation")
    ax_loss.set_xlabel("fine-tuning epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.set_title("Fine-tuning loss")
    ax_loss.legend()
    ax_acc.plot(epochs, _floats(history.get("train_acc", [])), marker=".", label="train")
    ax_acc.plot(epochs, _floats(history.get("val_top1", [])), marker=".", label="validation top-1")
    ax_acc.set_xlabel("fine-tuning epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_title("Fine-tuning accuracy")
    ax_acc.legend()
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle("Greedy layer-wise pretraining (top) and fine-tuning (bottom)")
    return fig


def _floats(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def layer_cost_table(layer_history: dict[str, list[float]]) -> str:
    """Markdown table of the pretraining cost per layer: epochs, seconds per epoch and
    in total (a layer with 0 epochs costs nothing), final train/validation MSE."""
    rows = ["| layer | units | epochs | s/epoch | s total | final train MSE | final val MSE |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    per_epoch = layer_seconds_per_epoch(layer_history)
    for k, units in enumerate(layer_history["hidden_sizes"]):
        secs = layer_history[f"ae{k}_epoch_seconds"]
        train, val = layer_history[f"ae{k}_train_loss"], layer_history[f"ae{k}_val_loss"]
        rows.append(
            f"| X[{k}] | {units} | {len(secs)} | {_fmt(per_epoch[k]) if per_epoch[k] is not None else '0 (skipped)'}"
            f" | {sum(secs):.2f} | {_fmt(train[-1]) if train else '-'} | {_fmt(val[-1]) if val else '-'} |"
        )
    return "\n".join(rows)


# ------------------------------------------------------------------------------ t-SNE


def tsne_selection(labels: np.ndarray, per_class: int = 500) -> np.ndarray:
    """Indices of the first ``per_class`` images of each class (all of a class that has
    fewer), in the order of ``labels`` (test order)."""
    labels = np.asarray(labels)
    keep = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        keep[np.flatnonzero(labels == c)[:per_class]] = True
    return np.flatnonzero(keep)


@torch.no_grad()
def layer_activations(
    model: StackedClassifier, images: np.ndarray, layer_index: int = 3, batch_size: int = 512
) -> np.ndarray:
    """Activations of hidden layer ``X[layer_index]`` (default the 256-unit ``X[3]``)
    for raw uint8 ``(N, C, H, W)`` images, as float32 ``(N, units)``."""
    if not 0 <= layer_index < len(model.encoders):
        raise ValueError(f"layer_index {layer_index} out of range (the model has {len(model.encoders)} hidden layers)")
    model.eval()
    parts = [model.hidden(model.prepare(images[i : i + batch_size]), layer_index).float().cpu()
             for i in range(0, len(images), batch_size)]
    units = model.encoders[layer_index][0].out_features
    return torch.cat(parts).numpy() if parts else np.zeros((0, units), dtype=np.float32)


def tsne_embedding(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE (scikit-learn, PCA initialisation, seeded) of ``features``."""
    from sklearn.manifold import TSNE

    features = np.asarray(features, dtype=np.float32)
    perplexity = float(min(30.0, max(1.0, (len(features) - 1) / 3)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return tsne.fit_transform(features).astype(np.float32)


def plot_tsne(points: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> Figure:
    """Scatter of 2-D points coloured by class, with a legend of class names."""
    import matplotlib

    points, labels = np.asarray(points), np.asarray(labels)
    cmap = matplotlib.colormaps["tab10" if len(class_names) <= 10 else "tab20"]
    fig = Figure(figsize=(8.5, 6.5), layout="constrained")
    ax = fig.add_subplot()
    for index, name in enumerate(class_names):
        mask = labels == index
        if mask.any():
            ax.scatter(points[mask, 0], points[mask, 1], s=6, alpha=0.7, color=cmap(index % cmap.N),
                       label=f"{name} ({int(mask.sum())})")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=3, frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("t-SNE of the 256-unit layer X[3]")
    return fig


# ------------------------------------------------------------------ the baseline report


def baseline_report(
    dataset: str = "digits",
    out_dir: Path | None = None,
    *,
    spec_name: str = "autoencoder",
    device: str = "auto",
    per_class: int = 500,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train the spec's baseline on ``dataset``, evaluate it once on the test split and
    write ``losses.png``, ``class_accuracy.png``, ``tsne.png``, ``report.md`` and
    ``metrics.json`` to ``out_dir``. Returns the metrics."""
    from dlops.autoencoder import fit, predict
    from dlops.paths import reports_dir
    from dlops.spec import load_spec

    say = progress or (lambda _: None)
    spec = load_spec(spec_name)
    config = spec.config(dataset, spec.baseline_params(), device=device)
    out_dir = Path(out_dir) if out_dir else reports_dir() / f"{spec.name}-{dataset}"
    out_dir.mkdir(parents=True, exist_ok=True)

    result = fit(
        config,
        report=lambda e, m: say(f"fine-tune epoch {e + 1:>3}  train_loss {m['train_loss']:.4f}  val_top1 {m['val_top1']:.4f}  ({m['epoch_seconds']:.2f}s)"),
        on_layer_epoch=lambda k, e, m: say(f"AE {k} epoch {e + 1:>3}  train_mse {m['train_loss']:.5f}  val_mse {m['val_loss']:.5f}  ({m['epoch_seconds']:.2f}s)"),
    )
    ds = result.dataset
    test = ds.test()
    predictions = predict(result.model, test.images)
    acc = class_accuracy(test.labels, predictions, ds.class_names)
    test_accuracy = float(np.mean(predictions == test.labels))
    say(f"test accuracy {test_accuracy:.4f}; t-SNE of X[3]")
    chosen = tsne_selection(test.labels, per_class)
    points = tsne_embedding(layer_activations(result.model, test.images[chosen], 3), seed=config.seed)

    plot_ae_losses(result.history, result.layer_history).savefig(out_dir / "losses.png", dpi=110)
    plot_class_accuracy(acc).savefig(out_dir / "class_accuracy.png", dpi=110)
    plot_tsne(points, test.labels[chosen], ds.class_names).savefig(out_dir / "tsne.png", dpi=110)
    metrics = {
        "dataset": dataset,
        "config": config.to_dict(),
        "test_accuracy": test_accuracy,
        "test_images": int(len(test.labels)),
        "class_accuracy": acc,
        "final_val_top1": result.metrics["val_top1"],
        "pretrain_seconds_per_epoch": result.pretrain_seconds_per_epoch,
        "seconds": result.seconds,
        "tsne_points": int(len(chosen)),
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out_dir / "report.md").write_text(
        f"# Autoencoder baseline on {dataset}\n\n"
        f"Test accuracy: **{test_accuracy:.4f}** ({len(test.labels)} images); run took {result.seconds:.0f} s.\n\n"
        f"## Pretraining cost per layer\n\n{layer_cost_table(result.layer_history)}\n\n"
        f"## Per-class test accuracy\n\n{class_accuracy_table(test.labels, predictions, ds.class_names)}\n\n"
        "![per-class accuracy](class_accuracy.png)\n\n![loss curves](losses.png)\n\n"
        f"![t-SNE of X[3]](tsne.png)\n"
    )
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    from dlops.errors import DlopsError

    parser = argparse.ArgumentParser(prog="python -m dlops.ae_report", description=baseline_report.__doc__)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--out", type=Path, default=None, help="output folder [$DLOPS_HOME/reports/autoencoder-DATASET]")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    try:
        metrics = baseline_report(args.dataset, args.out, device=args.device, progress=print)
    except DlopsError as exc:
        print(f"error: {exc}")
        return 2
    print(f"test accuracy {metrics['test_accuracy']:.4f} on {metrics['test_images']} {args.dataset} test images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
