"""The written reports, in Markdown: per-spec ``report.md`` and the ``index.md`` that
puts the ResNet18 losses side by side, then every other trainer's specs.

``$DLOPS_HOME/reports/<spec>/`` holds ``final.json`` (from ``dlops final``), the plots
drawn from it (``curves.png`` and the trainer's own, e.g. the autoencoder's
``class_accuracy.png``, ``ae_losses.png`` and ``tsne.png``), the study's own plots under
``study/`` and a ``report.md`` that embeds them. :func:`build_report` (``dlops report``)
redraws all of that from the files and the study storage and writes ``reports/index.md``.
The figures themselves are drawn by :mod:`dlops.plots` and the trainer.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from dlops import plots, run_data
from dlops.errors import DlopsError, SpecError
from dlops.io import write_text_atomic
from dlops.paths import REPORTS_RESERVED, default_storage_url, folder_name, reports_dir
from dlops.spec import builtin_specs, load_spec
from dlops.storage import NoStorageYet, StorageWriteRefused, mask_url, open_storage
from dlops.studies import epochs_summary, not_dlops_reason
from dlops.study_plots import write_study_plots
from dlops.text import plural
from dlops.trainers import TRAINER_MODULES, get_trainer

if TYPE_CHECKING:  # the trainers load torch: only once a report needs one
    from dlops.trainers.base import Table, Trainer

LOSS_ORDER = ("ce", "triplet", "center")
LOSS_TITLES = {"ce": "cross-entropy", "triplet": "triplet (batch-hard)", "center": "center loss"}
STUDY_PLOT_TITLES = {
    "optimization_history": "Optimization history",
    "intermediate_values": "Intermediate values (validation metric per epoch of every trial)",
    "param_importances": "Parameter importances",
    "slice": "Slice plot",
    "parallel_coordinate": "Parallel coordinates",
}
INDEX = "index.md"
# The folders under reports/ that `dlops report` wrote, each with the name it reported there
# and the storage it read: a later report removes those that no longer report anything,
# and never a folder it did not write (a copy, a folder of the user's own).
WRITTEN = ".dlops-report.json"
_NOT_A_FOLDER = set(REPORTS_RESERVED)
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def report_folder(name: str) -> str:
    """The folder under ``reports/`` of a study that has no spec folder: the name itself
    when it is plain, else a slug and hash (``../x``, ``a/b``, ``.staging`` and
    ``index.md`` never leave or clash inside ``reports/``)."""
    plain = _PLAIN_NAME.fullmatch(name) and name.lower() not in _NOT_A_FOLDER
    return name if plain else folder_name(name)


# What the report reads from final.json, and the type of each: a schema in plain data. A
# dict is an object with those keys (``key?``: may be absent or null; the key ``str``: every
# other key); a one-item list is a list of those; a type or tuple of types is a value of
# one of them (None: null; bool is not a number).
NUMBER = (int, float)
NUMBER_OR_NULL = (int, float, None)
_SEED_SCHEMA: dict[Any, Any] = {
    "seed": int,
    "history": {str: [NUMBER_OR_NULL]},
    "epochs_trained": int,
    "resumed_from_epoch": int,
    "train_seconds": NUMBER_OR_NULL,
}
_FINAL_SCHEMA: dict[Any, Any] = {
    "spec": str,
    "trainer?": str,
    "description?": str,
    "metric?": str,
    "params": {str: object},
    "params_source": {"kind": str},
    "dataset": {"name": str, "num_classes": int, "splits": {"train": int, "val": int, "test": int}},
    "epochs": int,
    "seeds": [int],
    "config?": {"loss?": str},
    "mean": {str: NUMBER_OR_NULL},
    "std": {str: NUMBER_OR_NULL},
    "per_seed": [_SEED_SCHEMA],
    "wall_seconds": NUMBER_OR_NULL,
    "device": str,
    "created": str,
    "study?": {"name?": str},
}
_SOURCE_SCHEMA: dict[str, dict[Any, Any]] = {
    "trial": {"trial": int, "study": str, "metric?": str, "value?": NUMBER},
    "file": {"path": str},
}
_TYPE_WORDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false", None: "null"}


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _schema_problem(value: Any, schema: Any, where: str) -> str | None:
    """What in ``value`` (at ``where``) does not fit ``schema``, or None."""
    name = where or "the file"
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return f"{name} is not an object"
        named = {k.removesuffix("?"): k.endswith("?") for k in schema if k is not str}
        missing = [k for k, optional in named.items() if not optional and k not in value]
        if missing:
            return f"{name} has no {', '.join(missing)}"
        for key, item in value.items():
            sub = schema[key + "?" if named.get(key) else key] if key in named else schema.get(str)
            if sub is None or (item is None and named.get(key)):
                continue
            if named.get(key) and not isinstance(sub, (dict, list)):  # an optional value may be null
                sub = (*(sub if isinstance(sub, tuple) else (sub,)), None)
            problem = _schema_problem(item, sub, f"{where}.{key}" if where else key)
            if problem:
                return problem
        return None
    if isinstance(schema, list):
        if not isinstance(value, list):
            return f"{name} is {_shown(value)}, not a list"
        for i, item in enumerate(value):
            problem = _schema_problem(item, schema[0], f"{where}[{i}]")
            if problem:
                return problem
        return None
    types = schema if isinstance(schema, tuple) else (schema,)
    if object in types or (value is None and None in types):
        return None
    if value is not None and not isinstance(value, bool) and isinstance(value, tuple(t for t in types if t)):
        return None
    words = "a number" if int in types and float in types else " or ".join(_TYPE_WORDS[t] for t in types if t)
    return f"{name} is {_shown(value)}, not {words}" + (" or null" if None in types else "")


def _final_problem(final: Any) -> str | None:
    """What in a final.json the report cannot read (a key it reads missing, or of the
    wrong type, or figures that do not match up), or None."""
    problem = _schema_problem(final, _FINAL_SCHEMA, "")
    if problem:
        return problem
    source = final["params_source"]
    problem = _schema_problem(source, _SOURCE_SCHEMA.get(source["kind"], {}), "params_source")
    if problem:
        return problem
    per_seed, figures = final["per_seed"], list(final["mean"])
    if not per_seed:
        return "per_seed has no seeds"
    if len(per_seed) != len(final["seeds"]):
        return f"seeds lists {len(final['seeds'])}, per_seed has {len(per_seed)}"
    if not figures:
        return "mean has no figures"
    lacking = [k for k in figures if k not in final["std"]]
    if lacking:
        return f"std has no {', '.join(lacking)}"
    unpaired = [k for k in figures if (final["mean"][k] is None) != (final["std"][k] is None)]
    if unpaired:  # dlops writes both or neither: a table row would print a mean ± nothing
        k = unpaired[0]
        return f"mean.{k} is {_shown(final['mean'][k])} but std.{k} is {_shown(final['std'][k])}"
    metric = final.get("metric") or "val_top5"
    for i, seed in enumerate(per_seed):
        problem = _schema_problem({k: seed[k] for k in figures if k in seed}, {str: NUMBER_OR_NULL}, f"per_seed[{i}]")
        lacking = [k for k in dict.fromkeys(("train_loss", metric)) if k not in seed["history"]]
        if problem or lacking:
            return problem or f"per_seed[{i}].history has no {', '.join(lacking)}"
    trainer = trainer_of(final.get("trainer"))
    return trainer.final_problem(final) if trainer is not None else None


def load_final(spec_name: str, out_dir: Path | None = None) -> dict[str, Any] | None:
    """The ``final.json`` of a spec's folder; None where there is none. A damaged one (not
    JSON, or without what the report reads) is one line naming it: nothing is rewritten."""
    path = (out_dir or reports_dir() / spec_name) / "final.json"
    if not path.is_file():
        return None
    try:
        final = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        problem: str | None = f"not JSON ({exc.msg}, line {exc.lineno})"
    except UnicodeDecodeError:
        problem = "not UTF-8 text"
    else:
        problem = _final_problem(final)
    if problem:
        raise DlopsError(f"{path} is damaged: {problem} (restore it, or move it away to drop that reference run)")
    return final


def trainer_of(name: str | None) -> Trainer | None:
    """The trainer called ``name``; None for none or one this dlops does not know."""
    try:
        return get_trainer(name) if name else None
    except SpecError:
        return None


def write_final_plots(final: dict[str, Any], out_dir: Path) -> list[Path]:
    """The plots of a report folder drawn from ``final.json`` alone: ``curves.png`` and
    the trainer's own (:meth:`Trainer.final_plots`)."""
    trainer = trainer_of(final.get("trainer"))
    return plots.write_curves(final, out_dir) + (trainer.final_plots(final, out_dir) if trainer else [])


def markdown_table(table: Table) -> list[str]:
    return [
        f"### {table.title}",
        "",
        "| " + " | ".join(table.columns) + " |",
        "|---" * len(table.columns) + "|",
        *("| " + " | ".join(row) + " |" for row in table.rows),
        "",
    ]


# --------------------------------------------------------------------------- studies


@dataclass
class StudyFacts:
    name: str
    metric: str | None
    best_value: float | None
    best_trial: int | None
    complete: int
    pruned: int
    failed: int
    trial_seconds: float
    best_history: dict[str, list[Any]] | None
    epochs: dict[str, Any] | None = None  # dlops.studies.epochs_summary: trained vs unpruned

    @property
    def best_text(self) -> str:
        """The best value and its trial, or that the study has no complete trial yet."""
        if self.best_trial is None:
            return "– (no complete trial yet)"
        return f"{_fmt(self.best_value)} (trial {self.best_trial})"

    @property
    def pruning_text(self) -> str:
        """One line: the epochs the study trained against its trials unpruned."""
        e = self.epochs
        if not e:
            return "–"
        if e["share"] is None:  # trials without per-epoch values (not run by dlops)
            return "no per-epoch values recorded"
        stops = sorted(e["pruned_stop_epochs"].values())
        return f"{e['trained']} of {e['unpruned']} epochs unpruned ({100 * e['share']:.0f}%); " + (
            f"{len(stops)} pruned, stopped after epoch {', '.join(map(str, stops))}" if stops else "none pruned"
        )

    @classmethod
    def of(cls, study: optuna.Study) -> StudyFacts:
        trials = study.get_trials(deepcopy=False)
        count = lambda state: sum(t.state == state for t in trials)  # noqa: E731
        seconds = sum(
            (t.datetime_complete - t.datetime_start).total_seconds()
            for t in trials
            if t.datetime_start is not None and t.datetime_complete is not None
        )
        try:
            best = study.best_trial
        except ValueError:
            best = None
        return cls(
            name=study.study_name,
            metric=study.metric_names[0] if study.metric_names else None,
            best_value=best.value if best else None,
            best_trial=best.number if best else None,
            complete=count(TrialState.COMPLETE),
            pruned=count(TrialState.PRUNED),
            failed=count(TrialState.FAIL),
            trial_seconds=seconds,
            best_history=best.user_attrs.get("history") if best else None,
            epochs=epochs_summary(trials),
        )


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3g}"
    return str(value)


def _fmt_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()) or "–"


def _fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _mean_pm(final: dict[str, Any] | None, key: str) -> str:
    if not final or final["mean"].get(key) is None:
        return "–"
    n = len(final["per_seed"])
    if n == 1:
        return f"{final['mean'][key]:.4f} (1 seed)"
    return f"{final['mean'][key]:.4f} ± {final['std'][key]:.4f} ({n} seeds)"


def _source_text(final: dict[str, Any], facts: StudyFacts | None = None) -> str:
    """Where the run's settings came from. ``facts``: its study as it is now, which may
    have found a better trial since the run took its best."""
    src = final["params_source"]
    if src["kind"] == "trial":
        base = " (the baseline)" if src.get("baseline") else ""
        metric = src.get("metric") or "value"
        value = f"{metric} {_fmt(src.get('value'))}"
        if facts is not None and facts.name == src["study"] and facts.best_trial not in (None, src["trial"]):
            return (
                f"trial #{src['trial']}{base} of study `{src['study']}` ({value}), its best when this run was made; "
                f"its best is now trial #{facts.best_trial} ({facts.metric or metric} {_fmt(facts.best_value)})"
            )
        return f"best trial #{src['trial']}{base} of study `{src['study']}` ({value})"
    if src["kind"] == "file":
        return f"file `{src['path']}`"
    return "the spec's baseline"


# --------------------------------------------------------------------------- per-spec report


def write_spec_report(spec_name: str, study: optuna.Study | None, out_dir: Path | None = None) -> Path:
    """``reports/<spec>/report.md`` (or ``out_dir/report.md``) from the ``final.json``
    beside it (if any) and the study (if any)."""
    out_dir = out_dir or reports_dir() / spec_name
    out_dir.mkdir(parents=True, exist_ok=True)
    final = load_final(spec_name, out_dir)
    facts = StudyFacts.of(study) if study is not None else None
    lines = [f"# {spec_name}", ""]
    if final:
        if final.get("description"):
            lines += [final["description"], ""]
        trainer = trainer_of(final.get("trainer"))
        lines += [
            "## Reference run (`dlops final`)",
            "",
            "| | |",
            "|---|---|",
            f"| dataset | {run_data.data_text(final)} |",
            *(f"| {label} | {text} |" for label, text in (trainer.report_rows(final) if trainer else [])),
            f"| settings | {_fmt_params(final['params'])} |",
            f"| from | {_source_text(final, facts)} |",
            f"| epochs × seeds | {final['epochs']} × {len(final['seeds'])} |",
            f"| device | {final['device']} ({final.get('device_name') or '?'}) |",
            f"| wall time | {_fmt_seconds(final['wall_seconds'])} |",
            f"| commit | {final.get('git_commit') or '–'} |",
            f"| written | {final['created']} |",
            "",
        ]
        keys = [k for k in ("test_accuracy", "test_top1", "test_top5", "test_loss") if k in final["mean"]]
        metric = final.get("metric") or "val_top5"
        lines += [
            "### Test split (read once per seed, after training)",
            "",
            "| seed | " + " | ".join(keys) + f" | last {metric} | epochs trained (resumed at) | train time |",
            "|---" * (len(keys) + 4) + "|",
        ]
        for s in final["per_seed"]:
            last_val = (s["history"].get(metric) or [None])[-1]
            resumed = trainer.resumed_text(s) if trainer is not None else str(s["resumed_from_epoch"])
            lines.append(
                f"| {s['seed']} | "
                + " | ".join(_fmt(s.get(k)) for k in keys)
                + f" | {_fmt(last_val)} | {s['epochs_trained']} ({resumed})"
                + f" | {_fmt_seconds(s['train_seconds'])} |"
            )
        if len(final["per_seed"]) > 1:  # one seed has no spread to show
            lines.append(
                "| **mean ± std** | "
                + " | ".join(
                    "–" if final["mean"].get(k) is None else f"{final['mean'][k]:.4f} ± {final['std'][k]:.4f}"
                    for k in keys
                )
                + " | | | |"
            )
            lines += ["", "Standard deviation: sample (n-1) over seeds."]
        else:
            lines += ["", "One seed: no spread over seeds (`--seeds N` for a mean ± std)."]
        for note in trainer.test_notes(final) if trainer is not None else ():
            lines += ["", note]
        lines += ["", "![training curves](curves.png)", ""]
        if trainer is not None:
            for table in trainer.report_tables(final):
                lines += markdown_table(table)
            for png, caption in trainer.figure_captions(final):
                if (out_dir / png).exists():
                    lines += [f"![{caption}]({png})", ""]
    else:
        made_by = study.user_attrs.get("spec") if study is not None else None
        made_by = made_by if isinstance(made_by, str) else None  # plain Optuna's study may hold anything
        command = f"dlops final {spec_name}"
        if study is not None and made_by not in (None, spec_name):  # another spec's study, under its own name
            command = f"dlops final {made_by} --study-name {shlex.quote(study.study_name)}"
        if study is not None and made_by is None and spec_name not in builtin_specs():
            # not made by `dlops study run` and no spec of its name: `dlops final NAME` would be refused
            command = f"dlops final SPEC --study-name {shlex.quote(study.study_name)}"
            lines += [
                f"No reference run yet. The study records no spec (it was not made by `dlops study run`): "
                f"`{command}` trains one, with SPEC the spec its parameters belong to.",
                "",
            ]
        else:
            lines += [f"No reference run yet: `{command}` trains one.", ""]
    if facts is not None:
        lines += [
            f"## Study `{facts.name}`",
            "",
            f"- best {facts.metric or 'value'}: {facts.best_text}",
            f"- trials: {facts.complete} complete, {facts.pruned} pruned, {facts.failed} failed",
            f"- compute: {_fmt_seconds(facts.trial_seconds)} of trial time",
            f"- pruning: {facts.pruning_text}",
            "",
        ]
        for name, title in STUDY_PLOT_TITLES.items():
            if (out_dir / "study" / f"{name}.png").exists():
                lines += [f"### {title}", "", f"![{title}](study/{name}.png)", ""]
    path = out_dir / "report.md"
    _write_text(path, "\n".join(lines))
    return path


def _write_text(path: Path, text: str) -> None:
    write_text_atomic(path, text)


# --------------------------------------------------------------------------- artifacts


# --------------------------------------------------------------------------- the index


@dataclass
class Entry:
    name: str
    trainer: str | None
    loss: str | None
    final: dict[str, Any] | None
    study: optuna.Study | None
    folder: str  # under reports/: the spec's own, or report_folder(study name)
    spec: str | None = None  # the spec whose entry this is; None for a study's own entry


@dataclass
class ReportResult:
    index: Path
    files: list[Path]
    entries: list[Entry]
    skipped: dict[str, str]  # study -> why the report leaves it out (another tool's multi-objective study)
    copies: dict[str, str] = field(default_factory=dict)  # folder under reports/ -> the spec whose run it copies
    no_storage: str | None = None  # why no study was read: the storage does not exist (a mistyped --storage?)
    not_attached: str | None = None  # why the study plots are not on the dashboard: the storage refused the write
    removed: dict[str, str] = field(default_factory=dict)  # folder an earlier report wrote, now gone -> why
    kept: dict[str, tuple[str, list[str]]] = field(default_factory=dict)  # one kept: why, files not dlops's


def _entries(url: str) -> tuple[list[Entry], dict[str, str], dict[str, str], str | None]:
    """Every spec with a reference run or a study: built-in names first; the studies left
    out, with the reason; and the folders that hold a copy of another spec's reference run
    (``reports/resnet18-ce-old/``, kept before a rerun): not a spec's, left as they are;
    and, where the storage does not exist, why no study was read."""

    no_storage = None
    try:
        storage: optuna.storages.BaseStorage | None = open_storage(url, create=False)
    except NoStorageYet as exc:  # reference runs only: no study has run with this storage
        storage, no_storage = None, str(exc)
    summaries = optuna.get_all_study_summaries(storage, include_best_trial=False) if storage else []
    skipped = {s.study_name: r for s in summaries if (r := not_dlops_reason(s.directions)) is not None}
    studies = {s.study_name for s in summaries} - set(skipped)
    made_by = {s.study_name: s.user_attrs.get("spec") for s in summaries}  # the spec `dlops study run` records
    finals = {p.parent.name for p in reports_dir().glob("*/final.json")}
    loaded = {n: load_final(n) for n in sorted(finals)}  # every one checked before anything is written
    copies = {n: final["spec"] for n, final in loaded.items() if final is not None and final["spec"] != n}
    finals -= set(copies)
    builtin = builtin_specs()

    def of_spec(study: str | None, spec: str, named_by_run: bool = False) -> bool:
        """Whether ``study`` is the spec's: made by it (a study that records another spec is
        another spec's), or, one that records none, the study its reference run names."""
        if study not in studies:
            return False
        return made_by.get(study) == spec or (named_by_run and made_by.get(study) is None)

    def study_of(name: str) -> str | None:
        """A spec's study: the one its reference run names, else the default name that
        `dlops study run` gives it on the reference run's dataset (NAME-DATASET off its own);
        never a study of another spec, whatever its name."""
        final = loaded.get(name) or {}
        recorded = (final.get("study") or {}).get("name")
        if recorded is not None:  # the run's own study, or none if it is gone: never a stand-in
            return recorded if of_spec(recorded, name, named_by_run=True) else None
        dataset = (final.get("dataset") or {}).get("name")
        if name in builtin and dataset:
            derived = load_spec(name).study_name(dataset)
            if of_spec(derived, name):
                return derived
        return name if of_spec(name, name) else None

    study_for = {n: study_of(n) for n in finals}
    for n in builtin:  # a spec with its study and no reference run, unless a reference run took that study
        if n not in finals and of_spec(n, n) and n not in study_for.values():
            study_for[n] = n
    names = [n for n in builtin if n in study_for] + sorted(set(study_for) - set(builtin))
    rows = [(n, n, study_for[n], True) for n in names]  # name, folder under reports/, study, a spec's entry
    taken = {n.lower() for n in [*names, *copies]}
    for s in sorted(studies - set(study_for.values())):  # every other study, the spec-named too
        folder = report_folder(s)
        rows.append((s, folder_name(s) if folder.lower() in taken else folder, s, False))
    out = []
    for name, folder, study_name, of_a_spec in rows:
        final = loaded.get(name) if of_a_spec else None
        study = optuna.load_study(study_name=study_name, storage=storage) if study_name and storage else None
        trainer = (final or {}).get("trainer") or (study.user_attrs.get("trainer") if study else None)
        loss = ((final or {}).get("config") or {}).get("loss")
        if of_a_spec and name in builtin:
            spec = load_spec(name)
            trainer = trainer or spec.trainer
            loss = loss or spec.train.get("loss")
        elif loss is None and study is not None:
            try:
                loss = (study.best_trial.user_attrs.get("config") or {}).get("loss")
            except ValueError:
                pass
        out.append(Entry(name, trainer, loss, final, study, folder, name if of_a_spec else None))
    return out, skipped, copies, no_storage


def entry_dataset(entry: Entry) -> str | None:
    """The dataset of an entry's reference run, else of its study."""
    name = (entry.final or {}).get("dataset", {}).get("name")
    return name or (entry.study.user_attrs.get("dataset") if entry.study is not None else None)


def _curves_for(entry: Entry, key: str) -> tuple[list[list[Any]], bool]:
    """The entry's validation curves: its reference run's seeds, or else its study's
    best trial (second value True)."""
    if entry.final:
        return [s["history"].get(key, []) for s in entry.final["per_seed"]], False
    if entry.study is not None:
        history = StudyFacts.of(entry.study).best_history
        if history and history.get(key):
            return [history[key]], True
    return [], False


def loss_curve_series(entries: list[Entry], key: str = "val_top5") -> tuple[dict[str, list[list[Any]]], list[str]]:
    """Label -> validation curves (one per seed) for the chart of all losses, and the
    labels that stand in with a study's best trial for a missing reference run."""
    series: dict[str, list[list[Any]]] = {}
    dashed: list[str] = []
    for e in entries:
        runs, from_study = _curves_for(e, key)
        if not runs:
            continue
        label = f"{e.loss or e.name}" + (f" ({e.name})" if e.name != f"resnet18-{e.loss}" else "")
        label += " – best study trial" if from_study else f" – final, {plural(len(runs), 'seed')}"
        series[label] = runs
        if from_study:
            dashed.append(label)
    return series, dashed


def _stale(product: Path, source: Path) -> bool:
    return not product.exists() or product.stat().st_mtime < source.stat().st_mtime


def _figure_missing(final: dict[str, Any], out_dir: Path) -> bool:
    """Whether a figure the run's report shows is missing (one a later dlops draws, such as
    a triplet run's diagnostics, for a run made before it did)."""
    trainer = trainer_of(final.get("trainer"))
    return trainer is not None and any(not (out_dir / png).exists() for png, _ in trainer.figure_captions(final))


def build_report(
    storage: str | None = None, attach_study_plots: Callable[[optuna.Study, list[Path]], Any] | None = None
) -> ReportResult:
    """``dlops report``: refresh every spec's folder and write ``reports/index.md``.
    ``attach_study_plots(study, files)`` (the dashboard's Study Artifacts) gets every
    study's refreshed plots; where the storage refuses that write (a read-only storage),
    the report is written all the same and :attr:`ReportResult.not_attached` says why."""

    plots.use_headless_backend()
    url = storage or default_storage_url()
    root = reports_dir()
    entries, skipped, copies, no_storage = _entries(url)  # checks every final.json: a damaged one stops here
    root.mkdir(parents=True, exist_ok=True)
    _move_aside_old_index_folder(root)
    earlier = _read_written(root)
    files: list[Path] = []
    not_attached = None  # a storage that refuses writes (read-only, locked): the report is written all the same
    for e in entries:
        out_dir = root / e.folder
        if e.final and (_stale(out_dir / "curves.png", out_dir / "final.json") or _figure_missing(e.final, out_dir)):
            files += write_final_plots(e.final, out_dir)
        if e.study is not None:
            study_files = write_study_plots(e.study, out_dir / "study")
            if attach_study_plots is not None and not_attached is None:
                try:  # the dashboard's Study Artifacts, refreshed in place
                    attach_study_plots(e.study, study_files)
                except StorageWriteRefused as exc:
                    not_attached = str(exc)
            files += study_files
        else:  # a reference run whose study is gone: no plots of that study beside it
            _remove_study_plots(out_dir / "study")
        files.append(write_spec_report(e.name, e.study, out_dir))

    by_loss = {e.folder for e in entries if getattr(trainer_of(e.trainer), "index_by_loss", False)}
    resnets = sorted(
        (e for e in entries if e.folder in by_loss),
        key=lambda e: (LOSS_ORDER.index(e.loss) if e.loss in LOSS_ORDER else len(LOSS_ORDER), e.name),
    )
    others = [e for e in entries if e.folder not in by_loss]
    now = datetime.now(UTC).isoformat(timespec="seconds")
    lines = [
        "# dlops report",
        "",
        f"Written {now} by `dlops report` from `{mask_url(url)}` and `{root}`. Study figures come from "
        "`dlops study run`, test figures from `dlops final` (the test split is read only there, once per seed).",
        "",
    ]
    if resnets:
        lines += _loss_table(resnets)
        by_dataset: dict[str, list[Entry]] = {}
        for e in resnets:
            by_dataset.setdefault(entry_dataset(e) or "an unknown dataset", []).append(e)
        panels = {name: loss_curve_series(group) for name, group in by_dataset.items()}
        fig = plots.plot_validation_curves_by_dataset(panels, "validation top-5", "Validation top-5 per epoch")
        files.append(plots.save_figure(fig, root / "val_top5_by_loss.png"))
        lines += [
            "![validation top-5 per epoch, one curve per loss](val_top5_by_loss.png)",
            "",
            f"One chart per dataset ({', '.join(by_dataset)}). "
            "Solid: reference runs (mean over seeds, band min–max). Dashed: a study's best trial "
            "where there is no reference run yet.",
            "",
        ]
    else:
        (root / "val_top5_by_loss.png").unlink(missing_ok=True)  # drawn while there were some
        lines += [
            "## ResNet18: the three losses",
            "",
            "No ResNet18 study or reference run yet (`dlops study run --loss ce`, `dlops final --loss ce`).",
            "",
        ]
    for e in others:
        lines += _other_section(e)
    if skipped:
        lines += ["## Left out", "", *(f"- study `{name}`: {why}" for name, why in skipped.items()), ""]
    if copies:
        lines += ["## Copies", ""]
        lines += [f"- `{n}/`: a copy of a reference run of `{spec}`, left as it is" for n, spec in copies.items()]
        lines.append("")
    index = root / INDEX
    _write_text(index, "\n".join(lines))
    removed, kept = _remove_stale_folders(root, earlier, entries, url, no_storage is None)
    return ReportResult(
        index=index,
        files=[index, *files],
        entries=entries,
        skipped=skipped,
        copies=copies,
        no_storage=no_storage,
        not_attached=not_attached,
        removed=removed,
        kept=kept,
    )


def _read_written(root: Path) -> dict[str, dict[str, str]]:
    """The folders an earlier ``dlops report`` wrote (:data:`WRITTEN`): folder -> the name
    it reported there and the storage (masked) it read. Nothing where the record is absent
    (a dlops before it) or unreadable: then no folder is taken for dlops's own."""
    try:
        data = json.loads((root / WRITTEN).read_text())
    except (OSError, ValueError):
        return {}
    folders = data.get("folders") if isinstance(data, dict) else None
    if not isinstance(folders, dict):
        return {}
    return {
        folder: {"name": record["name"], "storage": record["storage"]}
        for folder, record in folders.items()
        if isinstance(record, dict)
        and isinstance(record.get("name"), str)
        and isinstance(record.get("storage"), str)
        and Path(folder).name == folder  # a folder right under reports/, whatever the file says
        and folder not in ("", ".", "..")
        and not folder.startswith(".")
        and folder.lower() not in _NOT_A_FOLDER
    }


def _remove_stale_folders(
    root: Path, earlier: dict[str, dict[str, str]], entries: list[Entry], url: str, storage_read: bool
) -> tuple[dict[str, str], dict[str, tuple[str, list[str]]]]:
    """Remove the folders an earlier report wrote from this storage that report nothing now
    (a deleted study; a study that a reference run has taken over, reported in the spec's
    folder). Only the files dlops writes there go; a folder holding anything else (a file of
    the user's, a ``final.json``) stays with it. A folder written from another storage, or
    when this one could not be read, is left for a report on that storage, and stays on
    record. Returns folder -> why it went, and folder -> the files that kept it."""
    here = mask_url(url)
    now = {e.folder: {"name": e.name, "storage": here} for e in entries}
    current = {folder.lower() for folder in now}  # a case-insensitive file system: the same folder
    carried: dict[str, dict[str, str]] = {}
    removed: dict[str, str] = {}
    kept: dict[str, tuple[str, list[str]]] = {}
    for folder, record in earlier.items():
        path = root / folder
        if folder.lower() in current or path.is_symlink() or not path.is_dir():
            continue  # reported now, gone, or replaced by a link of the user's
        if record["storage"] != here or not storage_read:
            carried[folder] = record
            continue
        if (path / "final.json").exists():  # a reference run (or a copy of one): never dlops report's to remove
            continue
        name = record["name"]
        moved = [e.folder for e in entries if name in (e.name, e.study.study_name if e.study else None)]
        why = f"{name} is reported in reports/{moved[0]}/ now" if moved else f"{name} has no study in {here} any more"
        left = _remove_report_files(path)
        if left:
            kept[folder] = (why, left)
        else:
            removed[folder] = why
    write_text_atomic(root / WRITTEN, json.dumps({"folders": {**carried, **now}}, indent=1, sort_keys=True) + "\n")
    return removed, kept


def _remove_report_files(folder: Path) -> list[str]:
    """Remove from ``folder`` what ``dlops report`` and ``dlops final`` draw there (its
    ``report.md``, the run's and the study's plots), then the folder if that empties it.
    Returns what is left in it (files dlops did not write), sorted."""
    names = {"report.md", "curves.png"}
    for trainer_name in TRAINER_MODULES:
        trainer = trainer_of(trainer_name)
        names.update(png for png, _ in (trainer.report_figures if trainer is not None else ()))
    for name in names:
        (folder / name).unlink(missing_ok=True)
    _remove_study_plots(folder / "study")
    try:
        folder.rmdir()
    except OSError:
        left = sorted(p for p in folder.rglob("*"))
        return [str(p.relative_to(folder)) for p in [p for p in left if not p.is_dir()] or left]
    return []


def _remove_study_plots(folder: Path) -> None:
    """Take the study plots that dlops drew out of ``folder`` (a report's ``study/``), and
    the folder once empty; a file of another name stays, and so does the folder then."""
    for name in STUDY_PLOT_TITLES:
        (folder / f"{name}.png").unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:  # absent, or holding a file dlops did not draw
        pass


def _move_aside_old_index_folder(root: Path) -> None:
    """Older dlops versions wrote the report of a study named ``index.md`` to the folder
    ``reports/index.md``, where the index goes: it moves to that study's folder now."""
    old = root / INDEX
    if not old.is_dir():
        return
    new = root / report_folder(INDEX)
    if new.exists():
        raise DlopsError(f"{old} is a folder (a study's report from an older dlops; {new} exists): remove it")
    old.rename(new)


def _spec_and_study(e: Entry) -> str:
    if e.study is None:
        return f"`{e.name}` (no study)"
    if e.spec is None:  # a study's own entry: the spec that made it, if another name
        made_by = e.study.user_attrs.get("spec")
        return f"study `{e.study.study_name}`" + (f" (spec `{made_by}`)" if made_by not in (None, e.name) else "")
    return f"`{e.name}`" + ("" if e.study.study_name == e.name else f", study `{e.study.study_name}`")


def _loss_table(entries: list[Entry]) -> list[str]:
    head = [f"[{LOSS_TITLES.get(e.loss or '', e.loss or e.name)}]({e.folder}/report.md)" for e in entries]
    rows: list[tuple[str, list[str]]] = []
    facts = [StudyFacts.of(e.study) if e.study is not None else None for e in entries]
    rows.append(("spec / study", [_spec_and_study(e) for e in entries]))
    rows.append(
        ("dataset", [run_data.short_data_text(e.final) if e.final else entry_dataset(e) or "–" for e in entries])
    )
    rows.append(
        (
            "best in the study (its objective)",
            [
                f"{_fmt(f.best_value)} {f.metric or ''} (trial {f.best_trial})"
                if f and f.best_value is not None
                else "–"
                for f in facts
            ],
        )
    )
    rows.append(("final test top-1 (mean ± std)", [_mean_pm(e.final, "test_top1") for e in entries]))
    rows.append(("final test top-5 (mean ± std)", [_mean_pm(e.final, "test_top5") for e in entries]))
    rows.append(("trials complete / pruned", [f"{f.complete} / {f.pruned}" if f else "–" for f in facts]))
    rows.append(("pruning: epochs trained", [f.pruning_text if f else "–" for f in facts]))
    rows.append(
        (
            "compute: study trials / final run",
            [
                f"{_fmt_seconds(f.trial_seconds) if f else '–'} / {_fmt_seconds((e.final or {}).get('wall_seconds'))}"
                for e, f in zip(entries, facts)
            ],
        )
    )
    rows.append(
        (
            "final settings",
            [
                f"{_fmt_params(e.final['params'])} ({_source_text(e.final, f)})" if e.final else "–"
                for e, f in zip(entries, facts)
            ],
        )
    )
    rows.append(
        (
            "final epochs × seeds",
            [f"{e.final['epochs']} × {len(e.final['seeds'])}" if e.final else "–" for e in entries],
        )
    )
    lines = ["## ResNet18: the three losses", "", "| | " + " | ".join(head) + " |", "|---" * (len(entries) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(values) + " |" for label, values in rows]
    measured = {run_data.data_key(e.final) for e in entries if e.final}
    if len(measured) > 1:
        lines += [
            "",
            "**The reference runs were not measured on the same data** (see the dataset row): their test "
            "figures do not compare. Run `dlops final` of each loss with the same `--dataset`, "
            "`--subset-classes` and `--subset-per-class`.",
        ]
    return [*lines, ""]


def _other_section(e: Entry) -> list[str]:
    trainer = trainer_of(e.trainer)
    title = trainer.title if trainer is not None else e.name
    facts = StudyFacts.of(e.study) if e.study is not None else None
    # a reference run belongs to a spec; an entry without one is a study (of a spec or not)
    what = f"Spec {_spec_and_study(e)}" if e.final or e.study is None else f"Study `{e.study.study_name}`"
    lines = [f"## {title}", "", f"{what} — [full report]({e.folder}/report.md)", ""]
    lines += ["| | |", "|---|---|"]
    if e.final:
        lines.append(f"| dataset | {run_data.short_data_text(e.final)} |")
        lines += [f"| {label} | {text} |" for label, text in (trainer.report_rows(e.final) if trainer else [])]
        if "test_accuracy" in e.final["mean"]:
            lines.append(f"| final test accuracy (mean ± std) | {_mean_pm(e.final, 'test_accuracy')} |")
        lines.append(f"| final test top-5 (mean ± std) | {_mean_pm(e.final, 'test_top5')} |")
        lines.append(f"| final settings | {_fmt_params(e.final['params'])} ({_source_text(e.final, facts)}) |")
        lines.append(f"| final epochs × seeds | {e.final['epochs']} × {len(e.final['seeds'])} |")
    if facts:
        lines.append(f"| best {facts.metric or 'value'} in the study | {facts.best_text} |")
        lines.append(f"| trials complete / pruned | {facts.complete} / {facts.pruned} |")
        lines.append(f"| pruning: epochs trained | {facts.pruning_text} |")
    lines.append(
        f"| compute: study trials / final run | {_fmt_seconds(facts.trial_seconds) if facts else '–'} / "
        f"{_fmt_seconds((e.final or {}).get('wall_seconds'))} |"
    )
    lines.append("")
    figures = () if trainer is None else trainer.figure_captions(e.final) if e.final else trainer.report_figures
    for png, caption in (("curves.png", "curves"), *figures):
        if (reports_dir() / e.folder / png).exists():
            lines += [f"![{caption}]({e.folder}/{png})", ""]
    return lines
