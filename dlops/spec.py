"""Study specs: one TOML file per study, turned into checked dataclasses.

A spec names a trainer (``resnet18``, ``autoencoder``), its fixed settings
(``[train]``, with per-dataset overrides in ``[datasets.NAME]``), the search space
(``[search.PARAM]``), the baseline enqueued as trial 0 (``[baseline]``), the pruner,
the sampler and the default budget. Unknown keys, bad ranges and unknown losses are
rejected with a :class:`~dlops.errors.SpecError` naming the file and the key.

A spec can be loaded with explicit overrides (:func:`override_table`): a value replaces
one the spec has, :class:`Add` adds a key it lacks, :data:`REMOVE` drops one and
:class:`Replace` swaps a whole table; a key that is not where an override expects it
is an error, so an override never silently stops applying.
"""

from __future__ import annotations

import copy
import dataclasses
import decimal
import enum
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from dlops.errors import DlopsError, SpecError
from dlops.paths import REPORTS_RESERVED
from dlops.trainers import get_trainer

if TYPE_CHECKING:  # the protocol's module loads torch; the spec loader need not
    from dlops.trainers.base import TrainerConfig

TOP_LEVEL_KEYS = {
    "name",
    "description",
    "trainer",
    "metric",
    "direction",
    "n_trials",
    "timeout",
    "train",
    "final",
    "datasets",
    "search",
    "baseline",
    "pruner",
    "sampler",
}
PARAM_TYPES = {"float", "int", "categorical"}
PARAM_KEYS = {"type", "low", "high", "log", "step", "choices", "when"}
PRUNERS = {"median", "percentile", "hyperband", "successive_halving", "none"}
SAMPLERS = {"tpe", "random"}
FINAL_KEYS = {"epochs", "seeds"}
MAX_SEEDS = 1000  # a reference run's seeds: each is a whole training run, so more is a typo

# Settings of the run rather than hyperparameters: a spec fixes them ([train], the command
# line), it never searches them (a params file of ``dlops final`` may not set most of them
# either: ``dlops.params.RUN_SETTINGS``).
NOT_SEARCHABLE = {
    "loss": "a study compares one loss; each loss has its own spec",
    "model": "the spec names the model",
    "dataset": "a study runs on one dataset, which --dataset chooses",
    "data_root": "it says where the data lies",
    "epochs": "every trial of a study trains the same epochs, --epochs; the pruner stops weak trials early",
    "seed": "trial k trains with seed + k, --seed",
    "device": "it says where a trial runs, --device",
    "subset_classes": "every trial of a study trains on the same data, --subset-classes",
    "subset_per_class": "every trial of a study trains on the same data, --subset-per-class",
    "eval_batch_size": "it changes only speed, not results",
    "compile": "it changes only speed, not results",
    "cudnn_benchmark": "it changes only speed, not results",
}


@dataclass(frozen=True)
class ParamSpec:
    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    # Conditional parameter: searched only where every (name, value) pair matches the
    # value an earlier searched parameter took (``when = { triplet_soft = false }``).
    when: tuple[tuple[str, Any], ...] = ()

    def active(self, params: dict[str, Any]) -> bool:
        """Whether this parameter is searched, given the values chosen before it."""
        return all(params.get(name) == value for name, value in self.when)

    def contains(self, value: Any) -> bool:
        if self.type == "categorical":  # 1 is not true
            return any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        assert self.low is not None and self.high is not None  # numeric parameters have both
        if not self.low <= value <= self.high:
            return False
        if self.step is None:
            return True
        if self.type == "int":  # Optuna's test: an int off the grid is not in the distribution
            return isinstance(value, int) and (value - self.low) % self.step == 0
        k = (value - self.low) / self.step  # Optuna's test for a float grid
        return abs(k - round(k)) < 1e-8

    def describe(self) -> str:
        """The range or choices, as a spec writes them (``4..8``, ``4..10 step 3``,
        ``choices true, false``)."""
        if self.type == "categorical":
            return "choices " + ", ".join(_toml_value(c) for c in self.choices)
        return f"{self.low:g}..{self.high:g}" + (f" step {self.step:g}" if self.step is not None else "")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, str) else str(value)


@dataclass
class StudySpec:
    name: str
    trainer: str
    train: dict[str, Any]
    search: dict[str, ParamSpec]
    baseline: dict[str, Any]
    description: str = ""
    metric: str = "val_top5"
    direction: str = "maximize"
    n_trials: int = 20
    timeout: float | None = None
    final: dict[str, Any] = field(default_factory=dict)
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)
    dataset_metrics: dict[str, str] = field(default_factory=dict)  # [datasets.NAME] metric
    pruner: dict[str, Any] = field(default_factory=lambda: {"type": "median"})
    sampler: dict[str, Any] = field(default_factory=lambda: {"type": "tpe", "seed": 0})
    path: Path | None = None

    def for_dataset(self, dataset: str | None) -> StudySpec:
        """The spec as it runs on ``dataset`` (default: its own): with that dataset's
        ``metric`` where ``[datasets.NAME]`` names one."""
        ds = dataset or self.train.get("dataset")
        return dataclasses.replace(self, metric=self.dataset_metrics.get(ds, self.metric) if ds else self.metric)

    def study_name(self, dataset: str | None = None) -> str:
        """The default study name: the spec's name on its own dataset, ``NAME-DATASET`` on
        another (``resnet18-ce-digits``), so a digits quickstart and the Tiny ImageNet study
        of one spec never meet in one study."""
        own = self.train.get("dataset") or getattr(get_trainer(self.trainer).config_class, "dataset", None)
        return self.name if dataset is None or dataset == own else f"{self.name}-{dataset}"

    def command_arg(self) -> str:
        """The spec as a command takes it: a built-in spec's name, else the path of its
        file (``dlops study run my-ce`` would not find ``./my.toml``)."""
        if self.path is None:
            return self.name
        try:
            builtin = Path(self.path).resolve().parent == builtin_spec_dir().resolve()
        except SpecError:  # no built-in specs here: name the file
            builtin = False
        return self.name if builtin else str(self.path)

    def _values(self, dataset: str | None, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """The settings of a run on ``dataset`` before any trial's params: ``[train]``, then
        ``[datasets.<dataset>]``, then ``overrides`` (``None`` values are ignored)."""
        values = dict(self.train)
        ds = dataset or values.get("dataset")
        if ds is not None:
            values["dataset"] = ds
            values.update(self.datasets.get(ds, {}))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return values

    def config(
        self, dataset: str | None = None, params: dict[str, Any] | None = None, **overrides: Any
    ) -> TrainerConfig:
        """The trainer's config: ``[train]``, then ``[datasets.<dataset>]``, then
        ``params`` (a trial's or the baseline's), then explicit ``overrides``
        (``None`` values are ignored)."""
        trainer = get_trainer(self.trainer)
        values = self._values(dataset, {})
        values.update(params or {})
        values.update({k: v for k, v in overrides.items() if v is not None})
        config = trainer.config_class(**values)
        trainer.validate(config)
        return config

    def baseline_params(self, dataset: str | None = None, **overrides: Any) -> dict[str, Any]:
        """Trial 0 of a run on ``dataset`` with ``overrides`` (as :meth:`config` takes them):
        the baseline's values for every searched parameter. A parameter the baseline leaves
        out takes the value the run's config gives it (``[datasets.<dataset>]``, else
        ``[train]``, else the trainer's default); a :class:`SpecError` if that value lies
        outside the parameter's range (Optuna would only warn, and trial 0 would train a
        value the search never proposes)."""
        values = self._values(dataset, overrides)
        ds = values.get("dataset")
        defaults = {
            f.name: f.default
            for f in dataclasses.fields(get_trainer(self.trainer).config_class)
            if f.default is not dataclasses.MISSING
        }
        params: dict[str, Any] = {}
        for name, p in self.search.items():
            if not p.active(params):
                continue
            if name in self.baseline:
                params[name] = self.baseline[name]
                continue
            value = values.get(name, defaults.get(name))
            if not p.contains(value):
                if overrides.get(name) is not None:
                    source = "this run's override"
                elif ds is not None and name in self.datasets.get(ds, {}):
                    source = f"[datasets.{ds}]"
                elif name in self.train:
                    source = "[train]"
                else:
                    source = "the trainer's default"
                on = f" on {ds}" if ds else ""
                raise SpecError(
                    f"the baseline (trial 0){on} would train {name} = {_toml_value(value)} ({source}), outside "
                    f"[search.{name}] ({p.describe()}): add {name} to [baseline] or widen the range"
                )
            params[name] = value
        return params

    def check_search_values(self, base: TrainerConfig, context: str = "a run") -> None:
        """Both ends of every searched range and every choice, each set in ``base`` (a run's
        config), are values the trainer accepts there: a :class:`SpecError` naming the key
        otherwise (``warmup_epochs`` up to 10 in a run of 5 epochs: every trial that drew
        more would fail)."""
        trainer = get_trainer(self.trainer)
        for name, p in self.search.items():
            if p.type == "categorical":
                values = [(f"choice {_toml_value(c)}", c) for c in p.choices]
            else:
                values = [(f"{end} = {_toml_value(v)}", v) for end, v in (("low", p.low), ("high", p.high))]
            for label, value in values:
                try:
                    trainer.validate(base.replace(**{name: value}))
                except DlopsError as exc:
                    raise SpecError(f"[search.{name}]: {label} is not a value {context} can use ({exc})") from None


def builtin_spec_dir() -> Path:
    """The specs shipped with dlops: ``study/`` of the source tree, which a wheel
    installs as ``dlops/study/``."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "study", here / "study"):
        if candidate.is_dir():
            return candidate
    raise SpecError("the built-in study specs are missing from this installation")


def builtin_specs() -> list[str]:
    return sorted(p.stem for p in builtin_spec_dir().glob("*.toml"))


def resolve_spec_path(name_or_path: str) -> Path:
    """A path to a TOML file, or the name of a built-in spec."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise SpecError(f"spec file {name_or_path} does not exist")
        return path
    builtin = builtin_spec_dir() / f"{name_or_path}.toml"
    if builtin.is_file():
        return builtin
    raise SpecError(
        f"unknown spec {name_or_path!r} (built-in: {', '.join(builtin_specs())}; or a path to a .toml file)"
    )


@dataclass(frozen=True)
class Add:
    """An override that adds ``value`` under a key the table does not have yet."""

    value: Any


@dataclass(frozen=True)
class Replace:
    """An override that replaces a table (or any value) whole instead of merging into it."""

    value: Any


class _Remove(enum.Enum):
    REMOVE = "REMOVE"


REMOVE: Final = _Remove.REMOVE
"""An override that removes a key the table has."""


def _plain(value: Any, where: str) -> Any:
    """A deep copy of ``value``, refusing override markers inside it (where they would mean nothing)."""
    if isinstance(value, Add | Replace | _Remove):
        raise SpecError(f"override {where}: {value!r} cannot stand inside an added or replaced value")
    if isinstance(value, Mapping):
        return {k: _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, where) for v in value]
    return copy.deepcopy(value)


def override_table(table: Mapping[str, Any], overrides: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """A copy of the TOML ``table`` with ``overrides`` merged in, table by table.

    A plain value replaces the value of a key the table has (a table merges into a
    table); ``Add(value)`` adds a key the table lacks; ``REMOVE`` removes a key;
    ``Replace(value)`` replaces a key's value whole. A key that is not there (or, for
    ``Add``, already is) raises :class:`SpecError` naming it."""
    result = {k: _plain(v, f"{where}.{k}".lstrip(".")) for k, v in table.items()}
    for key, change in overrides.items():
        path = f"{where}.{key}".lstrip(".")
        if isinstance(change, Add):
            if key in result:
                raise SpecError(f"override adds {path!r}, which the spec already has")
            result[key] = _plain(change.value, path)
        elif key not in result:
            raise SpecError(f"override of {path!r}, which the spec does not have")
        elif change is REMOVE:
            del result[key]
        elif isinstance(change, Replace):
            result[key] = _plain(change.value, path)
        elif isinstance(change, Mapping) and isinstance(result[key], dict):
            result[key] = override_table(result[key], change, path)
        else:
            result[key] = _plain(change, path)
    return result


def spec_table(name_or_path: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The TOML table of a spec file or built-in spec, with ``overrides`` (see
    :func:`override_table`) applied; not yet checked."""
    return _read_table(resolve_spec_path(name_or_path), overrides)


def _read_table(path: Path, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8
        raise SpecError(f"{path}: not UTF-8 text (TOML files are UTF-8): byte {exc.start} of the file") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    try:
        return override_table(raw, overrides or {})
    except SpecError as exc:
        raise SpecError(f"{path.name}: {exc}") from None


def load_spec(name_or_path: str, overrides: Mapping[str, Any] | None = None) -> StudySpec:
    """A spec file or built-in spec, checked; ``overrides`` (see :func:`override_table`)
    are applied to its table first. ``path`` of the result is the file it was read from."""
    path = resolve_spec_path(name_or_path)
    raw = _read_table(path, overrides)
    try:
        return parse_spec(raw, default_name=path.stem, path=path)
    except SpecError as exc:
        raise SpecError(f"{path.name}: {exc}") from None


def _check_metric(value: Any, where: str, reported: tuple[str, ...] = ()) -> str:
    """A study's objective: one of the validation metrics its trainer reports every epoch."""
    allowed = [m for m in reported if m.startswith("val_")]
    if not isinstance(value, str) or not value.startswith("val_") or (allowed and value not in allowed):
        raise SpecError(
            f"{where} must name a validation metric the trainer reports "
            f"({', '.join(allowed) or 'val_top5, val_top1'}), got {value!r}"
        )
    return value


# The way each validation metric gets better: a study that maximised val_loss (the metric
# edited, the direction forgotten) would rank its worst trial best, and dlops final retrain it.
METRIC_DIRECTIONS = {"val_loss": "minimize", "val_top1": "maximize", "val_top5": "maximize"}


def _check_direction(metric: str, direction: str, where: str) -> None:
    better = METRIC_DIRECTIONS.get(metric)
    if better is not None and better != direction:
        raise SpecError(
            f"{where} = {metric!r} needs direction = {better!r}, the spec has {direction!r}: "
            "its study would rank the worst trial best and dlops final retrain it"
        )


def _check_sampler(sampler: dict[str, Any]) -> None:
    _check_keys(sampler, {"type", "seed", "n_startup_trials"}, "[sampler]")
    kind = sampler.get("type", "tpe")
    if not isinstance(kind, str) or kind not in SAMPLERS:  # a list would be unhashable
        raise SpecError(f"[sampler]: unknown type {sampler.get('type')!r} ({', '.join(sorted(SAMPLERS))})")
    seed = sampler.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise SpecError(f"[sampler]: seed = {seed!r} should be an integer from 0 to 2**32 - 1")
    if kind == "random" and "n_startup_trials" in sampler:  # make_sampler would drop it without a word
        raise SpecError("[sampler]: type random does not take n_startup_trials (the tpe sampler's random start)")
    startup = sampler.get("n_startup_trials", 0)
    if isinstance(startup, bool) or not isinstance(startup, int) or startup < 0:
        raise SpecError(f"[sampler]: n_startup_trials = {startup!r} should be a non-negative integer")


def _check_pruner(spec: StudySpec) -> None:
    """Build the pruner once: Optuna checks the values (a negative count, an unknown key)."""
    from dlops.sampling import make_pruner

    make_pruner(spec.pruner)  # raises SpecError naming [pruner]


def _check_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise SpecError(f"unknown key {unknown[0]!r} in {where} (allowed: {', '.join(sorted(allowed))})")


def _parse_when(raw: Any, where: str, earlier: dict[str, ParamSpec]) -> tuple[tuple[str, Any], ...]:
    if not isinstance(raw, dict) or not raw:
        raise SpecError(f"{where}: 'when' must be a table such as {{ triplet_soft = false }}")
    for name, value in raw.items():
        if name not in earlier or earlier[name].type != "categorical":
            raise SpecError(f"{where}: 'when' can only name a categorical parameter searched before it, not {name!r}")
        if value not in earlier[name].choices:
            raise SpecError(f"{where}: 'when' {name} = {value!r} is not one of its choices")
    return tuple(raw.items())


def _check_step(step: Any, kind: str, low: float, high: float, log: bool, where: str) -> float | None:
    """A ``step`` Optuna takes as written: a positive number (an integer for an int
    parameter), not on a log scale, that divides ``high - low`` (Optuna would otherwise
    shrink the range to the last multiple, with only a warning)."""
    if step is None:
        return None
    wanted = "a positive integer" if kind == "int" else "a positive number"
    if (
        isinstance(step, bool)
        or not isinstance(step, int if kind == "int" else (int, float))
        or not math.isfinite(step)
        or step <= 0
    ):
        raise SpecError(f"{where}: step = {step!r} should be {wanted}")
    if log:
        raise SpecError(f"{where}: step cannot be combined with log = true (Optuna searches one or the other)")
    if kind == "int":
        shrunk = high - (high - low) % step
    else:  # Optuna's own arithmetic (decimal, on the numbers as written)
        d_low, d_step = decimal.Decimal(str(float(low))), decimal.Decimal(str(float(step)))
        d_range = decimal.Decimal(str(float(high))) - d_low
        shrunk = high if d_range % d_step == 0 else float((d_range // d_step) * d_step + d_low)
    if shrunk != high:
        raise SpecError(
            f"{where}: high - low ({_toml_value(high)} - {_toml_value(low)}) is not a whole multiple of "
            f"step = {_toml_value(step)}: Optuna would shrink the range to high = {_toml_value(shrunk)}"
        )
    return step


def _parse_param(name: str, raw: Any, earlier: dict[str, ParamSpec] | None = None) -> ParamSpec:
    where = f"[search.{name}]"
    if not isinstance(raw, dict):
        raise SpecError(f"{where} must be a table")
    _check_keys(raw, PARAM_KEYS, where)
    when = _parse_when(raw["when"], where, earlier or {}) if "when" in raw else ()
    kind = raw.get("type", "float")
    if not isinstance(kind, str) or kind not in PARAM_TYPES:  # a list would be unhashable
        raise SpecError(f"{where}: unknown type {kind!r} (float, int, categorical)")
    if kind == "categorical":
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SpecError(f"{where}: categorical needs a non-empty list 'choices'")
        for i, choice in enumerate(choices):
            if not isinstance(choice, bool | int | float | str):
                raise SpecError(f"{where}: a choice is a number, a string or true/false, not {choice!r}")
            if ParamSpec(name, kind, choices=tuple(choices[:i])).contains(choice):  # 1 and 1.0 are one value
                raise SpecError(
                    f"{where}: choice {_toml_value(choice)} is listed twice (a sampler would draw it twice as often)"
                )
        return ParamSpec(name, kind, choices=tuple(choices), when=when)
    if "low" not in raw or "high" not in raw:
        raise SpecError(f"{where}: {kind} needs 'low' and 'high'")
    low, high = raw["low"], raw["high"]
    for bound in (low, high):
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound):
            raise SpecError(f"{where}: low and high must be finite numbers")
    if kind == "int" and not (isinstance(low, int) and isinstance(high, int)):
        raise SpecError(f"{where}: int bounds must be integers")
    if low > high:
        raise SpecError(f"{where}: low ({low}) > high ({high})")
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise SpecError(f"{where}: log = {log!r} should be true or false")
    if log and low <= 0:
        raise SpecError(f"{where}: log scale needs low > 0, got {low}")
    step = _check_step(raw.get("step"), kind, low, high, log, where)
    return ParamSpec(
        name,
        kind,
        float(low) if kind == "float" else low,
        float(high) if kind == "float" else high,
        log,
        float(step) if kind == "float" and step is not None else step,
        when=when,
    )


TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}  # for messages


def check_setting_types(table: dict[str, Any], config_cls: type, where: str) -> None:
    """Every key of ``table`` is a field of ``config_cls`` and its value has the field's type
    (an int where a float is wanted is fine, a bool never stands for a number)."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    _check_keys(table, set(fields), where)
    for key, value in table.items():
        default = fields[key].default
        if default is None or default is dataclasses.MISSING or value is None:
            continue
        ok = isinstance(value, type(default)) or (isinstance(default, float) and isinstance(value, int))
        if isinstance(value, bool) != isinstance(default, bool):
            ok = False
        if not ok:
            raise SpecError(
                f"{where}: {key} = {value!r} should be {TYPE_WORDS.get(type(default), 'a ' + type(default).__name__)}"
            )


SPEC_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")


def _check_tables(raw: dict[str, Any]) -> None:
    """The sections that are tables are tables (``train = 5`` is one line, not a TypeError)."""
    for key in ("train", "datasets", "search", "baseline", "final", "pruner", "sampler"):
        if key in raw and not isinstance(raw[key], dict):
            raise SpecError(f"[{key}] must be a table, got {raw[key]!r}")
    for sub in ("datasets", "search"):
        for name, table in raw.get(sub, {}).items():
            if not isinstance(table, dict):
                raise SpecError(f"[{sub}.{name}] must be a table, got {table!r}")


def _check_name(name: Any) -> str:
    """A spec's name names its study, its report folder and its checkpoints: a plain name."""
    if not isinstance(name, str) or not SPEC_NAME.fullmatch(name):
        raise SpecError(
            f"name = {name!r}: a spec's name is up to 100 letters, digits and . _ + -, starting with a letter or digit"
        )
    if name.lower() in REPORTS_RESERVED:
        raise SpecError(f"name = {name!r} is taken: reports/{name} holds {REPORTS_RESERVED[name.lower()]}")
    return name


def parse_spec(raw: dict[str, Any], default_name: str = "study", path: Path | None = None) -> StudySpec:
    _check_keys(raw, TOP_LEVEL_KEYS, "the spec")
    _check_tables(raw)
    spec_name = _check_name(raw.get("name", default_name))
    trainer_name = raw.get("trainer", "resnet18")
    trainer = get_trainer(trainer_name)
    config_cls = trainer.config_class
    fields = {f.name for f in dataclasses.fields(config_cls)}

    train = raw.get("train", {})
    check_setting_types(train, config_cls, "[train]")
    datasets = {ds: dict(table) for ds, table in raw.get("datasets", {}).items()}
    dataset_metrics = {}
    from dlops.data import DATASETS  # no torch: the registry of names

    for ds, table in datasets.items():
        if ds not in DATASETS:
            raise SpecError(f"[datasets.{ds}]: unknown dataset {ds!r} (known: {', '.join(sorted(DATASETS))})")
        if "dataset" in table:  # --dataset digits would have trained this other dataset
            raise SpecError(
                f"[datasets.{ds}]: dataset = {table['dataset']!r} cannot stand in it: the table's name is the "
                f"dataset its settings apply to (a run on {ds} trains {ds})"
            )
        if "metric" in table:
            dataset_metrics[ds] = _check_metric(table.pop("metric"), f"[datasets.{ds}] metric", trainer.metrics)
        check_setting_types(table, config_cls, f"[datasets.{ds}]")

    search: dict[str, ParamSpec] = {}
    for name, table in raw.get("search", {}).items():
        if name not in fields:
            raise SpecError(f"[search.{name}]: {name!r} is not a setting of trainer {trainer_name!r}")
        if name in NOT_SEARCHABLE:
            raise SpecError(
                f"[search.{name}]: {name} is a setting of the run, not a hyperparameter to search "
                f"({NOT_SEARCHABLE[name]}); fix it in [train]"
            )
        search[name] = _parse_param(name, table, search)
        _check_search_types(search[name], config_cls)

    baseline = raw.get("baseline", {})
    check_setting_types(baseline, config_cls, "[baseline]")
    for key, value in baseline.items():
        if key not in search:
            raise SpecError(f"[baseline]: {key} is not searched (a setting every trial shares goes in [train])")
        if not search[key].contains(value):
            raise SpecError(f"[baseline]: {key} = {value!r} lies outside its search range ({search[key].describe()})")

    final = raw.get("final", {})
    _check_keys(final, FINAL_KEYS, "[final]")
    for key, value in final.items():  # else refused only by dlops final, after the study ran, without the file
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpecError(f"[final]: {key} = {value!r} should be a positive integer")
    if final.get("seeds", 1) > MAX_SEEDS:
        raise SpecError(f"[final]: seeds = {final['seeds']} is more than the {MAX_SEEDS} a reference run trains")

    pruner = dict(raw.get("pruner", {"type": "median"}))
    kind = pruner.get("type", "median")
    if not isinstance(kind, str) or kind not in PRUNERS:
        raise SpecError(f"[pruner]: unknown type {pruner.get('type')!r} ({', '.join(sorted(PRUNERS))})")
    sampler = dict(raw.get("sampler", {"type": "tpe", "seed": 0}))
    _check_sampler(sampler)

    direction = raw.get("direction", "maximize")
    if direction not in ("maximize", "minimize"):
        raise SpecError(f"direction must be 'maximize' or 'minimize', got {direction!r}")
    n_trials = raw.get("n_trials", 20)
    if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1:
        raise SpecError(f"n_trials must be a positive integer, got {n_trials!r}")
    timeout = raw.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0):
        raise SpecError(f"timeout must be a positive number of seconds, got {timeout!r}")

    metric = _check_metric(raw.get("metric", "val_top5"), "metric", trainer.metrics)
    for where, name in (("metric", metric), *((f"[datasets.{ds}] metric", m) for ds, m in dataset_metrics.items())):
        _check_direction(name, direction, where)

    spec = StudySpec(
        name=spec_name,
        description=raw.get("description", ""),
        trainer=trainer_name,
        metric=metric,
        dataset_metrics=dataset_metrics,
        direction=direction,
        n_trials=n_trials,
        timeout=timeout,
        train=train,
        final=final,
        datasets=datasets,
        search=search,
        baseline=baseline,
        pruner=pruner,
        sampler=sampler,
        path=path,
    )
    _check_pruner(spec)
    _check_values(spec)
    return spec


def _check_search_types(p: ParamSpec, config_cls: type) -> None:
    """The values a search can propose have the setting's type (``width`` searched as a float
    would build a model of width 4.5; ``augment`` choices "yes"/"no" would be truthy strings)."""
    values = p.choices if p.type == "categorical" else (p.low, p.high)
    try:
        for v in values:
            check_setting_types({p.name: v}, config_cls, f"[search.{p.name}]")
    except SpecError as exc:
        if p.type == "categorical":
            raise
        raise SpecError(f'{exc} (type = "int" searches integers, "categorical" a list of other values)') from None


def _check_values(spec: StudySpec) -> None:
    """Build the configs a study may train and let the trainer check them (an unknown loss,
    a negative weight decay, a momentum of 1...): ``[train]`` and each ``[datasets.NAME]``,
    the baseline on each (its implicit values inside their ranges), and the ends of every
    searched range and every choice."""
    trainer = get_trainer(spec.trainer)

    def check(where: str, dataset: str | None, params: dict[str, Any] | None = None) -> TrainerConfig:
        try:
            return spec.config(dataset, params)
        except SpecError:
            raise
        except DlopsError as exc:
            raise SpecError(f"{where}: {exc}") from None

    try:
        trainer.validate(trainer.config_class(**spec.train))
    except DlopsError as exc:
        raise SpecError(f"[train]: {exc}") from None
    for name in spec.datasets:
        check(f"[datasets.{name}]", name)
    for ds in (None, *spec.datasets):
        check("[baseline]" if ds is None else f"[baseline] on {ds}", ds, spec.baseline_params(ds))
    for ds in (None, *spec.datasets):  # a setting the run's loss never reads: every trial the same
        config = spec.config(ds)
        foreign = trainer.foreign_settings(config)
        for name in spec.search:
            if name in foreign:
                on = f" on {ds}" if ds else ""
                raise SpecError(
                    f"[search.{name}]: {name} is read only by {foreign[name]}, and this spec trains the "
                    f"{getattr(config, 'loss', '?')} loss{on}: searching it would have no effect; remove it "
                    "or use that loss's spec"
                )
    final_epochs = spec.final.get("epochs")
    for ds in (None, *spec.datasets):  # every dataset the spec names, and what dlops final trains
        on = f" on {ds}" if ds else ""
        spec.check_search_values(spec.config(ds), f"a run{on}")
        if final_epochs is not None:
            context = f"dlops final{on} ([final] epochs = {final_epochs})"
            check(f"[final] epochs = {final_epochs}{on}", ds, {**spec.baseline_params(ds), "epochs": final_epochs})
            spec.check_search_values(spec.config(ds, epochs=final_epochs), context)
