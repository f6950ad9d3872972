"""Every figure dlops draws, and :func:`save_figure`, the one way they are written.

The ``plot_*`` functions are pure: each returns a matplotlib ``Figure`` and the caller
saves it. Figures are built with ``matplotlib.figure.Figure`` (no pyplot, no global
state), so they work headless and never accumulate in a pyplot registry.

:func:`write_curves` draws and saves the training curves of a ``final.json`` (``curves.png``). A study's own plots are
:mod:`dlops.study_plots` (they come from Optuna: no trainer may load them).
"""

from __future__ import annotations

import functools
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from dlops.io import write_atomic
from dlops.text import plural

# History key -> panel title, in the order the report shows them.
CURVE_PANELS: tuple[tuple[str, str], ...] = (
    ("train_loss", "training loss"),
    ("train_acc", "training accuracy (top-1)"),
    ("val_top5", "validation top-5"),
)

# The training-loss panel's title per ResNet18 loss: a center-loss run's loss adds its center
# term to the cross-entropy, a triplet run's is on another scale altogether.
LOSS_CURVE_TITLES = {
    "ce": "training loss (cross-entropy)",
    "triplet": "training loss (batch-hard triplet)",
    "center": "training loss (cross-entropy + center term)",
}


def use_headless_backend() -> None:
    """Agg, unless pyplot is already in use (a notebook keeps its own backend)."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")


def save_figure(fig: Any, path: Path, dpi: int = 120) -> Path:
    """Save a figure atomically and release it (pyplot figures are closed)."""
    # Optuna's figures put legends and rotated labels outside the axes: keep them.
    write_atomic(path, lambda f: fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight"))
    if "matplotlib.pyplot" in sys.modules:
        import matplotlib.pyplot as plt

        if plt.fignum_exists(getattr(fig, "number", -1)):
            plt.close(fig)
    return path


def write_curves(final: dict[str, Any], out_dir: Path) -> list[Path]:
    """``curves.png`` of a ``final.json``: its training curves (mean and band over seeds),
    with the study's objective beside them."""
    histories = [s["history"] for s in final["per_seed"]]
    panels = list(CURVE_PANELS)
    metric = final.get("metric")
    if metric and metric not in {k for k, _ in panels}:  # the study's objective, next to the training curves
        panels.insert(2, (metric, f"validation {metric.removeprefix('val_').replace('top', 'top-')}"))
    config = final.get("config") or {}
    loss = config.get("loss")
    if loss in LOSS_CURVE_TITLES:  # what "training loss" sums: not the same quantity for every loss
        title = LOSS_CURVE_TITLES[loss]
        if loss == "triplet" and config.get("triplet_mining") == "weighted":
            title = title.replace("batch-hard", "weighted batch-hard")
        panels[0] = ("train_loss", title)
    n = len(histories)
    title = f"{final['spec']} on {final['dataset']['name']}: {plural(n, 'seed')}, {plural(final['epochs'], 'epoch')}"
    return [save_figure(plot_training_curves(histories, panels, title), out_dir / "curves.png")]


def _default_style(fn: Callable[..., Figure]) -> Callable[..., Figure]:
    """Draw in matplotlib's default style: Optuna's plots switch pyplot to ggplot."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Figure:
        import matplotlib.style

        with matplotlib.style.context("default"):
            return fn(*args, **kwargs)

    return wrapper


def epoch_ticks(ax: Any) -> None:
    """Whole-number ticks on an axis of epochs (or trials), also where it holds one (a
    plain ``MaxNLocator(integer=True)`` then falls back to 0.96, 0.98, 1.00, ...)."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def _as_array(runs: Sequence[Sequence[float | None]]) -> np.ndarray:
    """Runs of possibly unequal length (and nulls) as an (n_runs, n_epochs) NaN-padded array."""
    length = max((len(r) for r in runs), default=0)
    out = np.full((len(runs), length), np.nan)
    for i, r in enumerate(runs):
        out[i, : len(r)] = [np.nan if v is None else float(v) for v in r]
    return out


def _mean_band(
    ax: Any, runs: Sequence[Sequence[float | None]], label: str | None, color: Any = None, linestyle: str = "-"
) -> bool:
    """Mean line and min..max band of ``runs`` against epochs 1..E; False if all NaN."""
    arr = _as_array(runs)
    if arr.size == 0 or np.isnan(arr).all():
        return False
    epochs = np.arange(1, arr.shape[1] + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
        mean = np.nanmean(arr, axis=0)
        low, high = np.nanmin(arr, axis=0), np.nanmax(arr, axis=0)
    (line,) = ax.plot(
        epochs,
        mean,
        marker="o" if len(epochs) <= 12 else None,
        markersize=3,
        label=label,
        color=color,
        linestyle=linestyle,
    )
    if len(runs) > 1:
        ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    return True


@_default_style
def plot_training_curves(
    histories: Sequence[dict[str, Sequence[float | None]]],
    panels: Sequence[tuple[str, str]] = CURVE_PANELS,
    title: str | None = None,
) -> Figure:
    """One panel per history key (training loss, training accuracy, validation top-5
    by default): the mean over runs (seeds) per epoch, and their min..max as a band."""
    panels = [(k, t) for k, t in panels if any(h.get(k) for h in histories)] or list(panels)[:1]
    fig = Figure(figsize=(4.2 * len(panels), 3.6), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    n = len(histories)
    for ax, (key, panel_title) in zip(axes, panels):
        drawn = _mean_band(
            ax,
            [h.get(key, []) for h in histories],
            f"mean of {n} seeds" + (" (band: min-max)" if n > 1 else "") if n > 1 else "seed 0",
        )
        ax.set_title(panel_title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if "acc" in key or "top" in key:
            ax.set_ylim(-0.02, 1.02)
        if not drawn:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
        epoch_ticks(ax)
    if n > 1:
        axes[0].legend(loc="best", fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


@_default_style
def plot_validation_curves(
    series: dict[str, Sequence[Sequence[float | None]]],
    ylabel: str = "validation top-5",
    title: str | None = None,
    dashed: Sequence[str] = (),
) -> Figure:
    """Several runs' validation curves on one chart: per label, the mean over its
    seeds and a min..max band. Labels in ``dashed`` are drawn dashed (e.g. a study's
    best trial standing in for a missing reference run)."""
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    _validation_axes(ax, series, ylabel, dashed)
    if title:
        ax.set_title(title)
    return fig


@_default_style
def plot_validation_curves_by_dataset(
    panels: dict[str, tuple[dict[str, Sequence[Sequence[float | None]]], Sequence[str]]],
    ylabel: str = "validation top-5",
    title: str | None = None,
) -> Figure:
    """One chart per dataset (``panels``: dataset -> (series, dashed labels), as for
    :func:`plot_validation_curves`), side by side: runs on different datasets are never
    drawn against each other. Each chart and its legend name the dataset."""
    fig = Figure(figsize=(6.4 * max(1, len(panels)), 4.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, max(1, len(panels)), sharey=True, squeeze=False)[0])
    for ax, (dataset, (series, dashed)) in zip(axes, panels.items()):
        _validation_axes(ax, series, ylabel, dashed, legend_title=dataset)
        ax.set_title(f"on {dataset}")
    if not panels:
        _validation_axes(axes[0], {}, ylabel, ())
    if title:
        fig.suptitle(title)
    return fig


def _validation_axes(
    ax: Any,
    series: dict[str, Sequence[Sequence[float | None]]],
    ylabel: str,
    dashed: Sequence[str],
    legend_title: str | None = None,
) -> None:
    drawn = 0
    for label, runs in series.items():
        drawn += _mean_band(ax, runs, label, linestyle="--" if label in dashed else "-")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    epoch_ticks(ax)
    if drawn:
        ax.legend(loc="lower right", fontsize="small", title=legend_title, title_fontsize="small")
    else:
        ax.text(0.5, 0.5, "no runs yet", ha="center", va="center", transform=ax.transAxes)


# --------------------------------------------------------------------------- the autoencoder's


def _fmt(v: float | None) -> str:
    return "-" if v is None or not np.isfinite(v) else f"{v:.3f}"


def _floats(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


@_default_style
def plot_class_accuracy(acc: dict[str, float], n_seeds: int = 1) -> Figure:
    """Bar chart of the per-class accuracies, with the unweighted mean as a dashed line.
    ``n_seeds`` > 1: each bar is the mean over that many seeds, and the title says so."""
    names, values = list(acc), _floats(list(acc.values()))
    fig = Figure(figsize=(max(6.0, 0.6 * len(names) + 2), 4.0), layout="constrained")
    ax = fig.add_subplot()
    bars = ax.bar(range(len(names)), np.nan_to_num(values), color="tab:blue")
    for bar, v in zip(bars, values):  # inside the bar's top, clear of the mean line
        inside = bar.get_height() > 0.15
        ax.annotate(
            _fmt(v),
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="top" if inside else "bottom",
            fontsize=8,
            color="white" if inside else "black",
            xytext=(0, -3 if inside else 2),
            textcoords="offset points",
        )
    title = "Per-class test accuracy" + (f", mean over {n_seeds} seeds" if n_seeds > 1 else "")
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


def _num_layers(layer_history: dict[str, Any]) -> int:
    if "hidden_sizes" in layer_history:
        return len(layer_history["hidden_sizes"])
    found = [int(m.group(1)) for k in layer_history if (m := re.fullmatch(r"ae(\d+)_train_loss", k))]
    return max(found) + 1 if found else 0


@_default_style
def plot_ae_losses(
    history: dict[str, list[float]],
    layer_history: dict[str, list[float]],
    seconds_per_epoch: Sequence[float | None] | None = None,
    seed: int | None = None,
) -> Figure:
    """Top row: reconstruction MSE of each autoencoder per pretraining epoch (train and
    validation), titled with its ``seconds_per_epoch``. Bottom row: fine-tuning
    cross-entropy and accuracy per epoch (train and validation). ``None`` entries
    (stored NaN) are skipped. ``seed``: the run's seed, named in the title (a reference
    run of several seeds shows one of them here)."""
    n_layers = _num_layers(layer_history)
    hidden = layer_history.get("hidden_sizes", [None] * n_layers)
    seconds = list(seconds_per_epoch) if seconds_per_epoch is not None else [None] * n_layers
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
            epoch_ticks(ax)
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
        epoch_ticks(ax)
    fig.suptitle(
        "Greedy layer-wise pretraining (top) and fine-tuning (bottom)" + (f", seed {seed}" if seed is not None else "")
    )
    return fig


@_default_style
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
            ax.scatter(
                points[mask, 0],
                points[mask, 1],
                s=6,
                alpha=0.7,
                color=cmap(index % cmap.N),
                label=f"{name} ({int(mask.sum())})",
            )
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=3, frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("t-SNE of the 256-unit layer X[3]")
    return fig


@_default_style
def plot_triplet_diagnostics(
    histories: Sequence[dict[str, Sequence[float | None]]], title: str | None = None
) -> Figure:
    """A triplet run's diagnostics per epoch (:data:`dlops.losses.TRIPLET_DIAGNOSTICS`, means
    over the training batches): the share of violated batch-hard triplets, the hardest
    positive and negative distances on one panel, and the embedding norm before
    normalisation; mean over runs (seeds) with a min..max band."""
    fig = Figure(figsize=(12.6, 3.6), layout="constrained")
    ax_v, ax_d, ax_n = fig.subplots(1, 3, squeeze=False)[0]
    n = len(histories)
    over = f"mean of {n} seeds" if n > 1 else "seed 0"

    def runs(key: str) -> list[Sequence[float | None]]:
        return [h.get(key) or [] for h in histories]

    _mean_band(ax_v, runs("triplet_violated"), over)
    ax_v.set_title("violated batch-hard triplets")
    ax_v.set_ylabel("share of anchors")
    ax_v.set_ylim(-0.02, 1.02)
    _mean_band(ax_d, runs("triplet_pos_dist"), "hardest positive d(a,p)")
    _mean_band(ax_d, runs("triplet_neg_dist"), "hardest negative d(a,n)")
    ax_d.set_title("batch-hard distances")
    ax_d.set_ylabel("distance")
    ax_d.legend(loc="best", fontsize="small", title=over, title_fontsize="small")
    _mean_band(ax_n, runs("embedding_norm"), over)
    ax_n.set_title("embedding norm (before normalisation)")
    for ax in (ax_v, ax_d, ax_n):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        epoch_ticks(ax)
    if title:
        fig.suptitle(title)
    return fig
