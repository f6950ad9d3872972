"""Replay pruners on recorded learning curves: what each pruner saves, and what it costs.

A study trained without pruning (or the complete trials of one) holds every trial's
objective after every epoch. :func:`replay` feeds those curves, trial by trial in their
original order and epoch by epoch, into an in-memory Optuna study with the pruner under
test (``trial.report``, ``trial.should_prune``, ``study.tell(..., PRUNED)``) and counts
what the pruner would have trained and which trials it would have kept. The pruners
are built by :func:`dlops.sampling.make_pruner` from a spec's ``[pruner]`` table, so a
replayed pruner is exactly the one a spec would run.

What a replay cannot show: in a live study the sampler learns from the pruned trials, so
after the first pruned trial the live study proposes other trials than the recorded
ones. The replay answers "on these trials, in this order".

Curves travel as JSON (``format: dlops-curves``, version 1)::

    {"format": "dlops-curves", "version": 1, "source": "...", "spec": "resnet18-ce",
     "dataset": "digits", "metric": "val_top1", "direction": "maximize",
     "settings": {...}, "command": "...",
     "trials": [{"number": 0, "params": {...}, "values": [0.41, 0.77, ...],
                 "end": "complete", "value": 0.93}, ...]}

``end`` is ``complete`` (trained every epoch), ``pruned`` (cut short by the study's own
pruner: not a full curve) or ``diverged`` (stopped itself on a non-finite loss; every
pruner pays the same epochs for it). ``value`` is the trial's objective (its last epoch's
value where absent). Imports Optuna, not torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna
from optuna.trial import TrialState

from dlops.errors import DlopsError
from dlops.io import write_text_atomic
from dlops.paths import default_storage_url
from dlops.sampling import make_pruner
from dlops.studies import load_existing_study, pruned_by_pruner, require_dlops_study

FORMAT = "dlops-curves"
VERSION = 1
ENDS = ("complete", "pruned", "diverged")
DEFAULT_TOLERANCE = 0.005  # "within 0.5 points" of an accuracy in [0, 1]


class ReplayError(DlopsError):
    """Curves that cannot be replayed (cut short, malformed, unknown pruner)."""


@dataclass
class TrialCurve:
    number: int
    values: list[float]
    end: str = "complete"
    value: float | None = None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> float | None:
        """The objective the trial ends with (None for a diverged or pruned one)."""
        if self.end != "complete":
            return None
        return self.value if self.value is not None else (self.values[-1] if self.values else None)


@dataclass
class Curves:
    trials: list[TrialCurve]
    direction: Literal["maximize", "minimize"] = "maximize"
    metric: str | None = None
    source: str = ""
    spec: str | None = None
    dataset: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    command: str | None = None

    @property
    def pruned(self) -> list[TrialCurve]:
        return [t for t in self.trials if t.end == "pruned"]

    def complete_only(self) -> Curves:
        return dataclasses.replace(self, trials=[t for t in self.trials if t.end != "pruned"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "source": self.source,
            "spec": self.spec,
            "dataset": self.dataset,
            "metric": self.metric,
            "direction": self.direction,
            "settings": self.settings,
            "command": self.command,
            "trials": [
                {"number": t.number, "params": t.params, "values": t.values, "end": t.end, "value": t.value}
                for t in self.trials
            ],
        }


def _finite(v: Any) -> bool:
    """A number that is finite as a float (an integer of 400 digits is not)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def curves_from_study(study: optuna.Study) -> Curves:
    """The finished trials of ``study`` as curves, in trial order. A PRUNED trial is
    ``diverged`` when its stop was a non-finite loss (dlops records the reason), else
    ``pruned``; RUNNING, WAITING and FAIL trials are left out."""
    require_dlops_study(study)
    trials = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        values = [float(t.intermediate_values[s]) for s in sorted(t.intermediate_values)]
        end = "complete" if t.state == TrialState.COMPLETE else "pruned" if pruned_by_pruner(t) else "diverged"
        value = float(t.value) if t.value is not None and math.isfinite(t.value) else None
        trials.append(TrialCurve(number=t.number, values=values, end=end, value=value, params=dict(t.params)))
    return Curves(
        trials=trials,
        direction="maximize" if study.direction == optuna.study.StudyDirection.MAXIMIZE else "minimize",
        metric=study.metric_names[0] if study.metric_names else None,
        source=study.study_name,
        spec=_text_attr(study.user_attrs.get("spec")),  # a study made by plain Optuna may hold anything
        dataset=_text_attr(study.user_attrs.get("dataset")),
    )


def _text_attr(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def write_curves(curves: Curves, path: Path) -> None:
    write_text_atomic(path, json.dumps(curves.to_dict(), indent=1) + "\n")


def _shown(value: Any) -> str:
    """``repr(value)``, cut short enough for one line."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def read_curves(path: Path) -> Curves:
    """Curves from a dlops-curves JSON file; anything else is refused in one line naming
    the file and what is wrong."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ReplayError(f"cannot read curves file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ReplayError(f"{path}: not JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        if not exc.doc.strip():
            raise ReplayError(f"{path}: the file is empty, not a {FORMAT} file") from None
        raise ReplayError(f"{path}: not JSON ({exc.msg}, line {exc.lineno})") from None
    except (ValueError, RecursionError) as exc:  # an integer of too many digits, nesting too deep
        raise ReplayError(f"{path}: not JSON dlops can read ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or not isinstance(raw.get("trials"), list):
        raise ReplayError(f"{path}: not a {FORMAT} file (a JSON object with format {FORMAT!r} and a trials list)")
    if raw.get("direction", "maximize") not in ("maximize", "minimize"):
        raise ReplayError(f"{path}: direction must be maximize or minimize, not {_shown(raw.get('direction'))}")
    for key in ("spec", "dataset", "metric", "command"):
        if not isinstance(raw.get(key), str | None):
            raise ReplayError(f"{path}: {key} must be a string or null, not {_shown(raw[key])}")
    if not isinstance(raw.get("settings"), dict | None):
        raise ReplayError(f"{path}: settings must be an object or null, not {_shown(raw['settings'])}")
    trials = []
    seen: dict[int, int] = {}
    for i, t in enumerate(raw["trials"]):
        where = f"{path}: trials[{i}]"
        if not isinstance(t, dict) or not isinstance(t.get("values"), list):
            raise ReplayError(f"{where}: needs a values list")
        number = t.get("number", i)
        if isinstance(number, bool) or not isinstance(number, int) or number < 0:
            raise ReplayError(f"{where}: number must be a non-negative integer, not {_shown(number)}")
        if number in seen:
            raise ReplayError(f"{where}: trial number {number} appears twice (also trials[{seen[number]}])")
        seen[number] = i
        if not all(_finite(v) for v in t["values"]):
            raise ReplayError(f"{where}: values must be finite numbers")
        end = t.get("end", "complete")
        if end not in ENDS:
            raise ReplayError(f"{where}: end must be one of {', '.join(ENDS)}, not {_shown(end)}")
        value = t.get("value")
        if value is not None and not _finite(value):
            raise ReplayError(f"{where}: value must be a finite number or null")
        if end == "complete" and not t["values"]:
            raise ReplayError(f"{where}: a complete trial needs at least one value")
        params = t.get("params")
        if not isinstance(params, dict | None):
            raise ReplayError(f"{where}: params must be an object or null, not {_shown(params)}")
        trials.append(
            TrialCurve(
                number=number,
                values=[float(v) for v in t["values"]],
                end=end,
                value=None if value is None else float(value),
                params=dict(params or {}),
            )
        )
    return Curves(
        trials=trials,
        direction=raw.get("direction", "maximize"),
        metric=raw.get("metric"),
        source=str(raw.get("source") or Path(path).name),
        spec=raw.get("spec"),
        dataset=raw.get("dataset"),
        settings=dict(raw.get("settings") or {}),
        command=raw.get("command"),
    )


# --- pruners -------------------------------------------------------------------------

PRUNER_TYPES = ("none", "median", "percentile", "successive_halving", "hyperband")
_ALIASES = {
    "sha": "successive_halving",
    "asha": "successive_halving",
    "successive-halving": "successive_halving",
    "nop": "none",
}

# What `dlops study replay` tries when no --pruner is given: each pruner type at the
# settings a spec would plausibly give it.
DEFAULT_CANDIDATES = (
    "none",
    "median",
    "median:n_startup_trials=3,n_warmup_steps=1",
    "median:n_startup_trials=5,n_warmup_steps=1",
    "median:n_startup_trials=5,n_warmup_steps=2",
    "median:n_startup_trials=3,n_warmup_steps=0",
    "percentile:percentile=25,n_startup_trials=3,n_warmup_steps=0",
    "percentile:percentile=10,n_startup_trials=3,n_warmup_steps=0",
    "percentile:percentile=25,n_startup_trials=5,n_warmup_steps=1",
    "percentile:percentile=75,n_startup_trials=5,n_warmup_steps=1",
    "successive_halving:min_resource=1,reduction_factor=2",
    "successive_halving:min_resource=1,reduction_factor=3",
    "successive_halving:min_resource=1,reduction_factor=4",
    "successive_halving:min_resource=2,reduction_factor=2",
    "successive_halving:min_resource=1,reduction_factor=2,min_early_stopping_rate=1",
    "hyperband:min_resource=1,reduction_factor=2",
    "hyperband:min_resource=1,reduction_factor=3",
)


def _scalar(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_pruner(text: str) -> dict[str, Any]:
    """``TYPE[:key=value,...]`` as a spec's ``[pruner]`` table, e.g.
    ``median:n_startup_trials=3,n_warmup_steps=1`` -> ``{"type": "median", ...}``."""
    kind, _, rest = text.strip().partition(":")
    kind = _ALIASES.get(kind.strip().lower(), kind.strip().lower())
    if kind not in PRUNER_TYPES:
        raise ReplayError(
            f"unknown pruner {kind!r} in {text!r} (choose from {', '.join(PRUNER_TYPES)}; "
            "settings as TYPE:key=value,key=value)"
        )
    table: dict[str, Any] = {"type": kind}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not re.fullmatch(r"[a-z_]+", key):
            raise ReplayError(f"pruner setting {item!r} in {text!r} is not key=value")
        if key == "type":
            raise ReplayError(f"pruner setting {item!r} in {text!r}: the type comes before the colon (TYPE:key=value)")
        if key in table:
            raise ReplayError(f"pruner setting {key!r} appears twice in {text!r}")
        table[key] = _scalar(value.strip())
    try:
        make_pruner(table)  # a key the type does not take, a bad value: one line naming the text
    except DlopsError as exc:
        raise ReplayError(f"pruner {text!r}: {str(exc).removeprefix('[pruner]: ')}") from None
    return table


def pruner_label(table: dict[str, Any]) -> str:
    """The inverse of :func:`parse_pruner`."""
    rest = ",".join(f"{k}={v}" for k, v in table.items() if k != "type")
    return table.get("type", "median") + (f":{rest}" if rest else "")


def build_pruner(table: dict[str, Any]) -> optuna.pruners.BasePruner:
    """The pruner a spec with this ``[pruner]`` table runs (:func:`dlops.sampling.make_pruner`)."""
    kind = table.get("type", "median")
    if kind not in PRUNER_TYPES:
        raise ReplayError(f"unknown pruner type {kind!r} (choose from {', '.join(PRUNER_TYPES)})")
    try:
        return make_pruner(dict(table))
    except (ValueError, DlopsError) as exc:
        raise ReplayError(f"pruner {pruner_label(table)}: {exc}") from None


# --- the replay --------------------------------------------------------------------------


@dataclass
class ReplayResult:
    pruner: str
    table: dict[str, Any]
    epochs: int  # epochs the pruner lets train
    total_epochs: int  # epochs of the same trials unpruned
    completed: list[int]  # trial numbers that ran to the end
    pruned_at: dict[int, int]  # trial number -> epochs trained when pruned
    best_trial: int | None  # the best trial that ran to the end
    best_value: float | None
    best_rank: int | None  # its rank among the unpruned values (1 = the unpruned best)
    unpruned_best: float | None
    unpruned_best_trial: int | None
    gap: float | None  # how far best_value falls short of unpruned_best (>= 0)
    top3_kept: int
    top3: list[int]
    tolerance: float = DEFAULT_TOLERANCE

    @property
    def share(self) -> float:
        return self.epochs / self.total_epochs if self.total_epochs else float("nan")

    @property
    def kept_best(self) -> bool:
        return self.gap is not None and self.gap <= self.tolerance + 1e-12

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["pruned_at"] = {str(k): v for k, v in self.pruned_at.items()}
        d.update(share=self.share, kept_best=self.kept_best)
        return d


def unpruned_ranking(curves: Curves) -> list[TrialCurve]:
    """The trials that end with a value, best first (ties: lower trial number first)."""
    sign = -1.0 if curves.direction == "maximize" else 1.0
    ranked = [t for t in curves.trials if t.final is not None]
    return sorted(ranked, key=lambda t: (sign * t.final, t.number))  # type: ignore[operator]


def replay_one(
    curves: Curves, table: dict[str, Any], *, tolerance: float = DEFAULT_TOLERANCE, study_name: str | None = None
) -> ReplayResult:
    """Feed ``curves`` through the pruner of ``table`` (a spec's ``[pruner]``).

    The in-memory study is named after the curves' source: Hyperband assigns a trial to
    its bracket by a hash of the study name and trial number, so the replay of a study
    uses the brackets that study used."""
    if curves.pruned:
        raise ReplayError(
            f"{curves.source}: {len(curves.pruned)} trial(s) were pruned (curves cut short); "
            "use only the complete ones (--complete-only)"
        )
    pruner = build_pruner(table)
    study = optuna.create_study(
        storage=None,
        study_name=study_name or curves.source or "replay",
        direction=curves.direction,
        pruner=pruner,
        sampler=optuna.samplers.RandomSampler(seed=0),
    )
    epochs, completed, pruned_at = 0, [], {}
    finals: dict[int, float] = {}
    for t in curves.trials:
        trial = study.ask()
        stopped = None
        for step, value in enumerate(t.values):
            trial.report(value, step)
            if trial.should_prune():
                stopped = step + 1
                break
        if stopped is not None:  # (after its last epoch too: the epochs are spent, the result thrown away)
            epochs += stopped
            pruned_at[t.number] = stopped
            study.tell(trial, state=TrialState.PRUNED)
            continue
        epochs += len(t.values)
        if t.final is None:  # diverged: stops itself whatever the pruner
            study.tell(trial, state=TrialState.PRUNED)
            continue
        study.tell(trial, t.final)
        completed.append(t.number)
        finals[t.number] = t.final
    ranking = unpruned_ranking(curves)
    rank_of = {t.number: i + 1 for i, t in enumerate(ranking)}
    top3 = [t.number for t in ranking[:3]]
    unpruned_best = ranking[0].final if ranking else None
    best_trial = best_value = best_rank = gap = None
    if finals:
        best_trial = min(finals, key=lambda n: rank_of[n])
        best_value, best_rank = finals[best_trial], rank_of[best_trial]
        # the same value is no gap, infinite ones included (inf - inf is nan)
        gap = 0.0 if best_value == unpruned_best else abs(unpruned_best - best_value)  # type: ignore[operator]
    return ReplayResult(
        pruner=pruner_label(table),
        table=dict(table),
        epochs=epochs,
        total_epochs=sum(len(t.values) for t in curves.trials),
        completed=completed,
        pruned_at=pruned_at,
        best_trial=best_trial,
        best_value=best_value,
        best_rank=best_rank,
        unpruned_best=unpruned_best,
        unpruned_best_trial=ranking[0].number if ranking else None,
        gap=gap,
        top3_kept=sum(n in completed for n in top3),
        top3=top3,
        tolerance=tolerance,
    )


def replay(
    curves: Curves,
    pruners: Iterable[str | dict[str, Any]] | None = None,
    *,
    complete_only: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
) -> list[ReplayResult]:
    """Replay every pruner (``TYPE[:key=value,...]`` or a ``[pruner]`` table) on ``curves``."""
    if curves.pruned:
        if not complete_only:
            raise ReplayError(
                f"{curves.source}: {len(curves.pruned)} of {len(curves.trials)} trials were pruned "
                "(curves cut short); --complete-only replays the other "
                f"{len(curves.trials) - len(curves.pruned)}"
            )
        curves = curves.complete_only()
    if not [t for t in curves.trials if t.final is not None]:
        raise ReplayError(f"{curves.source}: no trial with a final value to replay")
    if not any(t.values for t in curves.trials):
        raise ReplayError(f"{curves.source}: no learning curves recorded (no trial reported a value per epoch)")
    tables = [parse_pruner(p) if isinstance(p, str) else dict(p) for p in (pruners or DEFAULT_CANDIDATES)]
    return [replay_one(curves, table, tolerance=tolerance) for table in tables]


def choose(
    results: list[ReplayResult], orders: dict[str, dict[str, float]] | None = None, min_orders: float = 0.8
) -> ReplayResult | None:
    """The pruner that keeps the unpruned best (within the tolerance) with the fewest
    epochs; ties go to more of the top 3 kept, then to the order given. With ``orders``
    (:func:`replay_orders`), only a pruner that also keeps the best in at least
    ``min_orders`` of the shuffled orders: one order of 24 trials is easily lucky."""
    kept = [
        r
        for r in results
        if r.kept_best and (orders is None or orders.get(r.pruner, {}).get("kept_best", 0.0) >= min_orders - 1e-9)
    ]
    if not kept:
        return None
    return min(kept, key=lambda r: (r.epochs, -r.top3_kept))


def load_curves(name: str, url: str | None = None) -> Curves:
    """Curves from a JSON file (a path that exists or ends in .json) or from the study
    ``name`` in the storage at ``url``."""
    path = Path(name)
    if path.suffix == ".json" or path.is_file():
        return read_curves(path)

    return curves_from_study(load_existing_study(name, url or default_storage_url()))


def format_table(results: list[ReplayResult]) -> str:
    """A plain-text table, one row per pruner: epochs trained (and their share of the
    unpruned total), the best trial that survives (its unpruned rank), its value, the gap
    to the unpruned best in points (x100), how many of the unpruned top 3 survive."""
    rows = [["pruner", "epochs", "share", "best kept", "value", "gap pts", "top-3", "kept best"]]
    for r in results:
        rows.append(
            [
                r.pruner,
                f"{r.epochs}/{r.total_epochs}",
                f"{100 * r.share:.0f}%",
                "-" if r.best_rank is None else f"#{r.best_rank} (trial {r.best_trial})",
                "-" if r.best_value is None else f"{r.best_value:.4f}",
                "-" if r.gap is None else f"{100 * r.gap:.2f}",
                f"{r.top3_kept}/{len(r.top3)}",
                "yes" if r.kept_best else "no",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    ]
    lines = [line.rstrip() for line in lines]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def replay_orders(
    curves: Curves,
    pruners: Iterable[str | dict[str, Any]] | None = None,
    *,
    orders: int = 20,
    seed: int = 0,
    keep_first: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
) -> dict[str, dict[str, float]]:
    """How a pruner fares when the same trials come in other orders: ``orders`` shuffles
    (the first trial, a study's baseline, stays first with ``keep_first``), per pruner the
    share of orders that keep the unpruned best and the mean share of epochs. A check on
    a choice made on one order, not a replay of any real study."""
    import random

    rng = random.Random(seed)
    tables = [parse_pruner(p) if isinstance(p, str) else dict(p) for p in (pruners or DEFAULT_CANDIDATES)]
    head, rest = (curves.trials[:1], curves.trials[1:]) if keep_first else ([], list(curves.trials))
    out: dict[str, dict[str, float]] = {pruner_label(t): {"kept_best": 0.0, "share": 0.0} for t in tables}
    for _ in range(orders):
        shuffled = list(rest)
        rng.shuffle(shuffled)
        order = dataclasses.replace(curves, trials=head + shuffled)
        for r in replay(order, tables, tolerance=tolerance):
            out[r.pruner]["kept_best"] += r.kept_best / orders
            out[r.pruner]["share"] += r.share / orders
    return out
