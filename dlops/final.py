"""Reference runs (``dlops final``): train the chosen configuration of a spec (see
:mod:`dlops.params`) for its ``[final]`` epochs with N seeds, evaluate each seed once on
the test split, and write ``$DLOPS_HOME/reports/<spec>/`` (``final.json`` from
:mod:`dlops.provenance`, ``curves.png``, ``report.md``, the study plots, and the
trainer's own figures, e.g. the autoencoder's per-class accuracy, t-SNE and loss curves).

A run is built aside and swapped in only once it has succeeded, so a run that fails
(a bad device, Ctrl-C, SIGTERM, a full disk, a diverging loss) leaves the previous
reference run whole. Under ``$DLOPS_HOME/checkpoints/final/<spec>-<hash>/``:

- ``lock``: held for the whole run; a second ``dlops final`` of the spec is refused;
- ``staging/seed<k>/checkpoint.pt``: the run in progress, checkpointed after every epoch.
  ``resume=True`` continues from those checkpoints (the trainer restores the full state,
  so the numbers equal those of an uninterrupted run); without it they are discarded,
  never reused. A checkpoint made with another configuration is refused rather than
  resumed; one that does not load (or fails its checksum) is discarded with a warning
  and its seed starts from epoch 0;
- ``run-<time>-<id>/seed<k>/``: the completed run that ``reports/<spec>/final.json``
  points to (``weights.pt``, the last ``checkpoint.pt``).

The report is written to ``reports/.staging/<spec>-<hash>/``; at the end ``staging/``
becomes ``run-<...>/``, the report folder takes the place of ``reports/<spec>/``, and
only then are the previous run's folders removed.

The test split is read exactly once per seed, after training; the final weights are
kept (``weights.pt``) so that :func:`recompute_test_metrics` can check the figures.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import optuna

from dlops.dashboard import attach_artifacts, withdraw_artifacts
from dlops.data import (
    check_dataset_name,
    check_subset_classes,
    data_change_text,
    data_changes,
    data_identity,
    get_dataset,
)
from dlops.data.cache import replace_dirs
from dlops.errors import DlopsError, out_of_memory_text
from dlops.io import (
    CorruptCheckpoint,
    Terminated,
    json_safe,
    load_checkpoint,
    run_lock,
    save_checkpoint,
    signals_held,
    sigterm_interrupts,
    write_text_atomic,
)
from dlops.params import (
    ChosenParams,
    FinalOptions,
    build_config,
    check_same_recipe,
    choose_params,
    final_epochs,
    final_seeds,
    own_study,
    study_name_for,
)
from dlops.paths import checkpoints_dir, default_storage_url, dlops_home, folder_name, reports_dir
from dlops.provenance import build_final, write_final
from dlops.report import write_final_plots, write_spec_report
from dlops.spec import StudySpec, load_spec
from dlops.storage import connect, mask_url
from dlops.studies import find_study, study_still_there
from dlops.study_plots import write_study_plots
from dlops.text import plural
from dlops.trainers import get_trainer
from dlops.trainers.base import (
    FitResult,
    NonFiniteLossError,
    Trainer,
    TrainerConfig,
    config_defaults,
    config_differences,
    resolve_device,
)

__all__ = ["FinalOptions", "FinalResult", "Interrupted", "recompute_test_metrics", "resume_command", "run_final"]

# (seed, epoch, metrics, restored): restored epochs come from a checkpoint, not training.
EpochCallback = Callable[[int, int, dict[str, float], bool], None]
# (seed, line): a trainer's own progress line (the autoencoder's pretraining epochs).
SeedProgress = Callable[[int, str], None]
Say = Callable[[str], None]


@dataclass
class FinalResult:
    report_dir: Path
    final: dict[str, Any]  # the contents of final.json
    files: list[Path]
    artifacts: list[str]  # artifact ids attached in the study storage


# --------------------------------------------------------------------------- paths


def final_checkpoint_dir(spec_name: str) -> Path:
    """The spec's folder of reference-run checkpoints (a slug and a hash of the exact name)."""
    return checkpoints_dir() / "final" / folder_name(spec_name)


def staging_dir(spec_name: str) -> Path:
    """Where a run in progress checkpoints (``--resume`` continues it)."""
    return final_checkpoint_dir(spec_name) / "staging"


def seed_dir(spec_name: str, seed: int) -> Path:
    """A seed's folder in the run in progress."""
    return staging_dir(spec_name) / f"seed{seed}"


def lock_path(spec_name: str) -> Path:
    return final_checkpoint_dir(spec_name) / "lock"


def report_dir(spec_name: str) -> Path:
    return reports_dir() / spec_name


def report_staging_dir(spec_name: str) -> Path:
    """Where the report of a run in progress is written, beside ``reports/<spec>/`` (same
    file system, so it can take that folder's place) but out of ``dlops report``'s sight."""
    return reports_dir() / ".staging" / folder_name(spec_name)


def _relative_to_home(path: Path) -> str:
    try:
        return str(path.relative_to(dlops_home()))
    except ValueError:
        return str(path)


def _resolve_home_path(text: str) -> Path:
    path = Path(text)
    return path if path.is_absolute() else dlops_home() / path


# --------------------------------------------------------------------------- checkpoints


def discard_checkpoints(spec_name: str, say: Say) -> None:
    """A fresh run: remove the checkpoints of an interrupted run (never a completed one's)."""
    staging = staging_dir(spec_name)
    if any(staging.glob("seed*/checkpoint.pt")):
        say(f"discarded the checkpoints of an interrupted run under {staging} (--resume continues them instead)")
    shutil.rmtree(staging, ignore_errors=True)


def discard_other_seeds(spec_name: str, seeds: list[int], say: Say) -> None:
    """Before a resumed run becomes the reference run: remove the checkpoints of seeds it
    did not train (an interrupted run with more seeds, resumed with fewer), which would sit
    in its ``run-*`` folder, named by no ``final.json``. Kept until then, for a ``--resume``
    with those seeds should this run be interrupted too."""
    ours = {f"seed{s}" for s in seeds}
    others = sorted(p for p in staging_dir(spec_name).glob("seed*") if p.name not in ours)
    if others:
        names = ", ".join(p.name.removeprefix("seed") for p in others)
        say(
            f"discarded the checkpoints of {'seed' if len(others) == 1 else 'seeds'} {names} of an interrupted run "
            f"under {staging_dir(spec_name)}: this run has {plural(len(seeds), 'seed')}"
        )
    for path in others:
        shutil.rmtree(path, ignore_errors=True)


def _check_checkpoint(path: Path, config: TrainerConfig, say: Say | None = None) -> int:
    """Check that an existing checkpoint belongs to ``config``; returns how many
    reported epochs it holds, 0 when there is none. One that does not load or fails
    its checksum is discarded (with a word through ``say``): its seed starts over."""
    if not path.exists():
        return 0
    try:
        state = load_checkpoint(path)
    except CorruptCheckpoint as exc:
        path.unlink(missing_ok=True)
        (say or (lambda message: None))(f"{exc}: discarded, this seed starts from epoch 0")
        return 0
    saved = state.get("config") if isinstance(state, dict) else None
    if isinstance(saved, dict):
        now = config.to_dict()
        changed = config_differences(saved, now, config_defaults(config))
        if changed:
            k = changed[0]
            raise DlopsError(
                f"the checkpoint at {path} was made with {k}={saved.get(k)!r}, this run has {k}={now.get(k)!r}; "
                "run without --resume to start over"
            )
    if not isinstance(state, dict):
        return 0
    return int(state.get("epoch", -1)) + 1  # -1 until the first reported epoch (e.g. during pretraining)


def previous_run_line(spec_name: str) -> str | None:
    """The line that says which reference run this one replaces (from its ``final.json``),
    None when the spec has none."""
    path = report_dir(spec_name) / "final.json"
    if not path.exists():
        return None
    try:
        old = json.loads(path.read_text())
        what = (
            f"of {str(old['created'])[:16]} ({old['dataset']['name']}, "
            f"{plural(int(old['epochs']), 'epoch')} x {plural(len(old['seeds']), 'seed')})"
        )
    except (OSError, ValueError, KeyError, TypeError):
        what = f"in {path.parent}"
    return f"replaces the reference run {what} when this one finishes"


def previous_study(spec_name: str) -> tuple[str, str | None] | None:
    """The study (name, masked storage) that the spec's reference run attached its files
    to, as its ``final.json`` records it; None without one."""
    try:
        study = json.loads((report_dir(spec_name) / "final.json").read_text()).get("study")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(study, dict) or not isinstance(study.get("name"), str):
        return None
    storage = study.get("storage")
    return study["name"], storage if isinstance(storage, str) else None


def withdraw_replaced(
    previous: tuple[str, str | None] | None, url: str, study: optuna.Study | None, tag: str, say: Say
) -> None:
    """Take the replaced reference run's files off the study they were attached to, when
    this run attached to another (or none): in place, :func:`attach_artifacts` has replaced
    them already. Its storage is this run's when the masked URLs match, else the recorded
    URL, if it can be opened (a masked password cannot)."""
    if previous is None:
        return
    name, stored = previous
    here = mask_url(url)
    where = f"study {name!r} in {stored or here}"
    if stored is None or stored == here:
        if study is not None and study.study_name == name:
            return
        target = url
    elif "***" in stored:
        say(f"the replaced reference run's files stay attached to {where}: its password is not recorded")
        return
    else:
        target = stored
    try:
        old = find_study(target, name)
    except DlopsError as exc:
        say(f"the replaced reference run's files stay attached to {where}: {exc}")
        return
    if old is not None:
        withdraw_artifacts(old, tag=tag)


# --------------------------------------------------------------------------- the run


class Interrupted(DlopsError):
    """Ctrl-C or SIGTERM during a reference run: the checkpoints stay, ``--resume``
    continues; the previous reference run is untouched."""

    exit_code = 130

    def __init__(self, message: str, signum: int = signal.SIGINT, resumable: bool = True) -> None:
        super().__init__(message)
        self.signum, self.resumable = signum, resumable
        self.exit_code = 128 + signum


def resume_command(argv: Sequence[str]) -> str:
    """The command line ``argv`` with ``--resume`` (once), passwords masked."""
    args = [a for a in argv if a != "--resume"] + ["--resume"]
    return mask_url(" ".join(shlex.quote(a) for a in args))


SECONDS_FILE = "seconds.json"


def _seconds_so_far(path: Path) -> float:
    """The training seconds an interrupted run recorded for a seed (0 when none)."""
    try:
        return float(json.loads(path.read_text())["train_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


@dataclass
class _Seeded:
    record: dict[str, Any]  # this seed's entry of final.json's per_seed
    result: FitResult
    files: list[Path]  # plots drawn from the model (first seed only)


def _run_seed(
    spec: StudySpec,
    trainer: Trainer,
    seed: int,
    config: TrainerConfig,
    restored: int,
    out_dir: Path,
    run_dir: Path,
    draw_extras: bool,
    on_epoch: EpochCallback | None,
    progress: SeedProgress | None,
    say: Say,
) -> _Seeded:
    """Train one seed (from its checkpoint, if any), then read the test split once. Files
    go to the staging folders; the record names where they will be once swapped in
    (``run_dir``)."""
    sdir = seed_dir(spec.name, seed)
    checkpoint = sdir / "checkpoint.pt"
    timing = sdir / SECONDS_FILE  # the seed's training seconds so far, over every process
    earlier = 0.0
    if checkpoint.exists():
        say(f"seed {seed}: resuming from {checkpoint}" + (f" (after epoch {restored})" if restored else ""))
        earlier = _seconds_so_far(timing)
    t0 = time.perf_counter()

    def note_time() -> None:  # after each epoch (its checkpoint is written): what --resume adds on
        sdir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(timing, json.dumps({"train_seconds": earlier + time.perf_counter() - t0}) + "\n")

    def report(epoch: int, metrics: dict[str, float]) -> None:
        if epoch >= restored:
            note_time()
        if on_epoch is not None:
            on_epoch(seed, epoch, metrics, epoch < restored)

    def progress_line(line: str) -> None:
        note_time()
        if progress is not None:
            progress(seed, line)

    try:
        result = trainer.fit(config, report=report, checkpoint_path=checkpoint, progress=progress_line)
    except NonFiniteLossError as exc:
        raise DlopsError(
            f"seed {seed} diverged: {exc} ({exc.lr_setting} {getattr(config, exc.lr_setting)} too high?); "
            "the previous reference run is untouched"
        ) from None
    except (MemoryError, RuntimeError) as exc:
        memory = out_of_memory_text(exc)
        if memory is None:
            raise
        raise DlopsError(f"seed {seed} ran {memory}; the previous reference run is untouched") from None
    train_seconds = earlier + time.perf_counter() - t0
    # The one read of the test split for this seed: everything test-based below
    # (figures, per-class accuracy, t-SNE) uses this split object.
    split = result.dataset.test()
    figures = trainer.test_metrics(result, split)
    weights_path = sdir / "weights.pt"
    save_checkpoint({"trainer": spec.trainer, "config": config.to_dict(), **trainer.weights(result)}, weights_path)
    files = trainer.seed_files(result, split, out_dir) if draw_extras else []
    record = {
        "seed": seed,
        **figures,
        "epochs_trained": len(result.history["train_loss"]) - result.start_epoch,
        "resumed_from_epoch": result.start_epoch,
        "train_seconds": train_seconds,
        "earlier_seconds": earlier,
        "split_sizes": {"train": len(result.dataset.train), "val": len(result.dataset.val), "test": len(split)},
        "checkpoint": _relative_to_home(run_dir / sdir.name / checkpoint.name),
        "weights": _relative_to_home(run_dir / sdir.name / weights_path.name),
        "history": json_safe(result.history),
        **trainer.seed_record(result),
    }
    return _Seeded(record, result, files)


def run_final(
    spec_name: str,
    options: FinalOptions,
    on_epoch: EpochCallback | None = None,
    say: Say | None = None,
    progress: SeedProgress | None = None,
) -> FinalResult:
    """Train, test once per seed, write the report folder and attach it to the study.
    ``on_epoch`` hears of every epoch, ``progress(seed, line)`` gets the trainer's own
    progress lines.

    Everything is checked (spec, params, device, dataset) before any file is touched; the
    run then holds the spec's lock (:class:`dlops.io.Busy` if another run has it), builds
    its checkpoints and report aside and swaps them in at the end. Ctrl-C or SIGTERM ends
    it with :class:`Interrupted`, its checkpoints kept for ``--resume``.
    """
    say = say or (lambda message: None)
    started = time.perf_counter()
    spec = load_spec(spec_name)
    trainer = get_trainer(spec.trainer)
    if options.dataset is not None:  # before the study's name is made of it
        check_dataset_name(options.dataset)
    url = options.storage or default_storage_url()
    study = own_study(spec, options, find_study(url, study_name_for(spec, options)))
    chosen = choose_params(spec, options, study)
    spec = spec.for_dataset(options.dataset or chosen.dataset)
    seeds = final_seeds(spec, options)
    epochs = final_epochs(spec, options)
    configs = [
        build_config(
            spec,
            options.dataset or chosen.dataset,
            chosen.params,
            epochs=epochs,
            device=options.device,
            seed=s,
            **options.train_overrides,
        )
        for s in seeds
    ]
    check_same_recipe(chosen, configs[0])
    resolve_device(configs[0].device or options.device or "auto")  # a missing device: one line, now
    if configs[0].dataset:  # an unknown or unprepared dataset, a subset of 1 class: one line, before any work
        root = configs[0].data_root
        dataset = get_dataset(configs[0].dataset, Path(root) if root else None)
        check_subset_classes(dataset, configs[0].subset_classes)
        dataset.check_test()  # a damaged test cache: now, not after training
        if study is not None and chosen.source.get("kind") == "trial":
            recorded = study.user_attrs.get("data")  # the data the study measured its trials on
            now = data_identity(dataset)
            same_name = isinstance(recorded, dict) and recorded.get("dataset") == dataset.name
            changed = data_changes(recorded, now) if same_name else []
            if changed and isinstance(recorded, dict):
                say(
                    f"note: study {study.study_name!r} chose trial {chosen.source['trial']} on other data "
                    f"({data_change_text(recorded, now, changed)}); this run trains on the data as it is now"
                )

    state: dict[str, Any] = {"seed": seeds[0], "swapped": False}
    with sigterm_interrupts(), run_lock(lock_path(spec.name), f"another `dlops final` of {spec.name}"):
        try:
            return _run_locked(
                spec, options, trainer, url, study, chosen, seeds, configs, started, state, on_epoch, progress, say
            )
        except KeyboardInterrupt as exc:
            signum = getattr(exc, "signum", signal.SIGINT)
            name = signal.Signals(signum).name
            if state["swapped"]:
                raise Interrupted(
                    f"stopped by {name} after the run was complete: {report_dir(spec.name)} holds it; "
                    "its files may not be attached in the study (`dlops report` redraws the report)",
                    signum,
                    resumable=False,
                ) from None
            raise Interrupted(
                f"stopped by {name} during seed {state['seed']}: its checkpoints under {staging_dir(spec.name)} "
                "stay (the previous reference run is untouched); the same command with --resume continues",
                signum,
            ) from None


def _run_locked(
    spec: StudySpec,
    options: FinalOptions,
    trainer: Trainer,
    url: str,
    study: optuna.Study | None,
    chosen: ChosenParams,
    seeds: list[int],
    configs: list[TrainerConfig],
    started: float,
    state: dict[str, Any],
    on_epoch: EpochCallback | None,
    progress: SeedProgress | None,
    say: Say,
) -> FinalResult:
    """The part of :func:`run_final` that holds the spec's lock."""
    replacing = previous_run_line(spec.name)
    if replacing:
        say(replacing)
    replaced_study = previous_study(spec.name)  # its files come off that study once this run is attached
    if options.resume:
        if not any(staging_dir(spec.name).glob("seed*/checkpoint.pt")):
            say(f"nothing to resume under {staging_dir(spec.name)}: a fresh run")
        restored = [_check_checkpoint(seed_dir(spec.name, s) / "checkpoint.pt", c, say) for s, c in zip(seeds, configs)]
    else:
        discard_checkpoints(spec.name, say)
        restored = [0] * len(seeds)
    stage = report_staging_dir(spec.name)  # rebuilt by every run, resumed or not
    shutil.rmtree(stage, ignore_errors=True)
    run_id = datetime.now(UTC).strftime("run-%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]
    run_dir = final_checkpoint_dir(spec.name) / run_id
    runs = []
    for i, (seed, config, r) in enumerate(zip(seeds, configs, restored)):
        state["seed"] = seed
        runs.append(_run_seed(spec, trainer, seed, config, r, stage, run_dir, i == 0, on_epoch, progress, say))

    study_record = {"name": study.study_name, "storage": mask_url(url)} if study is not None else None
    skipped = f"no study {study_name_for(spec, options)!r} in the storage"
    if study is not None and not study_still_there(study):  # `dlops study delete` while this run trained
        skipped = f"study {study.study_name!r} was deleted during this run"
        study = None
    final = build_final(
        spec,
        trainer,
        chosen,
        seeds,
        configs,
        [run.record for run in runs],
        runs[-1].result,
        time.perf_counter() - started + sum(run.record["earlier_seconds"] for run in runs),
        study_record,
    )
    write_final(final, stage / "final.json")
    files = [stage / "final.json", *write_final_plots(final, stage), *(f for run in runs for f in run.files)]
    if study is not None:
        files += write_study_plots(study, stage / "study")
    files.append(write_spec_report(spec.name, study, stage))

    discard_other_seeds(spec.name, seeds, say)
    # The swap: the new run's checkpoints take their final name, then its report takes the
    # place of the old one; only then do the previous run's files go.
    out_dir = report_dir(spec.name)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with signals_held() as pending:
        os.rename(staging_dir(spec.name), run_dir)
        replace_dirs([(stage, out_dir)])  # in one step where the system can; the old report goes
        state["swapped"] = True
    if pending:  # a signal during the swap stops the run now that it is done
        raise Terminated() if pending[0] == signal.SIGTERM else KeyboardInterrupt()
    for old in final_checkpoint_dir(spec.name).glob("run-*"):
        if old != run_dir:
            shutil.rmtree(old, ignore_errors=True)
    try:
        stage.parent.rmdir()  # reports/.staging, once no run is being built
    except OSError:
        pass
    files = [out_dir / f.relative_to(stage) for f in files]

    artifacts: list[str] = []
    if study is not None:
        attach_to = chosen.source.get("trial") if chosen.source.get("kind") == "trial" else None
        uploadable = [f for f in files if f.suffix in (".png", ".json") and f.parent == out_dir]
        with connect(url, create=False).lock(study.study_name):  # `dlops study delete` holds it too
            if study_still_there(study):
                artifacts = attach_artifacts(study, uploadable, trial_number=attach_to, tag=spec.name)
            else:
                say(f"study {study.study_name!r} was deleted during this run: its artifacts skipped")
    else:
        say(f"{skipped}: study plots and artifacts skipped")
    withdraw_replaced(replaced_study, url, study, spec.name, say)
    return FinalResult(report_dir=out_dir, final=final, files=files, artifacts=artifacts)


# --------------------------------------------------------------------------- checking


def recompute_test_metrics(final_json: Path, device: str = "cpu") -> list[dict[str, Any]]:
    """Evaluate the saved weights of every seed in ``final_json`` on the test split
    again; the figures should equal those stored (they do exactly on the CPU)."""
    final = json.loads(Path(final_json).read_text())
    trainer = get_trainer(final["trainer"])
    out = []
    for entry in final["per_seed"]:
        saved = load_checkpoint(_resolve_home_path(entry["weights"]))
        config = trainer.config_class(**{**saved["config"], "device": device})
        figures = trainer.evaluate_weights(config, saved, resolve_device(device))
        out.append({"seed": entry["seed"], **json_safe(figures)})
    return out
