"""A study's own plots (``optuna.visualization.matplotlib``): optimization history,
intermediate values, slice, parameter importances, parallel coordinates, made readable
and saved as ``<name>.png`` through :func:`dlops.plots.save_figure`.

Optuna draws through pyplot: :func:`write_study_plots` switches a process without a
display to a headless backend first.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from optuna.trial import TrialState

from dlops.plots import epoch_ticks, save_figure, use_headless_backend


def write_study_plots(study: Any, out_dir: Path) -> list[Path]:
    """The study's Optuna plots as ``out_dir/<name>.png`` (stale ones removed)."""
    use_headless_backend()
    figures = study_figures(study)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.png"):
        if old.stem not in figures:
            old.unlink()
    return [save_figure(fig, out_dir / f"{name}.png") for name, fig in figures.items()]


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
    # Imported here: it imports pyplot, which must come after use_headless_backend().
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
    verbosity = optuna.logging.get_verbosity()
    # Optuna's own notes while drawing ("There are no complete trials", "You need to set up
    # the pruning feature"): an empty or flat figure says the same, without the log lines.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with contextlib.ExitStack() as restore, warnings.catch_warnings():
        restore.callback(optuna.logging.set_verbosity, verbosity)
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
            epoch_ticks(ax)  # whole numbers, one trial or epoch too
            ax.set_xlabel("trial")
            if metric:
                ax.set_ylabel(metric)
        elif name == "intermediate_values":
            epoch_ticks(ax)  # whole numbers, one trial or epoch too
            ax.set_xlabel("epoch (0 = the first)")
            if metric:
                ax.set_ylabel(metric)
        elif name == "slice" and metric and ax.get_ylabel():
            ax.set_ylabel(metric)


def _readable_log_ticks(axis: Any, lo: float, hi: float) -> None:
    """Optuna labels every minor tick of a log axis and, in a narrow panel, they
    overlap: label the decades where at least two fall in range, else 1-2-5 steps,
    else (a range narrower than that) the minor ticks; in short form, slanted."""
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
