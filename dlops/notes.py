"""What optuna-dashboard shows besides the charts: Markdown notes and the study's plots.

- The **study note** says what the study is (spec and description, dataset and split
  sizes, search space, pruner, sampler, fixed settings), where it stands (baseline value,
  best value and what tuning bought, trials by state, the best trials) and the command
  that continues it. ``dlops study run`` writes it when it opens the study and refreshes
  it after every trial, under the study lock (workers of one study take turns).
- A **trial note** has the trial's whole per-epoch history as one table, why it stopped
  (completed, pruned at epoch k with the value, diverged, interrupted, its worker died,
  failed) and whether it resumed from a checkpoint, and the settings in which it differs
  from the baseline (trial 0). It is written once the trial has finished.
- The **study plots** that ``dlops report`` draws are attached to the study as artifacts
  (``$DLOPS_HOME/artifacts``) at the end of ``dlops study run`` and by ``dlops report``.
  Each plot keeps its artifact id: a refresh rewrites the file, so the study's artifact
  list does not grow.

Notes are optuna-dashboard's own (written by :mod:`dlops.dashboard`): study system attrs, so
they work on every storage (SQLite, PostgreSQL, journal file, Redis journal). Text a
person adds in the dashboard below :data:`KEEP_MARKER` in the study note is kept.
"""

from __future__ import annotations

import math
import shlex
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from dlops.dashboard import attach_study_plots, read_note, save_note, trial_id
from dlops.objective import RunOptions, baseline_params, trial_config
from dlops.paths import default_storage_url
from dlops.spec import StudySpec
from dlops.storage import StudyStorage, connect, mask_url
from dlops.studies import trial_ending
from dlops.trainers import get_trainer

KEEP_MARKER = "*Your notes go below this line: dlops keeps them when it refreshes this note.*"
HISTORY_COLUMNS = (  # (history key, column title, format)
    ("train_loss", "train loss", ".4f"),
    ("train_acc", "train acc", ".4f"),
    ("val_loss", "val loss", ".4f"),
    ("val_top1", "val top-1", ".4f"),
    ("val_top5", "val top-5", ".4f"),
    # the triplet loss's diagnostics (dlops.losses.TRIPLET_DIAGNOSTICS), explained below the table
    ("triplet_violated", "violated", ".3f"),
    ("triplet_pos_dist", "d(a,p)", ".3f"),
    ("triplet_neg_dist", "d(a,n)", ".3f"),
    ("embedding_norm", "emb norm", ".2f"),
    ("lr", "lr", ".3g"),
    ("epoch_seconds", "s", ".1f"),
)
_CONFIG_IGNORES = {"seed", "device", "data_root", "eval_batch_size"}  # differ by design, not by choice


# --------------------------------------------------------------------------- formatting


def _num(value: Any, fmt: str = ".4f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–" if value is None else str(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return format(value, fmt)


def _value(value: Any) -> str:
    return _num(value, ".4g") if isinstance(value, float) and (abs(value) < 1e-3 or abs(value) >= 1e4) else _num(value)


def _param(value: Any) -> str:
    return format(value, ".4g") if isinstance(value, float) else str(value)


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k} {_param(v)}" for k, v in params.items()) or "–"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _pruner_text(pruner: dict[str, Any]) -> str:
    cfg = dict(pruner)
    kind = cfg.pop("type", "median")
    args = ", ".join(f"{k}={v}" for k, v in cfg.items())
    what = {
        "median": "stops a trial whose value at an epoch is worse than the median of earlier trials at that epoch",
        "percentile": "stops a trial below the given percentile of earlier trials at the same epoch",
        "hyperband": "Hyperband: successive halving over several brackets",
        "successive_halving": "asynchronous successive halving",
        "none": "no pruning: every trial runs all its epochs",
    }.get(kind, "")
    return f"`{kind}`" + (f" ({args})" if args else "") + (f": {what}" if what else "")


def _search_rows(spec: StudySpec, options: RunOptions) -> list[str]:
    baseline = baseline_params(spec, options)
    rows = ["| parameter | type | range | baseline |", "| --- | --- | --- | --- |"]
    for name, p in spec.search.items():
        if p.type == "categorical":
            rng = ", ".join(map(str, p.choices))
        else:
            rng = (
                f"{_param(p.low)} – {_param(p.high)}"
                + (" (log)" if p.log else "")
                + (f", step {p.step}" if p.step else "")
            )
        rows.append(f"| {name} | {p.type} | {rng} | {_param(baseline.get(name))} |")
    return rows


def _continue_command(spec: StudySpec, options: RunOptions, study_name: str) -> str:
    args = ["dlops", "study", "run", spec.command_arg()]
    if options.dataset:
        args += ["--dataset", options.dataset]
    args += ["--study-name", study_name]
    if options.epochs:
        args += ["--epochs", str(options.epochs)]
    for key, value in sorted(options.train_overrides.items()):
        if value is not None:
            args += ["--" + key.replace("_", "-"), str(value)]
    if options.seed is not None:
        args += ["--seed", str(options.seed)]
    if options.device and options.device != "auto":
        args += ["--device", options.device]
    if options.storage:
        args += ["--storage", options.storage]
    args += ["--n-trials", str(options.n_trials or spec.n_trials)]
    return mask_url(" ".join(shlex.quote(a) for a in args))


# --------------------------------------------------------------------------- the study note


@dataclass
class StudyContext:
    """What the study note says about the study itself: fixed for one run."""

    spec: StudySpec
    options: RunOptions
    dataset: dict[str, Any] = field(default_factory=dict)
    storage: str = ""

    @classmethod
    def of(cls, spec: StudySpec, options: RunOptions, storage_masked: str = "") -> StudyContext:
        return cls(spec=spec, options=options, dataset=dataset_facts(spec, options), storage=storage_masked)


def dataset_facts(spec: StudySpec, options: RunOptions) -> dict[str, Any]:
    """Name, classes, image shape and split sizes of the data a trial trains on."""
    config = trial_config(spec, options, baseline_params(spec, options), 0)
    name = config.dataset
    facts: dict[str, Any] = {"name": name}
    if not name:
        return facts
    try:
        from dlops.trainers.base import load_dataset

        ds = load_dataset(config)
    except Exception as exc:  # noqa: BLE001 - the note is a courtesy; the run reports data errors itself
        facts["error"] = str(exc)
        return facts
    facts.update(
        classes=ds.num_classes,
        image_shape=list(ds.image_shape),
        train=len(ds.train),
        val=len(ds.val),
        subset_classes=config.subset_classes,
        subset_per_class=config.subset_per_class,
    )
    return facts


def _value_of(trial: FrozenTrial) -> float:
    """The value of a complete trial (the caller keeps only trials that have one)."""
    return float(trial.value if trial.value is not None else math.nan)


def _baseline_trial(trials: Iterable[FrozenTrial]) -> FrozenTrial | None:
    """Trial 0, or where it was interrupted or its worker died, its completed retry."""
    baselines = [t for t in trials if t.user_attrs.get("baseline")]
    done = [t for t in baselines if t.state == TrialState.COMPLETE]
    return (done or baselines or [None])[0]  # type: ignore[list-item]


def study_note(study: optuna.Study, ctx: StudyContext, trials: list[FrozenTrial] | None = None) -> str:
    """The study note's Markdown (without the text a person kept below the marker)."""
    spec, options = ctx.spec, ctx.options
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    metric = (study.metric_names or [spec.metric])[0]
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    counts = {s: sum(t.state == s for t in trials) for s in TrialState}
    config = trial_config(spec, options, baseline_params(spec, options), 0)
    lines = [f"# {study.study_name}", ""]
    lines.append(
        f"**{spec.description or spec.name}**: spec `{spec.name}`, trainer `{spec.trainer}`. "
        f"Objective: {'maximise' if maximize else 'minimise'} `{metric}`, reported every epoch."
    )
    lines.append("")
    ds = ctx.dataset
    if ds.get("name"):
        if "train" in ds:
            subset = ""
            if ds.get("subset_classes") or ds.get("subset_per_class"):
                subset = (
                    f" (subset: {ds.get('subset_classes') or 'all'} classes, "
                    f"{ds.get('subset_per_class') or 'all'} training images per class)"
                )
            shape = "x".join(map(str, ds["image_shape"]))
            lines.append(
                f"**Data**: `{ds['name']}`{subset}, {ds['classes']} classes, images {shape}; "
                f"train {ds['train']:,}, validation {ds['val']:,} (a stratified hold-out of the training "
                "split). The test split is never read by a study."
            )
        else:
            lines.append(f"**Data**: `{ds['name']}` ({ds.get('error', 'not loaded')})")
        lines.append("")
    unread = get_trainer(spec.trainer).foreign_settings(config)  # another loss's settings: this run ignores them
    fixed = {
        k: v
        for k, v in config.to_dict().items()
        if k not in _CONFIG_IGNORES and k not in spec.search and k != "dataset" and k not in unread and v is not None
    }
    lines.append("**Fixed settings**: " + ", ".join(f"{k} {_param(v)}" for k, v in fixed.items()))
    lines.append("")
    lines.append("**Search space** (trial 0 is the baseline):")
    lines.append("")
    lines += _search_rows(spec, options)
    lines.append("")
    sampler = dict(spec.sampler)
    seed = options.seed if options.seed is not None else sampler.get("seed", 0)
    lines.append(f"**Pruner**: {_pruner_text(spec.pruner)}. **Sampler**: `{sampler.get('type', 'tpe')}`, seed {seed}.")
    lines.append("")
    lines.append("## Where it stands")
    lines.append("")
    lines.append(
        "Trials: "
        + ", ".join(
            f"{counts[s]} {s.name.lower()}"
            for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING)
        )
    )
    seconds = sum(t.duration.total_seconds() for t in trials if t.duration is not None)
    if seconds:
        lines[-1] += f"; {_duration(seconds)} of trial time."
    lines.append("")
    base = _baseline_trial(trials)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    best = (max if maximize else min)(complete, key=_value_of) if complete else None
    if base is None:
        lines.append("Baseline: not in this study.")
    elif base.state == TrialState.COMPLETE:
        lines.append(f"Baseline (trial {base.number}, {_params(base.params)}): `{metric}` **{_value(base.value)}**.")
    else:
        lines.append(f"Baseline (trial {base.number}, {_params(base.params)}): {base.state.name.lower()}.")
    if best is not None:
        lines.append("")
        text = f"Best: trial {best.number} ({_params(best.params)}): `{metric}` **{_value(best.value)}**"
        if base is not None and base.state == TrialState.COMPLETE and base.value is not None and best.value is not None:
            if best.number == base.number:
                text += ": the baseline is still the best trial"
            else:
                gain = (best.value - base.value) if maximize else (base.value - best.value)
                text += f": tuning bought {gain:+.4f} over the baseline"
                if base.value:
                    text += f" ({gain / abs(base.value):+.1%})"
        lines.append(text + ".")
        top = sorted(complete, key=_value_of, reverse=maximize)[:5]
        lines += ["", f"| trial | {metric} | params | epochs |", "| ---: | ---: | --- | ---: |"]
        lines += [
            f"| {t.number}{' (baseline)' if t.user_attrs.get('baseline') else ''} | {_value(t.value)} | "
            f"{_params(t.params)} | {len(t.intermediate_values)} |"
            for t in top
        ]
    else:
        lines.append("")
        lines.append("Best: no complete trial yet.")
    lines.append("")
    lines.append("## Continue")
    lines.append("")
    lines += ["```", _continue_command(spec, options, study.study_name), "```", ""]
    lines.append(
        "Each trial's note has its per-epoch table and why it stopped; the study's plots are under "
        "Study Artifacts (redrawn at the end of `dlops study run` and by `dlops report`)."
    )
    return "\n".join(lines)


def write_study_note(study: optuna.Study, ctx: StudyContext, trials: list[FrozenTrial] | None = None) -> None:
    """Refresh the study note; text below :data:`KEEP_MARKER` stays. Call under the study lock."""
    body = study_note(study, ctx, trials)
    old = read_note(study)
    kept = old.split(KEEP_MARKER, 1)[1] if KEEP_MARKER in old else "\n"
    body = body + "\n\n---\n\n" + KEEP_MARKER + kept
    if body != old:
        save_note(study, None, body)


# --------------------------------------------------------------------------- trial notes


def stop_reason(trial: FrozenTrial, metric: str | None) -> str:
    """Why the trial stopped, in one sentence (as ``dlops study run``'s line after it, from
    :func:`dlops.studies.trial_ending`)."""
    end = trial_ending(trial)
    done, of = end.epochs, f" of {end.planned}" if end.planned else ""
    if end.kind == "complete":
        return f"Completed all {done} epochs: `{metric}` {_value(trial.value)}."
    if end.kind == "diverged":
        return f"Diverged: {end.reason}; pruned, so the sampler learns from it."
    if end.kind == "pruned":
        value = f" (`{metric}` {_value(end.last)})" if end.last is not None else ""
        return f"Pruned after epoch {done}{of}{value}: below the pruner's bar at that epoch."
    if end.kind == "interrupted":
        return f"Interrupted (Ctrl-C or SIGTERM) after epoch {done}{of}; queued again to resume from its checkpoint."
    if end.kind == "failed":
        return "Failed" + (f": {end.reason}" if end.reason else "") + f" after epoch {done}{of}."
    return f"{trial.state.name.capitalize()} after epoch {done}{of}."


TRIPLET_LEGEND = (
    "Triplet loss: train acc is the nearest-centroid top-1 of the epoch's own training embeddings; "
    "val loss is not measured (the model is scored by its nearest class centroids). Per epoch, over "
    "the training batches: violated, the share of anchors whose batch-hard triplet is violated; "
    "d(a,p) and d(a,n), the mean hardest-positive and hardest-negative distances (normalised "
    "embeddings: 0 to 2); emb norm, the embedding's norm before normalisation. Violated stuck at 1 "
    "with shrinking distances is a collapse."
)


def _recorded(values: list[Any] | None) -> bool:
    """Whether a history list holds a number (a triplet run's val_loss holds none)."""
    return any(isinstance(v, (int, float)) and math.isfinite(v) for v in values or ())


def history_table(history: dict[str, list[Any]]) -> list[str]:
    """The per-epoch table of the columns the history records (with the triplet
    diagnostics' legend below it where it has them)."""
    columns = [(k, title, fmt) for k, title, fmt in HISTORY_COLUMNS if _recorded(history.get(k))]
    n = max((len(history[k]) for k, _, _ in columns), default=0)
    if not n:
        return ["No epoch finished."]
    rows = [
        "| epoch | " + " | ".join(t for _, t, _ in columns) + " |",
        "| ---: | " + " | ".join("---:" for _ in columns) + " |",
    ]
    for i in range(n):
        cells = [_num(history[k][i] if i < len(history[k]) else None, fmt) for k, _, fmt in columns]
        rows.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    if _recorded(history.get("triplet_violated")):
        rows += ["", TRIPLET_LEGEND]
    return rows


def config_changes(config: dict[str, Any], baseline: dict[str, Any] | None) -> list[str]:
    if not baseline:
        return []
    return [
        f"{k} {_param(v)} (baseline {_param(baseline.get(k))})"
        for k, v in config.items()
        if k not in _CONFIG_IGNORES and baseline.get(k) != v
    ]


def trial_note(
    trial: FrozenTrial, metric: str | None, baseline_config: dict[str, Any] | None, reason: str | None = None
) -> str:
    """The trial's note; ``reason``: why it stopped, where the trial cannot carry it (a trial
    Optuna failed for its stale heartbeat takes no more user attributes)."""
    title = f"# Trial {trial.number}" + (" (baseline)" if trial.user_attrs.get("baseline") else "")
    lines = [title, "", f"Failed: {reason}." if reason else stop_reason(trial, metric)]
    resumed = trial.user_attrs.get("resumed_from")
    origin = trial.system_attrs.get("failed_trial")
    if origin is not None:
        lines.append(f"A retry of trial {origin} (same parameters and seed).")
    if isinstance(resumed, dict):
        lines.append(
            f"Resumed from trial {resumed.get('trial')}'s checkpoint after {resumed.get('epoch')} epoch(s); "
            "the table repeats the restored epochs."
        )
    if trial.duration is not None:
        lines[-1] += f" Wall time {_duration(trial.duration.total_seconds())}."
    lines += ["", *history_table(trial.user_attrs.get("history") or {}), ""]
    config = trial.user_attrs.get("config") or {}
    if trial.user_attrs.get("baseline"):
        lines.append("The baseline: " + (_params(trial.params) if trial.params else "no searched parameters") + ".")
    else:
        changes = config_changes(config, baseline_config)
        if changes:
            lines.append("Differs from the baseline in: " + "; ".join(changes) + ".")
        elif config:
            lines.append("Same settings as the baseline.")
    if "seed" in config:
        lines.append(f"Seed {config['seed']}.")
    return "\n".join(lines)


def write_trial_note(
    study: optuna.Study, trial: FrozenTrial, trials: list[FrozenTrial] | None = None, reason: str | None = None
) -> None:
    """The note of a finished ``trial``: written by the worker that ran it, or by the one
    that failed it for a dead worker or a stale heartbeat (``reason``)."""
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    base = _baseline_trial(trials)
    baseline_config = (base.user_attrs.get("config") if base is not None else None) or None
    metric = study.metric_names[0] if study.metric_names else None
    save_note(study, trial_id(trial), trial_note(trial, metric, baseline_config, reason))


# --------------------------------------------------------------------------- during a run


class RunNotes:
    """The hooks ``dlops study run`` calls: when the study opens, after each trial, at the end.
    A failure to write a note never stops a study: it is said once and the run goes on."""

    def __init__(self, ctx: StudyContext, say: Callable[[str], None] | None = None) -> None:
        self.ctx = ctx
        self.say = say or (lambda msg: None)
        self.seconds = 0.0  # spent writing notes in this process (for the cost benchmark)
        self._warned = False

    def _guard(self, fn: Callable[..., None], *args: Any) -> None:
        start = time.perf_counter()
        try:
            fn(*args)
        except KeyboardInterrupt:
            pass  # a second Ctrl-C: the run is stopping anyway (the first one set stop.requested)
        except Exception as exc:  # noqa: BLE001 - a note is never worth a failed study
            if not self._warned:
                self.say(f"could not write the dashboard notes: {exc}")
                self._warned = True
        finally:
            self.seconds += time.perf_counter() - start

    def opened(self, study: optuna.Study) -> None:
        """The study is open (new or continued): the study note. Call under the study lock."""
        self._guard(write_study_note, study, self.ctx)

    def trial_finished(self, study: optuna.Study, storage: StudyStorage, trial: FrozenTrial) -> None:
        """After one of this worker's trials: its note, then the study note under the lock."""

        def both() -> None:
            trials = study.get_trials(deepcopy=False)
            write_trial_note(study, trial, trials)
            with storage.lock(study.study_name):
                write_study_note(study, self.ctx)

        self._guard(both)

    def trial_recovered(self, study: optuna.Study, trial: FrozenTrial, why: str) -> None:
        """A trial this worker failed for another one (dead, or silent past its heartbeat's
        grace period): its note says why, from here."""
        self._guard(write_trial_note, study, trial, None, why)


# --------------------------------------------------------------------------- study artifacts


def refresh_study_plots(study: optuna.Study, out_dir: Path | None = None) -> list[Path]:
    """Draw the study's plots (as ``dlops report`` does) and attach them to the study.
    ``out_dir``: where the PNGs stay (default: a temporary folder)."""
    from dlops.study_plots import write_study_plots

    if out_dir is not None:
        files = write_study_plots(study, out_dir)
        attach_study_plots(study, files)
        return files
    with tempfile.TemporaryDirectory(prefix="dlops-plots-") as tmp:
        files = write_study_plots(study, Path(tmp))
        attach_study_plots(study, files)
    return []


def finish_study_run(
    spec: StudySpec,
    options: RunOptions,
    study: optuna.Study,
    *,
    plots: bool = True,
    say: Callable[[str], None] | None = None,
) -> None:
    """The end of ``dlops study run``: the study note, then (unless stopped) the plots."""
    say = say or (lambda msg: None)
    try:
        storage = connect(options.storage or default_storage_url())
        if storage.note:
            say(storage.note)
        ctx = StudyContext.of(spec.for_dataset(options.dataset), options, storage.masked)
        with storage.lock(study.study_name):
            write_study_note(study, ctx)
        if plots:
            refresh_study_plots(study)
    except KeyboardInterrupt:
        say("Ctrl-C: the study's plots were not redrawn (`dlops report` redraws them)")
    except Exception as exc:  # noqa: BLE001 - the study itself is stored; say what was not
        say(f"could not refresh the dashboard notes and plots: {exc}")
