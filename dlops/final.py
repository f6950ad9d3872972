"""Reference runs (``dlops final``): train the chosen configuration of a spec for its
``[final]`` epochs with N seeds, evaluate each seed once on the test split, and write
``$DLOPS_HOME/reports/<spec>/`` (``final.json``, ``curves.png``, ``report.md``, the
study plots; for the autoencoder also per-class accuracy, t-SNE and its loss curves).

Where the configuration comes from (``--params``):

- ``best``: the best trial of the spec's study (its dataset too, unless ``--dataset``);
- ``baseline``: the spec's ``[baseline]``, no study needed;
- ``FILE.json``: an object of settings, or an earlier ``final.json`` (its ``params``).

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

import ctypes
import dataclasses
import inspect
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from dlops.errors import DlopsError
from dlops.io import CorruptCheckpoint, load_checkpoint, run_lock, save_checkpoint, write_text_atomic
from dlops.paths import checkpoints_dir, default_storage_url, dlops_home, folder_name, reports_dir
from dlops.spec import StudySpec, load_spec
from dlops.trainers import get_trainer

PARAM_SOURCES = ("best", "baseline")
TEST_KEYS = ("test_top1", "test_top5")

# (seed, epoch, metrics, restored): restored epochs come from a checkpoint, not training.
EpochCallback = Callable[[int, int, dict[str, float], bool], None]
# (seed, layer, epoch, metrics): a pretraining epoch of a layer-wise trainer (autoencoder).
LayerEpochCallback = Callable[[int, int, int, dict[str, float]], None]
Notify = Callable[[str], None]


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


@dataclass
class FinalResult:
    report_dir: Path
    final: dict[str, Any]  # the contents of final.json
    files: list[Path]
    artifacts: list[str]  # artifact ids attached in the study storage


# --------------------------------------------------------------------------- params


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def json_safe(obj: Any) -> Any:
    """NaN/inf -> null, numpy scalars -> Python, recursively (final.json stays strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    return _json_number(obj)


def study_name_for(spec: StudySpec, options: FinalOptions) -> str:
    """The study ``--params best`` reads: ``--study-name``, else the name ``dlops study run``
    gives the spec on ``--dataset`` (``resnet18-ce-digits``; the spec's own name on its own dataset)."""
    return options.study_name or spec.study_name(options.dataset)


def find_study(url: str, name: str):
    """The study ``name`` in the storage at ``url``, or ``None`` when there is none."""
    import optuna

    from dlops.storage import open_storage

    storage = open_storage(url)
    names = {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    if name not in names:
        return None
    return optuna.load_study(study_name=name, storage=storage)


def choose_params(spec: StudySpec, options: FinalOptions, study: Any) -> ChosenParams:
    """The settings to train: the study's best trial, the baseline, or a JSON file."""
    source = options.params
    if source == "baseline":
        return ChosenParams(spec.baseline_params(), {"kind": "baseline"})
    if source == "best":
        from dlops.storage import mask_url

        name = study_name_for(spec, options)
        url = options.storage or default_storage_url()
        if study is None:
            raise DlopsError(
                f"no study named {name!r} in {mask_url(url)}: run `dlops study run {spec.name}` first, "
                "or use --params baseline"
            )
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
        )
    return _params_from_file(spec, Path(source))


def _params_from_file(spec: StudySpec, path: Path) -> ChosenParams:
    if not path.is_file():
        raise DlopsError(f"--params {path}: no such file (give best, baseline or a JSON file)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DlopsError(f"--params {path}: not valid JSON: {exc}") from None
    if isinstance(raw, dict) and isinstance(raw.get("params"), dict):
        raw = raw["params"]  # an earlier final.json
    if not isinstance(raw, dict) or not raw:
        raise DlopsError(f"--params {path}: expected a JSON object of settings, e.g. {{\"lr\": 0.01}}")
    fields = {f.name for f in dataclasses.fields(get_trainer(spec.trainer).config_cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise DlopsError(f"--params {path}: {unknown[0]!r} is not a setting of trainer {spec.trainer!r}")
    return ChosenParams(dict(raw), {"kind": "file", "path": str(path)})


def build_config(spec: StudySpec, dataset: str | None, params: dict[str, Any], **overrides: Any) -> Any:
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
    return list(range(n))


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


# Settings that may differ between an interrupted run and its resumption.
RESUMABLE_DIFFERENCES = {"device", "data_root", "eval_batch_size", "compile", "cudnn_benchmark"}


def discard_checkpoints(spec_name: str, notify: Notify) -> None:
    """A fresh run: remove the checkpoints of an interrupted run (never a completed one's)."""
    staging = staging_dir(spec_name)
    if any(staging.glob("seed*/checkpoint.pt")):
        notify(f"discarded the checkpoints of an interrupted run under {staging} (--resume continues them instead)")
    shutil.rmtree(staging, ignore_errors=True)


def _check_checkpoint(path: Path, config: Any, notify: Notify | None = None) -> int:
    """Check that an existing checkpoint belongs to ``config``; returns how many
    (fine-tuning) epochs it holds, 0 when there is none. One that does not load or fails
    its checksum is discarded (with a word through ``notify``): its seed starts over."""
    if not path.exists():
        return 0
    try:
        state = load_checkpoint(path)
    except CorruptCheckpoint as exc:
        path.unlink(missing_ok=True)
        (notify or (lambda message: None))(f"{exc}: discarded, this seed starts from epoch 0")
        return 0
    saved = state.get("config") if isinstance(state, dict) else None
    if isinstance(saved, dict):
        now = config.to_dict()
        changed = sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_DIFFERENCES and saved.get(k) != now.get(k))
        if changed:
            k = changed[0]
            raise DlopsError(
                f"the checkpoint at {path} was made with {k}={saved.get(k)!r}, this run has {k}={now.get(k)!r}; "
                "run without --resume to start over"
            )
    if not isinstance(state, dict) or state.get("phase", "finetune") != "finetune":
        return 0  # the autoencoder's pretraining: no reported epoch restored yet
    return int(state.get("epoch", -1)) + 1


_RENAME_EXCHANGE = 2  # renameat2(2) flag: swap two paths in one step (Linux)


def _exchange(a: Path, b: Path) -> bool:
    """Swap the folders ``a`` and ``b`` atomically; False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _swap_in(new: Path, dest: Path) -> None:
    """Put folder ``new`` in the place of ``dest`` (in one step where the system can) and
    remove what was there."""
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rename(new, dest)
        return
    if _exchange(new, dest):
        shutil.rmtree(new, ignore_errors=True)  # now the previous contents
        return
    old = new.with_name(new.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    os.rename(dest, old)
    os.rename(new, dest)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT/SIGTERM wait until the block is done (the swap at the end of a run), then
    stop the run as they would have."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if pending:
        raise _Terminated() if pending[0] == signal.SIGTERM else KeyboardInterrupt()


# --------------------------------------------------------------------------- test evaluation


def _resnet_test_metrics(result: Any, split: Any) -> dict[str, Any]:
    from dlops.train import evaluate

    mean, std = result.dataset.channel_stats()
    m = evaluate(result.model, result.loss_fn, split, mean, std, result.device, result.config.eval_batch_size)
    return {"test_top1": m["top1"], "test_top5": m["top5"], "test_loss": m["loss"]}


def _resnet_weights(result: Any) -> dict[str, Any]:
    return {"model": result.model.state_dict(), "loss": result.loss_fn.state_dict()}


def _resnet_evaluate_weights(config: Any, weights: dict[str, Any], device: torch.device) -> dict[str, Any]:
    from dlops.train import build_model_and_loss, evaluate, load_dataset

    dataset = load_dataset(config)
    model, loss_fn = build_model_and_loss(config, dataset, device)
    model.load_state_dict(weights["model"])
    loss_fn.load_state_dict(weights["loss"])
    mean, std = dataset.channel_stats()
    m = evaluate(model, loss_fn, dataset.test(), mean, std, device, config.eval_batch_size)
    return {"test_top1": m["top1"], "test_top5": m["top5"], "test_loss": m["loss"]}


@dataclass(frozen=True)
class FinalHooks:
    """What a reference run needs from a trainer beyond ``fit``."""

    test_metrics: Callable[[Any, Any], dict[str, Any]]  # (fit result, test split) -> figures
    weights: Callable[[Any], dict[str, Any]]  # fit result -> state dicts to keep
    evaluate_weights: Callable[[Any, dict[str, Any], torch.device], dict[str, Any]]
    seed_record: Callable[[Any], dict[str, Any]] | None = None  # more per-seed data for final.json
    extras: Callable[[Any, Any, Path], list[Path]] | None = None  # (result, split, out dir) -> files


def _hooks(trainer: str) -> FinalHooks:
    if trainer == "resnet18":
        return FinalHooks(_resnet_test_metrics, _resnet_weights, _resnet_evaluate_weights)
    if trainer == "autoencoder":
        from dlops import final_ae

        return FinalHooks(final_ae.test_metrics, final_ae.weights, final_ae.evaluate_weights,
                          final_ae.seed_record, final_ae.extras)
    raise DlopsError(f"dlops final does not know how to evaluate trainer {trainer!r}")


# --------------------------------------------------------------------------- provenance


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("dlops", "torch", "optuna", "numpy", "scikit-learn", "matplotlib"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def git_commit() -> str | None:
    """The commit of the dlops source tree, ``+dirty`` when it has local changes; None
    outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1; 0 for one value) of the finite values."""
    xs = [v for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return None, None
    arr = np.asarray(xs, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


# --------------------------------------------------------------------------- the run


class Interrupted(DlopsError):
    """Ctrl-C or SIGTERM during a reference run: the checkpoints stay, ``--resume``
    continues; the previous reference run is untouched."""

    exit_code = 130

    def __init__(self, message: str, signum: int = signal.SIGINT, resumable: bool = True) -> None:
        super().__init__(message)
        self.signum, self.resumable = signum, resumable
        self.exit_code = 128 + signum


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is (as Ctrl-C raises KeyboardInterrupt)."""

    signum = signal.SIGTERM


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM stops a reference run the way Ctrl-C does (checkpoints kept, a message
    with the ``--resume`` command) instead of killing it without a word."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def resume_command(argv: Sequence[str]) -> str:
    """The command line ``argv`` with ``--resume`` (once), passwords masked."""
    from dlops.storage import mask_url

    args = [a for a in argv if a != "--resume"] + ["--resume"]
    return mask_url(" ".join(shlex.quote(a) for a in args))


@dataclass
class _Seeded:
    record: dict[str, Any]  # this seed's entry of final.json's per_seed
    result: Any  # the trainer's fit result
    files: list[Path]  # plots drawn from the model (first seed only)


def _run_seed(spec: StudySpec, hooks: FinalHooks, seed: int, config: Any, restored: int, out_dir: Path,
              run_dir: Path, draw_extras: bool, on_epoch: EpochCallback | None,
              on_layer_epoch: LayerEpochCallback | None, notify: Notify) -> _Seeded:
    """Train one seed (from its checkpoint, if any), then read the test split once. Files
    go to the staging folders; the record names where they will be once swapped in
    (``run_dir``)."""
    from dlops.objective import json_safe as history_json_safe
    from dlops.train import NonFiniteLossError

    sdir = seed_dir(spec.name, seed)
    checkpoint = sdir / "checkpoint.pt"
    if checkpoint.exists():
        notify(f"seed {seed}: resuming from {checkpoint}" + (f" (after epoch {restored})" if restored else ""))

    def report(epoch: int, metrics: dict[str, float]) -> None:
        if on_epoch is not None:
            on_epoch(seed, epoch, metrics, epoch < restored)

    fit = get_trainer(spec.trainer).fit
    extra: dict[str, Any] = {}
    if on_layer_epoch is not None and "on_layer_epoch" in inspect.signature(fit).parameters:
        extra["on_layer_epoch"] = lambda layer, epoch, metrics: on_layer_epoch(seed, layer, epoch, metrics)
    t0 = time.perf_counter()
    try:
        result = fit(config, report=report, checkpoint_path=checkpoint, **extra)
    except NonFiniteLossError as exc:
        raise DlopsError(f"seed {seed} diverged: {exc} (lr {config.lr} too high?); "
                         "the previous reference run is untouched") from None
    train_seconds = time.perf_counter() - t0
    # The one read of the test split for this seed: everything test-based below
    # (figures, per-class accuracy, t-SNE) uses this split object.
    split = result.dataset.test()
    figures = hooks.test_metrics(result, split)
    weights_path = sdir / "weights.pt"
    save_checkpoint({"trainer": spec.trainer, "config": config.to_dict(), **hooks.weights(result)}, weights_path)
    files = hooks.extras(result, split, out_dir) if hooks.extras is not None and draw_extras else []
    record = {
        "seed": seed,
        **figures,
        "epochs_trained": len(result.history["train_loss"]) - result.start_epoch,
        "resumed_from_epoch": result.start_epoch,
        "train_seconds": train_seconds,
        "split_sizes": {"train": len(result.dataset.train), "val": len(result.dataset.val), "test": len(split)},
        "checkpoint": _relative_to_home(run_dir / sdir.name / checkpoint.name),
        "weights": _relative_to_home(run_dir / sdir.name / weights_path.name),
        "history": history_json_safe(result.history),
        **(hooks.seed_record(result) if hooks.seed_record else {}),
    }
    return _Seeded(record, result, files)


def run_final(
    spec_name: str,
    options: FinalOptions,
    on_epoch: EpochCallback | None = None,
    notify: Notify | None = None,
    on_layer_epoch: LayerEpochCallback | None = None,
) -> FinalResult:
    """Train, test once per seed, write the report folder and attach it to the study.

    Everything is checked (spec, params, device, dataset) before any file is touched; the
    run then holds the spec's lock (:class:`dlops.io.Busy` if another run has it), builds
    its checkpoints and report aside and swaps them in at the end. Ctrl-C or SIGTERM ends
    it with :class:`Interrupted`, its checkpoints kept for ``--resume``.
    """
    from dlops.train import resolve_device

    notify = notify or (lambda message: None)
    started = time.perf_counter()
    spec = load_spec(spec_name)
    hooks = _hooks(spec.trainer)
    url = options.storage or default_storage_url()
    study = find_study(url, study_name_for(spec, options))
    chosen = choose_params(spec, options, study)
    spec = spec.for_dataset(options.dataset or chosen.dataset)
    seeds = final_seeds(spec, options)
    epochs = final_epochs(spec, options)
    configs = [
        build_config(spec, options.dataset or chosen.dataset, chosen.params, epochs=epochs, device=options.device,
                     seed=s, **options.train_overrides)
        for s in seeds
    ]
    resolve_device(getattr(configs[0], "device", None) or options.device or "auto")  # a missing device: one line, now
    if getattr(configs[0], "dataset", None):  # an unknown or unprepared dataset: one line, before any work
        from dlops.data import get_dataset

        root = getattr(configs[0], "data_root", None)
        get_dataset(configs[0].dataset, Path(root) if root else None)

    progress: dict[str, Any] = {"seed": seeds[0], "swapped": False}
    with _sigterm_interrupts(), run_lock(lock_path(spec.name), f"another `dlops final` of {spec.name}"):
        try:
            return _run_locked(spec, options, hooks, url, study, chosen, seeds, configs, started, progress,
                               on_epoch, on_layer_epoch, notify)
        except KeyboardInterrupt as exc:
            signum = getattr(exc, "signum", signal.SIGINT)
            name = signal.Signals(signum).name
            if progress["swapped"]:
                raise Interrupted(f"stopped by {name} after the run was complete: {report_dir(spec.name)} holds it; "
                                  "its files may not be attached in the study (`dlops report` redraws the report)",
                                  signum, resumable=False) from None
            raise Interrupted(
                f"stopped by {name} during seed {progress['seed']}: its checkpoints under {staging_dir(spec.name)} "
                "stay (the previous reference run is untouched); the same command with --resume continues",
                signum) from None


def _run_locked(spec: StudySpec, options: FinalOptions, hooks: FinalHooks, url: str, study: Any,
                chosen: ChosenParams, seeds: list[int], configs: list[Any], started: float,
                progress: dict[str, Any], on_epoch: EpochCallback | None,
                on_layer_epoch: LayerEpochCallback | None, notify: Notify) -> FinalResult:
    """The part of :func:`run_final` that holds the spec's lock."""
    if options.resume:
        if not any(staging_dir(spec.name).glob("seed*/checkpoint.pt")):
            notify(f"nothing to resume under {staging_dir(spec.name)}: a fresh run")
        restored = [_check_checkpoint(seed_dir(spec.name, s) / "checkpoint.pt", c, notify)
                    for s, c in zip(seeds, configs)]
    else:
        discard_checkpoints(spec.name, notify)
        restored = [0] * len(seeds)
    stage = report_staging_dir(spec.name)  # rebuilt by every run, resumed or not
    shutil.rmtree(stage, ignore_errors=True)
    run_id = datetime.now(timezone.utc).strftime("run-%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]
    run_dir = final_checkpoint_dir(spec.name) / run_id
    runs = []
    for i, (seed, config, r) in enumerate(zip(seeds, configs, restored)):
        progress["seed"] = seed
        runs.append(_run_seed(spec, hooks, seed, config, r, stage, run_dir, i == 0, on_epoch, on_layer_epoch, notify))

    per_seed = [run.record for run in runs]
    last = runs[-1].result
    ds = last.dataset
    figure_keys = [k for k, v in per_seed[0].items() if k.startswith("test_") and not isinstance(v, dict)]
    mean, std = {}, {}
    for k in figure_keys:
        mean[k], std[k] = mean_std([s[k] for s in per_seed])
    final = {
        "spec": spec.name,
        "trainer": spec.trainer,
        "description": spec.description,
        "metric": spec.metric,
        "params": chosen.params,
        "params_source": chosen.source,
        "dataset": {
            "name": getattr(configs[0], "dataset", None) or ds.name,
            "num_classes": ds.num_classes,
            "class_names": list(ds.class_names),
            "image_shape": list(ds.image_shape),
            "splits": per_seed[0]["split_sizes"],
        },
        "epochs": configs[0].epochs,
        "seeds": seeds,
        "config": {k: v for k, v in configs[0].to_dict().items() if k != "seed"},
        "mean": mean,
        "std": std,
        "per_seed": per_seed,
        "wall_seconds": time.perf_counter() - started,
        "device": str(last.device),
        "device_name": (torch.cuda.get_device_name(last.device) if last.device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "study": {"name": study.study_name, "storage": _masked(url)} if study is not None else None,
    }
    if "class_accuracy" in per_seed[0]:
        final["class_accuracy"] = {name: mean_std([s["class_accuracy"][name] for s in per_seed])[0]
                                   for name in per_seed[0]["class_accuracy"]}
    final = json_safe(final)
    write_text_atomic(stage / "final.json", json.dumps(final, indent=2) + "\n")

    from dlops import report as report_mod

    files = [stage / "final.json", *report_mod.write_final_plots(final, stage), *(f for run in runs for f in run.files)]
    if study is not None:
        files += report_mod.write_study_plots(study, stage / "study")
    files.append(report_mod.write_spec_report(spec.name, study, stage))

    # The swap: the new run's checkpoints take their final name, then its report takes the
    # place of the old one; only then do the previous run's files go.
    out_dir = report_dir(spec.name)
    with _signals_held():
        os.rename(staging_dir(spec.name), run_dir)
        _swap_in(stage, out_dir)
        progress["swapped"] = True
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
        artifacts = report_mod.attach_artifacts(study, uploadable, trial_number=attach_to, tag=spec.name)
    else:
        notify(f"no study {study_name_for(spec, options)!r} in the storage: study plots and artifacts skipped")
    return FinalResult(report_dir=out_dir, final=final, files=files, artifacts=artifacts)


def _masked(url: str) -> str:
    from dlops.storage import mask_url

    return mask_url(url)


# --------------------------------------------------------------------------- checking


def recompute_test_metrics(final_json: Path, device: str = "cpu") -> list[dict[str, Any]]:
    """Evaluate the saved weights of every seed in ``final_json`` on the test split
    again; the figures should equal those stored (they do exactly on the CPU)."""
    from dlops.train import resolve_device

    final = json.loads(Path(final_json).read_text())
    hooks = _hooks(final["trainer"])
    trainer = get_trainer(final["trainer"])
    out = []
    for entry in final["per_seed"]:
        saved = load_checkpoint(_resolve_home_path(entry["weights"]))
        config = trainer.config_cls(**{**saved["config"], "device": device})
        figures = hooks.evaluate_weights(config, saved, resolve_device(device))
        out.append({"seed": entry["seed"], **json_safe(figures)})
    return out
