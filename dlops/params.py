"""What a reference run (``dlops final``) trains: the settings (``--params``), the
dataset, the epochs and the seeds.

- ``best``: the best trial of the spec's study (its dataset too, unless ``--dataset``);
- ``baseline``: the spec's ``[baseline]``, no study needed;
- ``FILE.json``: an object of settings, or an earlier ``final.json`` (its ``params``).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from dlops.errors import DlopsError
from dlops.paths import default_storage_url
from dlops.spec import MAX_SEEDS, StudySpec, check_setting_types
from dlops.storage import NoStorageYet, mask_url, open_storage
from dlops.trainers import get_trainer
from dlops.trainers.base import TrainerConfig, first_change


@dataclass
class FinalOptions:
    """What ``dlops final`` may choose or override."""

    params: str = "best"  # best | baseline | path to a JSON file
    dataset: str | None = None
    epochs: int | None = None
    seeds: int | None = None
    device: str | None = None
    resume: bool = False
    storage: str | None = None
    study_name: str | None = None
    train_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class ChosenParams:
    params: dict[str, Any]
    source: dict[str, Any]  # {"kind": "trial"|"baseline"|"file", ...}
    dataset: str | None = None  # the dataset the study ran on, when they came from one
    trained: dict[str, Any] | None = None  # the config the study's trial trained, when they came from one


def study_name_for(spec: StudySpec, options: FinalOptions) -> str:
    """The study ``--params best`` reads: ``--study-name``, else the name ``dlops study run``
    gives the spec on ``--dataset`` (``resnet18-ce-digits``; the spec's own name on its own dataset)."""
    return options.study_name or spec.study_name(options.dataset)


def own_study(spec: StudySpec, options: FinalOptions, study: optuna.Study | None) -> optuna.Study | None:
    """The study a reference run of ``spec`` belongs to (its plots, its dashboard files).
    Another spec's study is refused where the run names it (``--study-name``) or reads its
    best trial; found only by the default name (a study of that name made by another
    spec), it is not this run's: no study."""
    made_by = study.user_attrs.get("spec") if study is not None else None
    if study is None or made_by is None or made_by == spec.name:
        return study
    if options.study_name or options.params == "best":
        trainer = study.user_attrs.get("trainer", "?")
        raise DlopsError(
            f"study {study.study_name!r} belongs to the spec {made_by} (trainer {trainer}), "
            f"not {spec.name}: give that spec, or the --study-name of a study of {spec.name}"
        )
    return None


def choose_params(spec: StudySpec, options: FinalOptions, study: optuna.Study | None) -> ChosenParams:
    """The settings to train: the study's best trial, the baseline, or a JSON file."""
    source = options.params
    if source == "baseline":
        params = spec.baseline_params(
            options.dataset, epochs=options.epochs, device=options.device, **options.train_overrides
        )
        return ChosenParams(params, {"kind": "baseline"})
    if source == "best":
        name = study_name_for(spec, options)
        url = options.storage or default_storage_url()
        if study is None:
            dataset = f" --dataset {options.dataset}" if options.dataset else ""
            named = f" --study-name {name}" if options.study_name else ""
            run = f"dlops study run {shlex.quote(spec.command_arg())}{dataset}{named}"
            where = mask_url(url)
            try:
                open_storage(url, create=False)  # a mistyped --storage: name the file that is not there
            except NoStorageYet as exc:
                where = f"{where}: {exc};"
            else:
                where += ":"
            raise DlopsError(f"no study named {name!r} in {where} run `{run}` first, or use --params baseline")
        study = own_study(spec, options, study)
        assert study is not None
        try:
            best = study.best_trial
        except ValueError:
            raise DlopsError(f"study {name!r} has no complete trial yet; use --params baseline") from None
        return ChosenParams(
            dict(best.params),
            {
                "kind": "trial",
                "study": name,
                "trial": best.number,
                "value": best.value,
                "metric": (study.metric_names or [spec.metric])[0],
                "baseline": bool(best.user_attrs.get("baseline", False)),
            },
            dataset=study.user_attrs.get("dataset"),
            trained=best.user_attrs.get("config"),
        )
    return _params_from_file(spec, Path(source), options.dataset)


# What a reference run may change from the trial it retrains: how long, which seeds, where,
# on how much of the data (a study on a subset, the reference run on all of it).
FINAL_MAY_DIFFER = {"epochs", "seed", "device", "subset_classes", "subset_per_class", "data_root"}


def check_same_recipe(chosen: ChosenParams, config: TrainerConfig) -> None:
    """``--params best`` on the study's dataset retrains what its best trial trained: a spec
    edited since (another batch size, schedule, loss...) would train something else under
    the trial's name."""
    if chosen.trained is None or chosen.trained.get("dataset") != config.dataset:
        return  # the study's params taken to another dataset (its own [datasets] settings): by choice
    now = {k: v for k, v in config.to_dict().items() if k not in FINAL_MAY_DIFFER}
    saved = {k: v for k, v in chosen.trained.items() if k not in FINAL_MAY_DIFFER}
    change = first_change(saved, now, config)
    if change:
        k, was, will = change
        raise DlopsError(
            f"trial {chosen.source['trial']} of study {chosen.source['study']!r} trained with {k} = {was!r}, the spec "
            f"now gives {k} = {will!r}: restore the spec, or give --params FILE.json with the settings to train"
        )


# Settings of the run rather than of the configuration trained: a params file may not set them.
RUN_SETTINGS = {
    "loss": "the spec defines it (pick the spec of that loss: --loss L or SPEC)",
    "model": "the spec defines it",
    "dataset": "use --dataset",
    "data_root": "the data root is the spec's, $DLOPS_DATA or $DLOPS_HOME/data",
    "epochs": "use --epochs",
    "seed": "a run trains seeds 0..N-1: use --seeds N",
    "device": "use --device",
    "subset_classes": "use --subset-classes",
    "subset_per_class": "use --subset-per-class",
}


def _params_from_file(spec: StudySpec, path: Path, dataset: str | None = None) -> ChosenParams:
    if path.is_dir():
        raise DlopsError(f"--params {path}: a directory, not a file (give best, baseline or a JSON file)")
    if not path.is_file():
        raise DlopsError(f"--params {path}: no such file (give best, baseline or a JSON file)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DlopsError(f"--params {path}: not valid JSON: {exc}") from None
    earlier_final = isinstance(raw, dict) and isinstance(raw.get("params"), dict)
    if earlier_final:  # an earlier final.json: its params (empty: the spec trained as it is)
        made_by = raw.get("trainer")
        if isinstance(made_by, str) and made_by != spec.trainer:
            raise DlopsError(
                f"--params {path}: a reference run of spec {raw.get('spec')!r} (trainer {made_by}), and "
                f"{spec.name} trains with {spec.trainer}: its settings do not apply; give that spec"
            )
        raw = raw["params"]
    if not isinstance(raw, dict) or not (raw or earlier_final):
        raise DlopsError(f'--params {path}: expected a JSON object of settings, e.g. {{"lr": 0.01}}')
    trainer = get_trainer(spec.trainer)
    config_class = trainer.config_class
    fields = {f.name for f in dataclasses.fields(config_class)}
    for key in raw:
        if key in RUN_SETTINGS:
            raise DlopsError(f"--params {path}: {key!r} is not a setting a params file may change: {RUN_SETTINGS[key]}")
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise DlopsError(f"--params {path}: {unknown[0]!r} is not a setting of trainer {spec.trainer!r}")
    check_setting_types(raw, config_class, f"--params {path}")
    base = spec.config()
    foreign = trainer.foreign_settings(base)
    for key in raw:
        if key in foreign:
            raise DlopsError(
                f"--params {path}: {key!r} is read only by {foreign[key]}, and {spec.name} trains "
                f"the {getattr(base, 'loss', '?')} loss: it would have no effect; remove it or use that loss's spec"
            )
    try:  # the trainer's own check, on the run's dataset: a null lr, a momentum of 1, unlabeled data on digits...
        spec.config(dataset, params=raw)
    except DlopsError as exc:
        raise DlopsError(f"--params {path}: {exc}") from None
    return ChosenParams(dict(raw), {"kind": "file", "path": str(path.absolute())})  # the file, wherever run from


def build_config(spec: StudySpec, dataset: str | None, params: dict[str, Any], **overrides: Any) -> TrainerConfig:
    try:
        return spec.config(dataset, params, **overrides)
    except TypeError as exc:  # an override the trainer's config does not have
        raise DlopsError(f"{spec.name}: {exc}") from None


def final_epochs(spec: StudySpec, options: FinalOptions) -> int | None:
    epochs = options.epochs if options.epochs is not None else spec.final.get("epochs")
    if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
        raise DlopsError(f"final epochs must be a positive integer, got {epochs!r}")
    return epochs


def final_seeds(spec: StudySpec, options: FinalOptions) -> list[int]:
    n = options.seeds if options.seeds is not None else spec.final.get("seeds", 1)
    if not isinstance(n, int) or n < 1:
        raise DlopsError(f"seeds must be a positive integer, got {n!r}")
    if n > MAX_SEEDS:
        raise DlopsError(f"{n} seeds: a reference run trains at most {MAX_SEEDS} (each seed is a whole training run)")
    return list(range(n))
