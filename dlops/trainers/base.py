"""What every trainer is and shares: the :class:`Trainer` protocol, the fit result, the
epoch row, the NaN guard, the device, evaluation on a split, and one checkpoint format
with one compatibility rule.

A trainer module (``dlops.trainers.<name>``) defines a ``TRAINER`` object that subclasses
:class:`Trainer`. It knows nothing of Optuna, the CLI or the reports: after each epoch
``fit`` calls ``report(epoch, metrics)`` (which may raise to stop: pruning), and it hands
extra progress lines, already formatted, to ``progress(line)``: one per epoch of a stage
that does not report (the autoencoder's pretraining), after that epoch's checkpoint is
written, so that ``progress`` too may raise to stop the run there (a graceful stop).
"""

from __future__ import annotations

import dataclasses
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import numpy as np
import torch
from torch import nn

from dlops.data import Dataset, Split, get_dataset, take_subset
from dlops.data.loader import BatchLoader
from dlops.errors import DlopsError
from dlops.io import load_checkpoint, save_checkpoint
from dlops.losses import Loss
from dlops.metrics import centroid_scores

# The per-epoch keys of every trainer's history (a loss may add its own diagnostics).
HISTORY_KEYS = ("train_loss", "train_acc", "val_loss", "val_top1", "val_top5", "lr", "epoch_seconds")

# Settings that may differ between a checkpoint and the run that resumes it: they change
# where and how fast a run goes, never its numbers.
RESUMABLE_DIFFERENCES = frozenset({"device", "eval_batch_size", "data_root", "compile", "cudnn_benchmark"})

ReportFn = Callable[[int, dict[str, float]], None]  # (epoch from 0, that epoch's metrics)
ProgressFn = Callable[[str], None]  # one formatted progress line (no trial or seed prefix)


class TrainerConfig(Protocol):
    """What callers read from any trainer's config dataclass."""

    dataset: str
    data_root: str | None
    subset_classes: int | None
    subset_per_class: int | None
    epochs: int
    lr: float
    seed: int
    device: str
    eval_batch_size: int

    def to_dict(self) -> dict[str, Any]: ...

    def replace(self, **changes: Any) -> Any: ...


ConfigT = TypeVar("ConfigT", bound=TrainerConfig)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite (usually: the learning rate is too high).
    ``stage`` names the training stage where that is not the only one (the autoencoder's
    pretraining of a layer), ``lr_setting`` the config field of the learning rate it used.
    ``epoch`` and ``step`` count from 0; the message counts from 1."""

    def __init__(self, epoch: int, step: int, value: float, stage: str = "", lr_setting: str = "lr"):
        where = f" in {stage}" if stage else ""
        # counted from 1, as the progress lines count epochs ("epoch   1")
        super().__init__(f"non-finite training loss {value}{where} at epoch {epoch + 1}, step {step + 1}")
        self.epoch, self.step, self.value = epoch, step, value
        self.stage, self.lr_setting = stage, lr_setting


def check_step_loss(loss: torch.Tensor, epoch: int, step: int) -> None:
    """The NaN guard inside an epoch: every 20th step (reading a loss syncs the device)."""
    if step % 20 == 0 and not math.isfinite(float(loss.detach())):
        raise NonFiniteLossError(epoch, step, float(loss))


def check_epoch_loss(mean: float, epoch: int, step: int) -> float:
    """The NaN guard at the end of an epoch, on its mean loss (returned)."""
    if not math.isfinite(mean):
        raise NonFiniteLossError(epoch, step, mean)
    return mean


def epoch_row(
    train_loss: float, train_acc: float, val: dict[str, float], lr: float, seconds: float
) -> dict[str, float]:
    """One epoch's row of the history (the keys of ``HISTORY_KEYS``)."""
    return {
        "train_loss": train_loss,
        "train_acc": train_acc,
        "val_loss": val["loss"],
        "val_top1": val["top1"],
        "val_top5": val["top5"],
        "lr": lr,
        "epoch_seconds": seconds,
    }


def load_dataset(config: TrainerConfig) -> Dataset:
    """The dataset a config trains on (``dataset``, ``data_root``, ``subset_*``)."""
    root = Path(config.data_root) if config.data_root else None
    return take_subset(get_dataset(config.dataset, root), config.subset_classes, config.subset_per_class)


# --------------------------------------------------------------------------- validation

# The largest learning rate a config may ask for. The optimizers step in float32, whose range
# ends at 3.4e38, and scale the lr on the way (Adam's first step by 10): lr 1e308 was a
# RuntimeError inside torch. Far below this bound a run diverges, which is a result (the
# trial is pruned, its loss non-finite), not an error.
MAX_LR = 1e30

_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def check_set_and_typed(config: Any) -> None:
    """Every setting of a config dataclass has a value of its field's type: null only where
    the field admits None, a bool never for a number (nor a number for a bool), an int
    for an int, a number for a float. Fields without a plain default (lists) are the
    trainer's to check."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None:
            if "None" not in str(f.type):
                raise DlopsError(f"{f.name} must be set: null is not a value of {f.name}")
            continue
        kind = type(f.default) if f.default is not dataclasses.MISSING and f.default is not None else None
        if kind not in _TYPE_WORDS:
            continue
        ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
        if isinstance(value, bool) != (kind is bool):
            ok = False
        if not ok:
            raise DlopsError(f"{f.name} must be {_TYPE_WORDS[kind]}, got {value!r}")


def check_range(
    config: Any,
    name: str,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> None:
    """``config.<name>`` is a finite number (an integer with ``integer``) within the bounds
    (``None``: unbounded on that side; ``*_open``: the bound itself excluded); a setting
    whose value is None is left alone (:func:`check_set_and_typed` says whether it may be)."""
    value = getattr(config, name)
    if value is None:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if integer and not isinstance(value, int):
        ok = False
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        what = "an integer" if integer else "a finite number"
        if low is not None and high is not None:
            what += f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            what += f" {'>' if low_open else '>='} {low:g}"
        elif high is not None:
            what += f" {'<' if high_open else '<='} {high:g}"
        raise DlopsError(f"{name} must be {what}, got {value!r}")


# --------------------------------------------------------------------------- device


def resolve_device(name: str) -> torch.device:
    """The torch device of ``--device`` (auto, cpu, cuda, cuda:K); anything this machine
    cannot run on is a :class:`DlopsError` in one line."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise DlopsError(f"unknown device {name!r} (auto, cpu, cuda, cuda:K)") from None
    if device.type not in ("cpu", "cuda"):
        raise DlopsError(f"unknown device {name!r} (auto, cpu, cuda, cuda:K)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DlopsError(f"--device {name} asked for, but no CUDA device is available (use --device cpu)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DlopsError(f"--device {name}: only {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})")
    return device


def describe_device(device: torch.device) -> dict[str, Any]:
    """What ran a run: the device, its name, and the GPUs the process was given."""
    out: dict[str, Any] = {"device": str(device)}
    if device.type == "cuda":
        out["name"] = torch.cuda.get_device_name(device)
        out["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    return out


# --------------------------------------------------------------------------- evaluation


def autocast(device: torch.device) -> torch.autocast:
    """bfloat16 autocast on CUDA; off on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def centroids_of(model: nn.Module) -> torch.Tensor:
    """The class centroids of a model scored by nearest centroid (a buffer of the model)."""
    centroids = model.centroids
    if not isinstance(centroids, torch.Tensor):
        raise TypeError(f"{type(model).__name__} has no centroids buffer")
    return centroids


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loss_fn: Loss,
    split: Split,
    mean: np.ndarray,
    std: np.ndarray,
    device: torch.device,
    batch_size: int = 512,
) -> dict[str, float]:
    """Top-1/top-5 on a split and, for a loss scored by logits, its training objective
    (cross-entropy; plus the center term for center loss): ``loss``, NaN otherwise."""
    model.eval()
    loader = BatchLoader(split, batch_size, mean, std, device, channels_last=device.type == "cuda")
    # Sums stay on the device and are read once at the end: no host sync per batch.
    hits = torch.zeros(2, device=device, dtype=torch.long)  # top-1, top-5
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    n = 0
    for x, y in loader:
        with autocast(device):
            embedding, logits = model(x)
        if loss_fn.scored_by == "centroids":
            scores = centroid_scores(loss_fn.scoring_embedding(embedding), centroids_of(model))
        else:
            scores = logits.float()
            loss_sum += loss_fn.validation_loss_sum(embedding, scores, y)
        top = scores.topk(min(5, scores.shape[1]), dim=1).indices == y[:, None]
        hits[0] += top[:, 0].sum()
        hits[1] += top.any(1).sum()
        n += len(y)
    top1, top5 = hits.tolist()
    out = {"top1": top1 / max(n, 1), "top5": top5 / max(n, 1)}
    out["loss"] = float(loss_sum) / max(n, 1) if loss_fn.scored_by == "logits" else float("nan")
    return out


# --------------------------------------------------------------------------- checkpoints


def config_defaults(config: Any) -> dict[str, Any]:
    """The default of every field of a config dataclass that has one."""
    return {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}


def config_differences(saved: dict[str, Any], now: dict[str, Any], defaults: dict[str, Any] | None = None) -> list[str]:
    """The settings (sorted) in which two configs differ, those of
    :data:`RESUMABLE_DIFFERENCES` aside. A setting that ``saved`` lacks (a checkpoint made
    before the setting existed) counts as its default from ``defaults``."""
    saved = {**(defaults or {}), **saved}
    return sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_DIFFERENCES and saved.get(k) != now.get(k))


def first_change(saved: dict[str, Any], now: dict[str, Any], config: Any) -> tuple[str, Any, Any] | None:
    """The first setting (sorted) in which config dict ``now`` differs from ``saved``, with
    its value in each, or None; a setting ``saved`` lacks counts as the default of
    ``config``'s field (as in :func:`config_differences`)."""
    defaults = config_defaults(config)
    differs = config_differences(saved, now, {k: v for k, v in defaults.items() if k in now})
    if not differs:
        return None
    key = differs[0]
    return key, {**defaults, **saved}.get(key), now.get(key)


def config_matches(saved: dict[str, Any], now: dict[str, Any], defaults: dict[str, Any] | None = None) -> bool:
    """Whether a checkpoint made with config ``saved`` may resume a run of config ``now``."""
    return not config_differences(saved, now, defaults)


def save_state(path: Path, config: TrainerConfig, epoch: int, **state: Any) -> None:
    """Checkpoint a run: its config, the last epoch done (-1: none yet) and ``state``."""
    save_checkpoint({"config": config.to_dict(), "epoch": epoch, **state}, Path(path))


def load_state(path: Path | None, config: TrainerConfig, map_location: Any = "cpu") -> dict[str, Any] | None:
    """The checkpoint at ``path`` to resume ``config`` from; None when there is none.
    One made with another configuration is a :class:`DlopsError`; one that does not load,
    :class:`dlops.io.CorruptCheckpoint`."""
    if path is None or not Path(path).exists():
        return None
    state = load_checkpoint(path, map_location=map_location)
    changed = config_differences(state["config"], config.to_dict(), config_defaults(config))
    if changed:
        raise DlopsError(f"checkpoint {path} belongs to another configuration (differs in {', '.join(changed)})")
    return state


# --------------------------------------------------------------------------- results


@dataclass
class FitResult:
    """What ``fit`` returns: ``history`` (per-epoch lists of the trainer's ``metrics``),
    ``metrics`` (the last epoch's) and ``extra_user_attrs`` (more per-trial results a
    study keeps with the trial), with what a final run evaluates."""

    config: TrainerConfig
    history: dict[str, list[float]]
    model: nn.Module
    loss_fn: Loss
    dataset: Dataset
    device: torch.device
    start_epoch: int = 0  # > 0 when resumed from a checkpoint
    seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    extra_user_attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Table:
    """A table for the written report (``report.py`` renders it as Markdown)."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


# --------------------------------------------------------------------------- the protocol


class Trainer(ABC, Generic[ConfigT]):
    """A trainer: its config, its per-epoch metrics, ``fit``, and what a reference run
    (``dlops final``) and the written report need from it.

    An exception raised by ``report`` inside ``fit`` (pruning) propagates from ``fit``;
    a trainer may attach ``extra_user_attrs`` (a dict) to it, as to its result.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[Any]]  # ConfigT
    metrics: ClassVar[tuple[str, ...]] = HISTORY_KEYS
    title: ClassVar[str]  # the heading of its section in reports/index.md
    index_by_loss: ClassVar[bool] = False  # reports/index.md compares its specs side by side, one column per loss
    report_figures: ClassVar[tuple[tuple[str, str], ...]] = ()  # (file, caption) that report.md embeds

    @abstractmethod
    def validate(self, config: ConfigT) -> None:
        """Reject settings no run could use (a :class:`DlopsError` in one line)."""

    @abstractmethod
    def fit(
        self,
        config: ConfigT,
        report: ReportFn | None = None,
        *,
        checkpoint_path: Path | None = None,
        progress: ProgressFn | None = None,
    ) -> FitResult:
        """Train ``config``; with ``checkpoint_path``, checkpoint after every epoch and resume
        an existing checkpoint exactly (its restored epochs are reported again)."""

    # ---- a reference run
    @abstractmethod
    def test_metrics(self, result: FitResult, split: Split) -> dict[str, Any]:
        """The test figures of a fitted model (``test_*`` keys; more per-seed data allowed)."""

    @abstractmethod
    def weights(self, result: FitResult) -> dict[str, Any]:
        """The state dicts a reference run keeps (``weights.pt``)."""

    @abstractmethod
    def evaluate_weights(self, config: ConfigT, saved: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """:meth:`test_metrics` again, from the saved :meth:`weights`."""

    def foreign_settings(self, config: ConfigT) -> dict[str, str]:
        """Settings this trainer has that a run of ``config`` would not read (another
        loss's, say): name -> what reads them."""
        return {}

    def seed_record(self, result: FitResult) -> dict[str, Any]:
        """More per-seed data for ``final.json`` (JSON-safe)."""
        return {}

    def data_record(self, result: FitResult) -> dict[str, Any]:
        """More about the data a run trained on, for ``final.json``'s ``dataset`` entry
        (JSON-safe; beside its name, classes and split sizes)."""
        return {}

    def seed_files(self, result: FitResult, split: Split, out_dir: Path) -> list[Path]:
        """Figures drawn from the fitted model of the first seed (they need the model)."""
        return []

    def summary(self, per_seed: list[dict[str, Any]]) -> dict[str, Any]:
        """More top-level entries of ``final.json``, from its per-seed records."""
        return {}

    # ---- the written report (from final.json alone)
    def final_problem(self, final: dict[str, Any]) -> str | None:
        """What in the trainer's own entries of ``final.json`` (those :meth:`final_plots`
        and :meth:`report_tables` read) is missing or of the wrong type, in a few words
        naming the key, or None. The report checks every other key it reads itself."""
        return None

    def final_plots(self, final: dict[str, Any], out_dir: Path) -> list[Path]:
        """Figures beyond the training curves, drawn from ``final.json``."""
        return []

    def figure_captions(self, final: dict[str, Any]) -> tuple[tuple[str, str], ...]:
        """:attr:`report_figures` with the captions of the run ``final.json`` describes
        (a caption may name what depends on its settings)."""
        return self.report_figures

    def report_tables(self, final: dict[str, Any]) -> list[Table]:
        """Tables for ``report.md`` beyond the test figures, from ``final.json``."""
        return []

    def resumed_text(self, seed: dict[str, Any]) -> str:
        """Where a seed of ``final.json`` resumed (its ``per_seed`` record): the epochs its
        checkpoint held, 0 for a seed trained from the start."""
        return str(seed["resumed_from_epoch"])

    def report_rows(self, final: dict[str, Any]) -> list[tuple[str, str]]:
        """More (label, text) rows of the reference run's table, in ``report.md`` and in its
        section of ``index.md``, from ``final.json``."""
        return []

    def test_notes(self, final: dict[str, Any]) -> list[str]:
        """Sentences for ``report.md`` under the test figures: what they measure in the run
        ``final.json`` describes, where that depends on its settings (how a model is scored,
        what its loss adds up)."""
        return []
