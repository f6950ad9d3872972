"""Greedy layer-wise autoencoder pretraining, then a fine-tuned MLP classifier.

Six autoencoders with hidden sizes ``X = [1024, 1000, 500, 256, 128, 64]`` are
trained one after the other: autoencoder ``k`` has one encoding layer
(``Linear(X[k-1], X[k])`` + ReLU) and one linear decoding layer, and learns to
reconstruct (MSE) the codes that the encoders ``0..k-1``, frozen, make of the
flattened, normalised image. Then the six encoders are stacked, a 10-way linear
output layer goes on top, and the whole network is fine-tuned end to end with
cross-entropy. Both stages use Adam.

``fit(config, report=None, *, dataset=None, checkpoint_path=None, on_epoch_end=None)``
has the contract of :func:`dlops.train.fit`: ``report(epoch, metrics)`` after every
fine-tuning epoch (it may raise to prune), ``history`` with one entry per
fine-tuning epoch under :data:`dlops.train.HISTORY_KEYS`, exact resumption from a
checkpoint written after every pretraining and every fine-tuning epoch.

The pretraining curves are ``result.layer_history``, a flat dict of lists:
``ae{k}_train_loss`` / ``ae{k}_val_loss`` (reconstruction MSE per epoch on the
pretraining data and on the validation images) and ``ae{k}_epoch_seconds`` for
every layer ``k`` (empty lists for a layer with 0 epochs: it costs nothing), plus
``hidden_sizes``. A study stores it as the trial's user attr ``layer_history``
(through ``result.extra_user_attrs``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dlops.data import Dataset, Split
from dlops.data.loader import BatchLoader
from dlops.errors import DlopsError
from dlops.io import load_checkpoint, save_checkpoint
from dlops.losses import CrossEntropyLoss
from dlops.train import (
    HISTORY_KEYS,
    NonFiniteLossError,
    epoch_metrics,
    evaluate,
    load_dataset,
    resolve_device,
)
from dlops.text import plural

HIDDEN_SIZES = (1024, 1000, 500, 256, 128, 64)
MAX_LAYERS = len(HIDDEN_SIZES)  # one pretrain_epochs_<k> field per layer
PRETRAIN_DATA = ("train", "unlabeled")


@dataclass
class AEConfig:
    """One autoencoder run. ``pretrain_epochs`` applies to every layer unless
    ``pretrain_epochs_<k>`` (k = 0..5, the index into ``hidden_sizes``) says otherwise;
    a study searches the per-layer values (0 = that layer is not pretrained)."""

    dataset: str = "stl10"
    data_root: str | None = None
    subset_classes: int | None = None
    subset_per_class: int | None = None
    hidden_sizes: list[int] = field(default_factory=lambda: list(HIDDEN_SIZES))
    pretrain_epochs: int = 10
    pretrain_epochs_0: int | None = None
    pretrain_epochs_1: int | None = None
    pretrain_epochs_2: int | None = None
    pretrain_epochs_3: int | None = None
    pretrain_epochs_4: int | None = None
    pretrain_epochs_5: int | None = None
    pretrain_lr: float = 1e-3
    pretrain_data: str = "train"  # "train" (labelled training split) or "unlabeled" (STL-10's 100,000)
    pretrain_limit: int | None = None  # only the first N pretraining images
    epochs: int = 20  # fine-tuning epochs
    lr: float = 1e-3  # fine-tuning Adam learning rate
    weight_decay: float = 0.0
    dropout: float = 0.0  # after every hidden layer during fine-tuning
    batch_size: int = 128
    eval_batch_size: int = 512
    seed: int = 0
    device: str = "auto"

    def layer_epochs(self) -> list[int]:
        """Pretraining epochs of each layer."""
        out = []
        for k in range(len(self.hidden_sizes)):
            own = getattr(self, f"pretrain_epochs_{k}", None)
            out.append(self.pretrain_epochs if own is None else own)
        return out

    def replace(self, **changes: Any) -> "AEConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def validate_config(config: AEConfig) -> None:
    """Reject settings no run could use, with one clear line."""
    sizes = config.hidden_sizes
    if not sizes or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in sizes):
        raise DlopsError(f"hidden_sizes must be a non-empty list of positive integers, got {sizes!r}")
    if len(sizes) > MAX_LAYERS:
        raise DlopsError(f"at most {MAX_LAYERS} hidden layers are supported, got {len(sizes)}")
    for k in range(len(sizes), MAX_LAYERS):
        if getattr(config, f"pretrain_epochs_{k}") is not None:
            raise DlopsError(f"pretrain_epochs_{k} is set, but there {'is' if len(sizes) == 1 else 'are'} only "
                             f"{plural(len(sizes), 'hidden layer')}")
    for k, n in enumerate(config.layer_epochs()):
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise DlopsError(f"pretraining epochs of layer {k} must be an integer >= 0, got {n!r}")
    for name in ("epochs", "batch_size", "eval_batch_size"):
        if getattr(config, name) < 1:
            raise DlopsError(f"{name} must be at least 1, got {getattr(config, name)}")
    for name in ("lr", "pretrain_lr"):
        if not getattr(config, name) > 0:
            raise DlopsError(f"{name} must be positive, got {getattr(config, name)}")
    if config.weight_decay < 0:
        raise DlopsError(f"weight_decay must be >= 0, got {config.weight_decay}")
    if not 0.0 <= config.dropout < 1.0:
        raise DlopsError(f"dropout must lie in [0, 1), got {config.dropout}")
    if config.pretrain_data not in PRETRAIN_DATA:
        raise DlopsError(f"unknown pretrain_data {config.pretrain_data!r} ({', '.join(PRETRAIN_DATA)})")
    if config.pretrain_data == "unlabeled" and config.dataset != "stl10":
        raise DlopsError(f"pretrain_data = 'unlabeled' needs dataset stl10 (got {config.dataset!r})")
    if config.pretrain_limit is not None and config.pretrain_limit < 1:
        raise DlopsError(f"pretrain_limit must be at least 1, got {config.pretrain_limit}")


# --------------------------------------------------------------------------- models


def _encoder(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_out), nn.ReLU())


class AutoencoderStack(nn.Module):
    """The greedy autoencoders: ``encoders[k]`` (Linear + ReLU) and ``decoders[k]``
    (Linear; its targets, the codes below it, are normalised pixels or ReLU outputs)."""

    def __init__(self, input_dim: int, hidden_sizes: list[int] | tuple[int, ...]):
        super().__init__()
        dims = [input_dim, *hidden_sizes]
        self.encoders = nn.ModuleList(_encoder(dims[k], dims[k + 1]) for k in range(len(hidden_sizes)))
        self.decoders = nn.ModuleList(nn.Linear(dims[k + 1], dims[k]) for k in range(len(hidden_sizes)))

    def encode(self, x: torch.Tensor, layers: int) -> torch.Tensor:
        """The codes after the first ``layers`` encoders (the flattened input for 0)."""
        x = x.flatten(1)
        for encoder in self.encoders[:layers]:
            x = encoder(x)
        return x

    def reconstruct(self, codes: torch.Tensor, layer: int) -> torch.Tensor:
        return self.decoders[layer](self.encoders[layer](codes))


class StackedClassifier(nn.Module):
    """The stacked encoders with a linear output layer: an MLP on the flattened image.

    ``forward`` takes normalised images and returns ``(embedding, logits)`` like
    :class:`dlops.models.ResNet18` (the embedding is the last hidden layer), so
    :func:`dlops.train.evaluate` scores it. The per-channel normalisation is kept as
    buffers, so :meth:`prepare` turns raw uint8 images into inputs on its own.
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        hidden_sizes: list[int] | tuple[int, ...],
        num_classes: int,
        dropout: float = 0.0,
        mean: np.ndarray | None = None,
        std: np.ndarray | None = None,
    ):
        super().__init__()
        channels = input_shape[0]
        dims = [int(np.prod(input_shape)), *hidden_sizes]
        self.encoders = nn.ModuleList(_encoder(dims[k], dims[k + 1]) for k in range(len(hidden_sizes)))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(dims[-1], num_classes)
        self.embedding_dim = dims[-1]
        mean = np.zeros(channels) if mean is None else mean
        std = np.ones(channels) if std is None else std
        self.register_buffer("input_mean", torch.as_tensor(np.asarray(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("input_std", torch.as_tensor(np.asarray(std), dtype=torch.float32).view(1, -1, 1, 1))

    def prepare(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 ``(N, C, H, W)`` images -> normalised float inputs on the model's device."""
        x = torch.from_numpy(np.array(images, dtype=np.uint8)).to(self.input_mean.device)  # copy: memmaps are read-only
        return (x.float() / 255.0 - self.input_mean) / self.input_std

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.flatten(1)
        for encoder in self.encoders:
            x = self.dropout(encoder(x))  # dropout is inactive in eval mode
        return x, self.head(x)

    def hidden(self, x: torch.Tensor, layer_index: int) -> torch.Tensor:
        """Activations of hidden layer ``X[layer_index]`` (eval mode: no dropout)."""
        x = x.flatten(1)
        for encoder in self.encoders[: layer_index + 1]:
            x = encoder(x)
        return x


def build_classifier(stack: AutoencoderStack, classifier: StackedClassifier) -> StackedClassifier:
    """Copy the pretrained encoders into the classifier (its output layer keeps its
    initialisation)."""
    classifier.encoders.load_state_dict(stack.encoders.state_dict())
    return classifier


# ------------------------------------------------------------------------ training


@dataclass
class AEResult:
    config: AEConfig
    history: dict[str, list[float]]  # per fine-tuning epoch, HISTORY_KEYS
    layer_history: dict[str, list[float]]  # ae{k}_train_loss, ae{k}_val_loss, ae{k}_epoch_seconds, hidden_sizes
    model: StackedClassifier
    stack: AutoencoderStack
    loss_fn: nn.Module
    dataset: Dataset
    device: torch.device
    start_epoch: int = 0  # fine-tuning epochs restored from a checkpoint
    seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)  # last fine-tuning epoch's

    @property
    def pretrain_seconds_per_epoch(self) -> list[float | None]:
        """Mean seconds per pretraining epoch of each layer (None: 0 epochs, no cost)."""
        return layer_seconds_per_epoch(self.layer_history)

    @property
    def extra_user_attrs(self) -> dict[str, Any]:
        """What a study stores in the trial's user attrs besides ``history``."""
        return layer_user_attrs(self.layer_history)


def layer_user_attrs(layer_history: dict[str, list[float]]) -> dict[str, Any]:
    """The per-layer curves as a trial's user attrs (NaN stored as null)."""
    safe = {
        k: [None if isinstance(v, float) and not math.isfinite(v) else v for v in vs]
        for k, vs in layer_history.items()
    }
    return {"layer_history": safe}


def layer_seconds_per_epoch(layer_history: dict[str, list[float]]) -> list[float | None]:
    out = []
    for k in range(len(layer_history["hidden_sizes"])):
        secs = layer_history[f"ae{k}_epoch_seconds"]
        out.append(sum(secs) / len(secs) if secs else None)
    return out


def empty_layer_history(hidden_sizes: list[int]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"hidden_sizes": list(hidden_sizes)}
    for k in range(len(hidden_sizes)):
        for key in ("train_loss", "val_loss", "epoch_seconds"):
            out[f"ae{k}_{key}"] = []
    return out


def pretraining_split(config: AEConfig, dataset: Dataset) -> Split:
    """The images the autoencoders learn from (labels unused)."""
    if config.pretrain_data == "unlabeled":
        from dlops.data.stl10 import load_unlabeled  # memory-mapped; labels all -1

        split = load_unlabeled(Path(config.data_root) if config.data_root else None)
    else:
        split = dataset.train
    if config.pretrain_limit is not None and config.pretrain_limit < len(split):
        split = Split(split.images[: config.pretrain_limit], split.labels[: config.pretrain_limit])
    return split


@torch.no_grad()
def reconstruction_loss(stack: AutoencoderStack, layer: int, loader: BatchLoader) -> float:
    """Mean squared reconstruction error of autoencoder ``layer`` over a loader."""
    stack.eval()
    total, n = 0.0, 0
    for x, _ in loader:
        codes = stack.encode(x, layer)
        total += float(F.mse_loss(stack.reconstruct(codes, layer), codes, reduction="sum")) / codes.shape[1]
        n += len(x)
    return total / max(n, 1)


def pretrain_epoch(
    stack: AutoencoderStack, layer: int, loader: BatchLoader, optimizer: torch.optim.Optimizer, epoch: int = 0
) -> float:
    """One epoch of autoencoder ``layer`` on the codes of the frozen encoders below it.
    Returns the mean training MSE."""
    stack.eval()  # no dropout/batch-norm here; keeps the frozen part obviously inert
    total = torch.zeros((), device=loader.device)
    n = 0
    for step, (x, _) in enumerate(loader):
        with torch.no_grad():  # the encoders below are frozen: no graph through them
            codes = stack.encode(x, layer)
        loss = F.mse_loss(stack.reconstruct(codes, layer), codes)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach() * len(x)
        n += len(x)
        if step % 20 == 0 and not math.isfinite(float(loss.detach())):
            raise NonFiniteLossError(epoch, step, float(loss))
    mean = float(total) / max(n, 1)
    if not math.isfinite(mean):
        raise NonFiniteLossError(epoch, step, mean)
    return mean


def finetune_epoch(
    model: StackedClassifier, loader: BatchLoader, optimizer: torch.optim.Optimizer, epoch: int
) -> tuple[float, float]:
    """One epoch of end-to-end cross-entropy. Returns (mean loss, accuracy)."""
    model.train()
    loss_sum = torch.zeros((), device=loader.device)
    correct = torch.zeros((), device=loader.device, dtype=torch.long)
    n = 0
    for step, (x, y) in enumerate(loader):
        _, logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        n += len(y)
        if step % 20 == 0 and not math.isfinite(float(loss.detach())):
            raise NonFiniteLossError(epoch, step, float(loss))
    mean = float(loss_sum) / max(n, 1)
    if not math.isfinite(mean):
        raise NonFiniteLossError(epoch, step, mean)
    return mean, int(correct) / max(n, 1)


def _adam(params, lr: float, weight_decay: float = 0.0) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def _layer_optimizer(stack: AutoencoderStack, layer: int, lr: float) -> torch.optim.Adam:
    """Adam over autoencoder ``layer`` only; everything else is frozen."""
    stack.requires_grad_(False)
    params = [*stack.encoders[layer].parameters(), *stack.decoders[layer].parameters()]
    for p in params:
        p.requires_grad_(True)
    return _adam(params, lr)


_RESUME_IGNORES = ("device", "eval_batch_size")


def fit(
    config: AEConfig,
    report: Callable[[int, dict[str, float]], None] | None = None,
    *,
    dataset: Dataset | None = None,
    checkpoint_path: Path | None = None,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
    on_layer_epoch: Callable[[int, int, dict[str, float]], None] | None = None,
) -> AEResult:
    """Pretrain the autoencoders greedily, then fine-tune the stacked classifier.

    ``report(epoch, metrics)`` and ``on_epoch_end`` are called after each fine-tuning
    epoch (as in :func:`dlops.train.fit`); ``on_layer_epoch(layer, epoch, metrics)``
    after each pretraining epoch with ``train_loss``, ``val_loss`` and
    ``epoch_seconds``. With ``checkpoint_path`` the whole state is saved after every
    pretraining and fine-tuning epoch and an existing checkpoint is resumed (exactly,
    on the CPU); restored fine-tuning epochs are reported again.
    """
    validate_config(config)
    started = time.perf_counter()
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    if dataset is None:
        dataset = load_dataset(config)  # type: ignore[arg-type]  (reads dataset, data_root, subset_*)
    mean, std = dataset.channel_stats()
    shape = dataset.image_shape
    hidden = list(config.hidden_sizes)
    # Both models are built up front, so the random initialisation does not depend on
    # where a run resumes.
    stack = AutoencoderStack(int(np.prod(shape)), hidden).to(device)
    model = StackedClassifier(shape, hidden, dataset.num_classes, config.dropout, mean, std).to(device)
    loss_fn = CrossEntropyLoss(dataset.num_classes, model.embedding_dim)

    pretrain_loader = BatchLoader(
        pretraining_split(config, dataset), config.batch_size, mean, std, device, shuffle=True, seed=config.seed
    )
    recon_val_loader = BatchLoader(dataset.val, config.eval_batch_size, mean, std, device)
    finetune_loader = BatchLoader(dataset.train, config.batch_size, mean, std, device, shuffle=True, seed=config.seed + 1)

    history: dict[str, list[float]] = {k: [] for k in HISTORY_KEYS}
    layer_history = empty_layer_history(hidden)
    layer_epochs = config.layer_epochs()
    resume: dict[str, Any] | None = None
    if checkpoint_path is not None and Path(checkpoint_path).exists():
        # On the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest.
        resume = load_checkpoint(checkpoint_path, map_location="cpu")  # CorruptCheckpoint if damaged
        mine = {k: v for k, v in config.to_dict().items() if k not in _RESUME_IGNORES}
        theirs = {k: v for k, v in resume["config"].items() if k not in _RESUME_IGNORES}
        if mine != theirs:
            changed = sorted(k for k in mine if mine.get(k) != theirs.get(k))
            raise DlopsError(f"checkpoint {checkpoint_path} belongs to another configuration (differs in {', '.join(changed)})")
        stack.load_state_dict(resume["stack"])
        model.load_state_dict(resume["model"])
        pretrain_loader.load_state_dict(resume["pretrain_loader"])
        finetune_loader.load_state_dict(resume["finetune_loader"])
        torch.set_rng_state(resume["torch_rng"])
        history, layer_history = resume["history"], resume["layer_history"]

    def save(phase: str, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        if checkpoint_path is None:
            return
        save_checkpoint(
            {
                "config": config.to_dict(),
                "phase": phase,  # "pretrain" or "finetune"
                "epoch": epoch,  # the last fine-tuning epoch done, as in dlops.train (-1: none yet)
                "stack": stack.state_dict(),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "pretrain_loader": pretrain_loader.state_dict(),
                "finetune_loader": finetune_loader.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "history": history,
                "layer_history": layer_history,
            },
            Path(checkpoint_path),
        )

    # ---- greedy pretraining: layer k learns while encoders 0..k-1 stay frozen
    finetuning_started = resume is not None and resume["phase"] == "finetune"
    for layer, n_epochs in enumerate(layer_epochs):
        if finetuning_started:
            break
        first = len(layer_history[f"ae{layer}_train_loss"])  # epochs already done (resume)
        # (a checkpoint taken in this layer holds this layer's optimizer)
        if first >= n_epochs:
            continue
        optimizer = _layer_optimizer(stack, layer, config.pretrain_lr)
        if first > 0:
            optimizer.load_state_dict(resume["optimizer"])  # type: ignore[index]
        for epoch in range(first, n_epochs):
            t0 = time.perf_counter()
            train_loss = pretrain_epoch(stack, layer, pretrain_loader, optimizer, epoch)
            val_loss = reconstruction_loss(stack, layer, recon_val_loader)
            seconds = time.perf_counter() - t0
            for key, value in (("train_loss", train_loss), ("val_loss", val_loss), ("epoch_seconds", seconds)):
                layer_history[f"ae{layer}_{key}"].append(value)
            save("pretrain", -1, optimizer)
            if on_layer_epoch is not None:
                on_layer_epoch(layer, epoch, {"train_loss": train_loss, "val_loss": val_loss, "epoch_seconds": seconds})
    stack.requires_grad_(False)

    if report is not None:
        report_epoch = report

        def report(epoch: int, metrics: dict[str, float]) -> None:  # type: ignore[no-redef]
            """A trial pruned here (report raises) keeps its pretraining curves: the
            exception carries them as ``extra_user_attrs``, as a result would."""
            try:
                report_epoch(epoch, metrics)
            except BaseException as exc:
                exc.extra_user_attrs = layer_user_attrs(layer_history)  # type: ignore[attr-defined]
                raise

    # ---- fine-tuning of the stacked encoders + output layer
    if not finetuning_started:
        build_classifier(stack, model)
    optimizer = _adam(model.parameters(), config.lr, config.weight_decay)
    start_epoch = 0
    if finetuning_started:
        optimizer.load_state_dict(resume["optimizer"])  # type: ignore[index]
        start_epoch = resume["epoch"] + 1  # type: ignore[index]
        for epoch in range(start_epoch):
            if report is not None:
                report(epoch, {k: history[k][epoch] for k in HISTORY_KEYS})

    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        train_loss, train_acc = finetune_epoch(model, finetune_loader, optimizer, epoch)
        val = evaluate(model, loss_fn, dataset.val, mean, std, device, config.eval_batch_size)
        metrics = epoch_metrics(train_loss, train_acc, val, config.lr, time.perf_counter() - t0)
        for k in HISTORY_KEYS:
            history[k].append(metrics[k])
        save("finetune", epoch, optimizer)
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)
        if report is not None:
            report(epoch, metrics)

    model.eval()
    return AEResult(
        config=config,
        history=history,
        layer_history=layer_history,
        model=model,
        stack=stack,
        loss_fn=loss_fn,
        dataset=dataset,
        device=device,
        start_epoch=start_epoch,
        seconds=time.perf_counter() - started,
        metrics={k: v[-1] for k, v in history.items() if v},
    )


@torch.no_grad()
def predict_logits(model: StackedClassifier, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Logits for raw uint8 ``(N, C, H, W)`` images (float32 ``(N, classes)``)."""
    model.eval()
    out = [model(model.prepare(images[i : i + batch_size]))[1].float().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, model.head.out_features), dtype=np.float32)


def predict(model: StackedClassifier, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Predicted class indices for raw uint8 images."""
    return predict_logits(model, images, batch_size).argmax(1)
