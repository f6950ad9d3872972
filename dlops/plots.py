"""Plots as pure functions: each returns a matplotlib ``Figure`` and the caller saves it.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot, no global state), so
they work headless and never accumulate in a pyplot registry. The study plots come
from ``optuna.visualization.matplotlib``, which draws through pyplot: call
:func:`use_headless_backend` first in a process without a display.
"""

from __future__ import annotations

import functools
import logging
import sys
import warnings
from typing import Any, Callable, Sequence

import numpy as np
from matplotlib.figure import Figure

# History key -> panel title, in the order the report shows them.
CURVE_PANELS: tuple[tuple[str, str], ...] = (
    ("train_loss", "training loss"),
    ("train_acc", "training accuracy (top-1)"),
    ("val_top5", "validation top-5"),
)


def use_headless_backend() -> None:
    """Agg, unless pyplot is already in use (a notebook keeps its own backend)."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")


def _default_style(fn: Callable[..., Figure]) -> Callable[..., Figure]:
    """Draw in matplotlib's default style: Optuna's plots switch pyplot to ggplot."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Figure:
        import matplotlib.style

        with matplotlib.style.context("default"):
            return fn(*args, **kwargs)

    return wrapper


def _as_array(runs: Sequence[Sequence[float | None]]) -> np.ndarray:
    """Runs of possibly unequal length (and nulls) as an (n_runs, n_epochs) NaN-padded array."""
    length = max((len(r) for r in runs), default=0)
    out = np.full((len(runs), length), np.nan)
    for i, r in enumerate(runs):
        out[i, : len(r)] = [np.nan if v is None else float(v) for v in r]
    return out


def _mean_band(ax: Any, runs: Sequence[Sequence[float | None]], label: str | None, color: Any = None,
               linestyle: str = "-") -> bool:
    """Mean line and min..max band of ``runs`` against epochs 1..E; False if all NaN."""
    arr = _as_array(runs)
    if arr.size == 0 or np.isnan(arr).all():
        return False
    epochs = np.arange(1, arr.shape[1] + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
        mean = np.nanmean(arr, axis=0)
        low, high = np.nanmin(arr, axis=0), np.nanmax(arr, axis=0)
    (line,) = ax.plot(epochs, mean, marker="o" if len(epochs) <= 12 else None, markersize=3,
                      label=label, color=color, linestyle=linestyle)
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
        drawn = _mean_band(ax, [h.get(key, []) for h in histories],
                           f"mean of {n} seeds" + (" (band: min-max)" if n > 1 else "") if n > 1 else "seed 0")
        ax.set_title(panel_title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if "acc" in key or "top" in key:
            ax.set_ylim(-0.02, 1.02)
        if not drawn:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
        ax.xaxis.get_major_locator().set_params(integer=True)
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


def _validation_axes(ax: Any, series: dict[str, Sequence[Sequence[float | None]]], ylabel: str,
                     dashed: Sequence[str], legend_title: str | None = None) -> None:
    drawn = 0
    for label, runs in series.items():
        drawn += _mean_band(ax, runs, label, linestyle="--" if label in dashed else "-")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if drawn:
        ax.legend(loc="lower right", fontsize="small", title=legend_title, title_fontsize="small")
    else:
        ax.text(0.5, 0.5, "no runs yet", ha="center", va="center", transform=ax.transAxes)


def _figure_of(axes: Any) -> Any:
    if isinstance(axes, np.ndarray):
        return axes.flat[0].figure
    return axes.figure


def study_figures(study: Any) -> dict[str, Any]:
    """The study's own plots (``optuna.visualization.matplotlib``), by file stem:
    optimization history, intermediate values, slice, and, where at least two
    parameters were searched, parameter importances and parallel coordinates.

    Returns pyplot figures (Optuna draws through pyplot): close them after saving.
    A plot Optuna cannot draw yet (too few trials) is left out.
    """
    import optuna
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    params = sorted({p for t in complete for p in t.params})
    metric = (study.metric_names or [None])[0]
    plots: dict[str, Any] = {
        "optimization_history": lambda: ovm.plot_optimization_history(study),
        "intermediate_values": lambda: ovm.plot_intermediate_values(study),
    }
    if params:
        plots["slice"] = lambda: ovm.plot_slice(study)
    if len(params) >= 2:
        plots["param_importances"] = lambda: ovm.plot_param_importances(study)
        plots["parallel_coordinate"] = lambda: ovm.plot_parallel_coordinate(study)
    out: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # matplotlib's complaints about a parameter with one value so far ("identical
        # low and high xlims"): the plot is still right, the warning is noise.
        warnings.simplefilter("ignore", UserWarning)
        for name, draw in plots.items():
            try:
                fig = _figure_of(draw())
            except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # too few trials for this plot
                logging.getLogger(__name__).info("study plot %s skipped: %s", name, exc)
                continue
            _tidy_study_figure(name, fig, metric, len(params))
            out[name] = fig
    return out


def _tidy_study_figure(name: str, fig: Any, metric: str | None, n_params: int) -> None:
    """Readable axes for Optuna's figures: integer trial/epoch ticks, the metric's name
    instead of "Objective Value", no overlapping minor labels on log axes."""
    from matplotlib.ticker import MaxNLocator

    width, height = fig.get_size_inches()
    if name == "slice":
        width = 1.0 + 3.2 * n_params
    elif name == "parallel_coordinate":
        width = 2.5 + 1.2 * (n_params + 1)  # one vertical axis per parameter, plus the objective
    fig.set_size_inches(max(width, 6.4), max(height, 4.2))
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>":
            continue
        if name == "slice" and ax.get_xscale() == "log":
            _readable_log_ticks(ax.xaxis, *ax.get_xlim())
        if name == "optimization_history":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("trial")
            if metric:
                ax.set_ylabel(metric)
        elif name == "intermediate_values":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch (0 = the first)")
            if metric:
                ax.set_ylabel(metric)
        elif name == "slice" and metric and ax.get_ylabel():
            ax.set_ylabel(metric)


def _readable_log_ticks(axis: Any, lo: float, hi: float) -> None:
    """Optuna labels every minor tick of a log axis and, in a narrow panel, they
    overlap: label the decades where at least two fall in range, else 1-2-5 steps,
    else (a range narrower than that) the minor ticks; in short form, slanted."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    short = FuncFormatter(lambda v, _: f"{v:.2g}")
    axis.set_major_formatter(short)
    axis.set_minor_formatter(NullFormatter())
    for subs in ((1.0,), (1.0, 2.0, 5.0)):
        locator = LogLocator(subs=subs)
        if sum(lo <= t <= hi for t in locator.tick_values(lo, hi)) >= 2:
            axis.set_major_locator(locator)
            break
    else:
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.set_minor_formatter(short)
    axis.set_tick_params(which="both", labelrotation=45)
