"""Greedy layer-wise autoencoder pretraining, then a fine-tuned MLP classifier.

Six autoencoders with hidden sizes ``X = [1024, 1000, 500, 256, 128, 64]`` are
trained one after the other: autoencoder ``k`` has one encoding layer
(``Linear(X[k-1], X[k])`` + ReLU) and one linear decoding layer, and learns to
reconstruct (MSE) the codes that the encoders ``0..k-1``, frozen, make of the
flattened, normalised image. Then the six encoders are stacked, a 10-way linear
output layer goes on top, and the whole network is fine-tuned end to end with
cross-entropy. Both stages use Adam.

``fit(config, report=None, *, dataset=None, checkpoint_path=None, progress=None)``
has the contract of :class:`dlops.trainers.base.Trainer`: ``report(epoch, metrics)``
after every fine-tuning epoch (it may raise to prune), ``history`` with one entry per
fine-tuning epoch under :data:`dlops.trainers.base.HISTORY_KEYS`, exact resumption from
a checkpoint written after every pretraining and every fine-tuning epoch, and a
``progress`` line after every pretraining epoch.

The pretraining curves are ``result.layer_history``, a flat dict of lists:
``ae{k}_train_loss`` / ``ae{k}_val_loss`` (reconstruction MSE per epoch on the
pretraining data and on the validation images) and ``ae{k}_epoch_seconds`` for
every layer ``k`` (empty lists for a layer with 0 epochs: it costs nothing), plus
``hidden_sizes``. A study stores it as the trial's user attr ``layer_history``
(through ``result.extra_user_attrs``).

A reference run adds the test accuracy per class, ``ae_losses.png`` and
``class_accuracy.png`` (from ``final.json``) and the t-SNE of the 256-unit layer
``X[3]`` for the first 500 test images of each class (``tsne.png``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dlops.data import Dataset, Split
from dlops.data.loader import BatchLoader
from dlops.errors import DlopsError
from dlops.io import json_safe
from dlops.losses import CrossEntropyLoss
from dlops.metrics import mean_std
from dlops.text import plural
from dlops.trainers.base import (
    HISTORY_KEYS,
    MAX_LR,
    FitResult,
    NonFiniteLossError,
    ProgressFn,
    ReportFn,
    Table,
    Trainer,
    check_epoch_loss,
    check_range,
    check_set_and_typed,
    check_step_loss,
    epoch_row,
    evaluate,
    load_dataset,
    load_state,
    resolve_device,
    save_state,
)

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

    def replace(self, **changes: Any) -> AEConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def validate_config(config: AEConfig) -> None:
    """Reject settings no run could use, with one clear line."""
    check_set_and_typed(config)
    sizes = config.hidden_sizes
    if (
        not isinstance(sizes, list | tuple)
        or not sizes
        or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in sizes)
    ):
        raise DlopsError(f"hidden_sizes must be a non-empty list of positive integers, got {sizes!r}")
    if len(sizes) > MAX_LAYERS:
        raise DlopsError(f"at most {MAX_LAYERS} hidden layers are supported, got {len(sizes)}")
    for k in range(len(sizes), MAX_LAYERS):
        if getattr(config, f"pretrain_epochs_{k}") is not None:
            raise DlopsError(
                f"pretrain_epochs_{k} is set, but there {'is' if len(sizes) == 1 else 'are'} only "
                f"{plural(len(sizes), 'hidden layer')}"
            )
    for k, n in enumerate(config.layer_epochs()):
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise DlopsError(f"pretraining epochs of layer {k} must be an integer >= 0, got {n!r}")
    for name in ("epochs", "batch_size", "eval_batch_size"):
        check_range(config, name, 1, integer=True)
    for name in ("subset_classes", "subset_per_class", "pretrain_limit"):  # None: all
        check_range(config, name, 1, integer=True)
    check_range(config, "seed", integer=True)
    for name in ("lr", "pretrain_lr"):
        check_range(config, name, 0, MAX_LR, low_open=True)
    check_range(config, "weight_decay", 0)
    check_range(config, "dropout", 0, 1, high_open=True)
    if config.pretrain_data not in PRETRAIN_DATA:
        raise DlopsError(f"unknown pretrain_data {config.pretrain_data!r} ({', '.join(PRETRAIN_DATA)})")
    if config.pretrain_data == "unlabeled" and config.dataset != "stl10":
        raise DlopsError(
            f"pretrain_data = 'unlabeled' needs dataset stl10 (got {config.dataset!r}): only STL-10 has "
            f"unlabeled images; set pretrain_data = 'train' for {config.dataset} (in a spec, under "
            f"[datasets.{config.dataset}])"
        )


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
    :func:`dlops.trainers.base.evaluate` scores it. The per-channel normalisation is kept as
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
        self.hidden_sizes = [int(h) for h in hidden_sizes]
        self.encoders = nn.ModuleList(_encoder(dims[k], dims[k + 1]) for k in range(len(hidden_sizes)))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(dims[-1], num_classes)
        self.embedding_dim = dims[-1]
        mean = np.zeros(channels) if mean is None else mean
        std = np.ones(channels) if std is None else std
        self.input_mean: torch.Tensor
        self.input_std: torch.Tensor
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
class AEResult(FitResult):
    """:class:`FitResult` (``history``: per fine-tuning epoch) with the pretraining curves:
    ``layer_history`` holds ae{k}_train_loss, ae{k}_val_loss, ae{k}_epoch_seconds, hidden_sizes."""

    layer_history: dict[str, list[float]] = field(default_factory=dict)
    stack: AutoencoderStack | None = None
    # pretraining epochs of each layer restored from a checkpoint (resumed, not retrained)
    restored_layer_epochs: list[int] = field(default_factory=list)
    # the images the autoencoders learnt from: {"split", "images", "available"} (pretraining_record)
    pretraining: dict[str, Any] = field(default_factory=dict)

    @property
    def pretrain_seconds_per_epoch(self) -> list[float | None]:
        """Mean seconds per pretraining epoch of each layer (None: 0 epochs, no cost)."""
        return layer_seconds_per_epoch(self.layer_history)


def layer_user_attrs(layer_history: dict[str, list[float]]) -> dict[str, Any]:
    """The per-layer curves as a trial's user attrs (NaN stored as null)."""
    return {"layer_history": json_safe(layer_history)}


def layer_seconds_per_epoch(layer_history: dict[str, list[float]]) -> list[float | None]:
    out = []
    for k in range(len(layer_history["hidden_sizes"])):
        secs = [s for s in layer_history[f"ae{k}_epoch_seconds"] if s is not None]  # null: not measured
        out.append(sum(secs) / len(secs) if secs else None)
    return out


def empty_layer_history(hidden_sizes: list[int]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"hidden_sizes": list(hidden_sizes)}
    for k in range(len(hidden_sizes)):
        for key in ("train_loss", "val_loss", "epoch_seconds"):
            out[f"ae{k}_{key}"] = []
    return out


def pretraining_split(config: AEConfig, dataset: Dataset) -> tuple[Split, dict[str, Any]]:
    """The images the autoencoders learn from (labels unused), and what they are for
    ``final.json``: the split (``train`` or ``unlabeled``), how many images pretraining used
    and how many that split has (``pretrain_limit`` takes the first N)."""
    if config.pretrain_data == "unlabeled":
        from dlops.data.stl10 import load_unlabeled  # memory-mapped; labels all -1

        split = load_unlabeled(Path(config.data_root) if config.data_root else None)
    else:
        split = dataset.train
    available = len(split)
    if config.pretrain_limit is not None and config.pretrain_limit < len(split):
        split = Split(split.images[: config.pretrain_limit], split.labels[: config.pretrain_limit])
    return split, {"split": config.pretrain_data, "images": len(split), "available": available}


def pretraining_text(final: dict[str, Any]) -> str | None:
    """What pretraining learnt from, for a reader of the report: ``final.json``'s
    ``dataset.pretraining`` (an older one has only ``config.pretrain_data``: no count);
    None where it records neither."""
    record = final["dataset"].get("pretraining")
    config = final.get("config")
    split = record["split"] if record else config.get("pretrain_data") if isinstance(config, dict) else None
    if not isinstance(split, str):
        return None
    unlabeled = split == "unlabeled"
    owner = f"{final['dataset']['name']}'s" if unlabeled else "the training split's"
    kind = "unlabeled images" if unlabeled else "images (labels unused)"
    if not record:
        return f"{owner} {kind} (how many is not recorded)"
    images, available = record["images"], record["available"]
    first = f"the first {images:,} of " if images < available else ""
    return f"{first}{owner} {available:,} {kind}"


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
        check_step_loss(loss, epoch, step)
    return check_epoch_loss(float(total) / max(n, 1), epoch, step)


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
        check_step_loss(loss, epoch, step)
    return check_epoch_loss(float(loss_sum) / max(n, 1), epoch, step), int(correct) / max(n, 1)


def _adam(params, lr: float, weight_decay: float = 0.0) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def _layer_optimizer(stack: AutoencoderStack, layer: int, lr: float) -> torch.optim.Adam:
    """Adam over autoencoder ``layer`` only; everything else is frozen."""
    stack.requires_grad_(False)
    params = [*stack.encoders[layer].parameters(), *stack.decoders[layer].parameters()]
    for p in params:
        p.requires_grad_(True)
    return _adam(params, lr)


def layer_epoch_line(layer: int, epoch: int, m: dict[str, float]) -> str:
    """The progress line of one pretraining epoch."""
    return (
        f"pretraining AE {layer} epoch {epoch + 1:>3}  train_mse {m['train_loss']:.5f}"
        f"  val_mse {m['val_loss']:.5f}  ({m['epoch_seconds']:.1f}s)"
    )


def fit(
    config: AEConfig,
    report: ReportFn | None = None,
    *,
    dataset: Dataset | None = None,
    checkpoint_path: Path | None = None,
    progress: ProgressFn | None = None,
) -> AEResult:
    """Pretrain the autoencoders greedily, then fine-tune the stacked classifier.

    ``report(epoch, metrics)`` is called after each fine-tuning epoch (as in
    :class:`Trainer`); ``progress(line)`` after each pretraining epoch
    with its :func:`layer_epoch_line`. With ``checkpoint_path`` the whole state is saved after every
    pretraining and fine-tuning epoch and an existing checkpoint is resumed (exactly,
    on the CPU); restored fine-tuning epochs are reported again.
    """
    validate_config(config)
    started = time.perf_counter()
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    if dataset is None:
        dataset = load_dataset(config)
    mean, std = dataset.channel_stats()
    shape = dataset.image_shape
    hidden = list(config.hidden_sizes)
    # Both models are built up front, so the random initialisation does not depend on
    # where a run resumes.
    stack = AutoencoderStack(int(np.prod(shape)), hidden).to(device)
    model = StackedClassifier(shape, hidden, dataset.num_classes, config.dropout, mean, std).to(device)
    loss_fn = CrossEntropyLoss(dataset.num_classes, model.embedding_dim)

    pretrain_split, pretraining = pretraining_split(config, dataset)
    pretrain_loader = BatchLoader(pretrain_split, config.batch_size, mean, std, device, shuffle=True, seed=config.seed)
    recon_val_loader = BatchLoader(dataset.val, config.eval_batch_size, mean, std, device)
    finetune_loader = BatchLoader(
        dataset.train, config.batch_size, mean, std, device, shuffle=True, seed=config.seed + 1
    )

    history: dict[str, list[float]] = {k: [] for k in HISTORY_KEYS}
    layer_history = empty_layer_history(hidden)
    layer_epochs = config.layer_epochs()
    # On the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest.
    resume = load_state(checkpoint_path, config, map_location="cpu")  # CorruptCheckpoint if damaged
    if resume is not None:
        stack.load_state_dict(resume["stack"])
        model.load_state_dict(resume["model"])
        pretrain_loader.load_state_dict(resume["pretrain_loader"])
        finetune_loader.load_state_dict(resume["finetune_loader"])
        torch.set_rng_state(resume["torch_rng"])
        history, layer_history = resume["history"], resume["layer_history"]
    restored_layer_epochs = [len(layer_history[f"ae{k}_train_loss"]) for k in range(len(hidden))]

    def save(phase: str, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        if checkpoint_path is None:
            return
        # "epoch": the last fine-tuning epoch done, the one reported (-1: none yet)
        save_state(
            checkpoint_path,
            config,
            epoch,
            phase=phase,
            stack=stack.state_dict(),
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            pretrain_loader=pretrain_loader.state_dict(),
            finetune_loader=finetune_loader.state_dict(),
            torch_rng=torch.get_rng_state(),
            history=history,
            layer_history=layer_history,
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
            try:
                train_loss = pretrain_epoch(stack, layer, pretrain_loader, optimizer, epoch)
            except NonFiniteLossError as exc:  # pretrain_lr's doing, not the fine-tuning lr's
                raise NonFiniteLossError(
                    exc.epoch, exc.step, exc.value, stage=f"the pretraining of AE {layer}", lr_setting="pretrain_lr"
                ) from None
            val_loss = reconstruction_loss(stack, layer, recon_val_loader)
            seconds = time.perf_counter() - t0
            for key, value in (("train_loss", train_loss), ("val_loss", val_loss), ("epoch_seconds", seconds)):
                layer_history[f"ae{layer}_{key}"].append(value)
            save("pretrain", -1, optimizer)
            if progress is not None:
                progress(
                    layer_epoch_line(
                        layer, epoch, {"train_loss": train_loss, "val_loss": val_loss, "epoch_seconds": seconds}
                    )
                )
    stack.requires_grad_(False)

    if report is not None:
        report_epoch = report

        def report(epoch: int, metrics: dict[str, float]) -> None:
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
        metrics = epoch_row(train_loss, train_acc, val, config.lr, time.perf_counter() - t0)
        for k in HISTORY_KEYS:
            history[k].append(metrics[k])
        save("finetune", epoch, optimizer)
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
        restored_layer_epochs=restored_layer_epochs,
        pretraining=pretraining,
        seconds=time.perf_counter() - started,
        metrics={k: v[-1] for k, v in history.items() if v},
        extra_user_attrs=layer_user_attrs(layer_history),
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


# ------------------------------------------------------------------------ analysis

TSNE_LAYER = 3  # X[3]: the 256-unit layer of X = [1024, 1000, 500, 256, 128, 64]
TSNE_PER_CLASS = 500


def tsne_layer(n_layers: int) -> int:
    """The hidden layer the t-SNE shows: ``X[3]``, or the last of a stack of fewer."""
    return min(TSNE_LAYER, n_layers - 1)


def tsne_caption(hidden_sizes: Sequence[int]) -> str:
    """What ``tsne.png`` shows, for a stack of ``hidden_sizes``: the layer, its units, and
    why it is not ``X[3]`` where it is not."""
    layer = tsne_layer(len(hidden_sizes))
    why = "" if layer == TSNE_LAYER else f" (the last: the stack has {plural(len(hidden_sizes), 'hidden layer')})"
    return f"t-SNE of the {hidden_sizes[layer]}-unit hidden layer X[{layer}]{why}, test images"


def class_accuracy(labels: np.ndarray, predictions: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """Accuracy within each class (NaN for a class with no images), keyed by class name
    in class-index order. Weighted by the class counts they give the overall accuracy."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    out = {}
    for index, name in enumerate(class_names):
        mask = labels == index
        out[name] = float(np.mean(predictions[mask] == index)) if mask.any() else float("nan")
    return out


def tsne_selection(labels: np.ndarray, per_class: int = TSNE_PER_CLASS) -> np.ndarray:
    """Indices of the first ``per_class`` images of each class (all of a class that has
    fewer), in the order of ``labels`` (test order)."""
    labels = np.asarray(labels)
    keep = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        keep[np.flatnonzero(labels == c)[:per_class]] = True
    return np.flatnonzero(keep)


@torch.no_grad()
def layer_activations(
    model: StackedClassifier, images: np.ndarray, layer_index: int = TSNE_LAYER, batch_size: int = 512
) -> np.ndarray:
    """Activations of hidden layer ``X[layer_index]`` (default the 256-unit ``X[3]``)
    for raw uint8 ``(N, C, H, W)`` images, as float32 ``(N, units)``."""
    if not 0 <= layer_index < len(model.encoders):
        raise ValueError(f"layer_index {layer_index} out of range (the model has {len(model.encoders)} hidden layers)")
    model.eval()
    parts = [
        model.hidden(model.prepare(images[i : i + batch_size]), layer_index).float().cpu()
        for i in range(0, len(images), batch_size)
    ]
    units = model.hidden_sizes[layer_index]
    return torch.cat(parts).numpy() if parts else np.zeros((0, units), dtype=np.float32)


def tsne_embedding(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE (scikit-learn, PCA initialisation, seeded) of ``features``. A layer of one
    unit (PCA cannot make 2 components of it) or one whose activations are all the same
    (a dead ReLU layer: PCA's scale divides by zero and t-SNE crashes the process) starts
    from a seeded random layout instead."""
    from sklearn.manifold import TSNE

    features = np.asarray(features, dtype=np.float32)
    perplexity = float(min(30.0, max(1.0, (len(features) - 1) / 3)))
    varies = len(features) > 0 and bool(np.ptp(features, axis=0).any())
    init = "pca" if features.ndim == 2 and features.shape[1] >= 2 and varies else "random"
    tsne = TSNE(n_components=2, perplexity=perplexity, init=init, random_state=seed)
    return tsne.fit_transform(features).astype(np.float32)


def _fmt(v: float | None) -> str:
    return "-" if v is None or not np.isfinite(v) else f"{v:.3f}"


def layer_cost_table(layer_history: dict[str, list[float]]) -> Table:
    """The pretraining cost per layer: epochs, seconds per epoch and in total (a layer
    with 0 epochs costs nothing), final train/validation MSE."""
    rows = []
    per_epoch = layer_seconds_per_epoch(layer_history)
    for k, units in enumerate(layer_history["hidden_sizes"]):
        secs = [s for s in layer_history[f"ae{k}_epoch_seconds"] if s is not None]
        train, val = layer_history[f"ae{k}_train_loss"], layer_history[f"ae{k}_val_loss"]
        rows.append(
            (
                f"X[{k}]",
                str(units),
                str(len(train)),
                _fmt(per_epoch[k]) if per_epoch[k] is not None else ("-" if train else "0 (skipped)"),
                f"{sum(secs):.2f}",
                _fmt(train[-1]) if train else "-",
                _fmt(val[-1]) if val else "-",
            )
        )
    return Table(
        "Pretraining cost per layer (seed 0)",
        ("layer", "units", "epochs", "s/epoch", "s total", "final train MSE", "final val MSE"),
        tuple(rows),
    )


def _test_figures(
    model: StackedClassifier, class_names: Sequence[str], split: Split, batch_size: int
) -> dict[str, Any]:
    """The test figures from one float32 pass over ``split``: the accuracy, top-1, top-5, the
    loss and the per-class table all count the same predictions (a second pass, under bf16
    autocast on a GPU, could disagree with the first on a few images)."""
    labels = torch.as_tensor(np.asarray(split.labels), dtype=torch.long)
    logits = torch.from_numpy(predict_logits(model, split.images, batch_size))
    if not len(labels):
        nan = float("nan")
        return {
            "test_accuracy": nan,
            "test_top1": nan,
            "test_top5": nan,
            "test_loss": nan,
            "class_accuracy": class_accuracy(labels.numpy(), labels.numpy(), class_names),
        }
    ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
    predictions = ranked[:, 0]
    top1 = float((predictions == labels).double().mean())
    return {
        "test_accuracy": top1,
        "test_top1": top1,
        "test_top5": float((ranked == labels[:, None]).any(1).double().mean()),
        "test_loss": float(nn.functional.cross_entropy(logits.double(), labels)),
        "class_accuracy": class_accuracy(labels.numpy(), predictions.numpy(), class_names),
    }


class AutoencoderTrainer(Trainer[AEConfig]):
    name = "autoencoder"
    config_class = AEConfig
    metrics = HISTORY_KEYS
    title = "Autoencoder (greedy layer-wise pretraining)"
    report_figures = (
        ("class_accuracy.png", "per-class test accuracy"),
        ("ae_losses.png", "autoencoder losses (pretraining per layer, fine-tuning)"),
        (
            "tsne.png",
            "t-SNE of the 256-unit hidden layer X[3] (the last layer where the stack is shorter), test images",
        ),
    )

    def validate(self, config: AEConfig) -> None:
        validate_config(config)

    def fit(
        self,
        config: AEConfig,
        report: ReportFn | None = None,
        *,
        checkpoint_path: Path | None = None,
        progress: ProgressFn | None = None,
    ) -> AEResult:
        return fit(config, report, checkpoint_path=checkpoint_path, progress=progress)

    def test_metrics(self, result: FitResult, split: Split) -> dict[str, Any]:
        model = result.model
        assert isinstance(model, StackedClassifier)
        return _test_figures(model, result.dataset.class_names, split, result.config.eval_batch_size)

    def weights(self, result: FitResult) -> dict[str, Any]:
        return {"model": result.model.state_dict()}  # includes the input normalisation buffers

    def evaluate_weights(self, config: AEConfig, saved: dict[str, Any], device: torch.device) -> dict[str, Any]:
        dataset = load_dataset(config)
        model = StackedClassifier(dataset.image_shape, list(config.hidden_sizes), dataset.num_classes, config.dropout)
        model.load_state_dict(saved["model"])
        model = model.to(device).eval()
        return _test_figures(model, dataset.class_names, dataset.test(), config.eval_batch_size)

    def seed_record(self, result: FitResult) -> dict[str, Any]:
        """Pretraining curves per layer, so ``ae_losses.png`` can be redrawn from final.json,
        and the pretraining epochs of each layer a resumed seed took from its checkpoint
        (``resumed_from_epoch`` counts fine-tuning epochs only)."""
        assert isinstance(result, AEResult)
        return {
            "layer_history": json_safe(result.layer_history),
            "resumed_pretraining_epochs": list(result.restored_layer_epochs),
        }

    def data_record(self, result: FitResult) -> dict[str, Any]:
        """``pretraining``: the images the autoencoders learnt from (:func:`pretraining_split`)."""
        assert isinstance(result, AEResult)
        return {"pretraining": dict(result.pretraining)}

    def seed_files(self, result: FitResult, split: Split, out_dir: Path) -> list[Path]:
        """``tsne.png``: t-SNE of layer ``X[3]`` (the last hidden layer of a smaller stack)
        for the first 500 test images of each class."""
        from dlops import plots

        model: StackedClassifier = result.model  # type: ignore[assignment]
        layer = tsne_layer(len(model.encoders))
        units = model.hidden_sizes[layer]
        chosen = tsne_selection(split.labels, per_class=TSNE_PER_CLASS)
        features = layer_activations(model, np.asarray(split.images)[chosen], layer_index=layer)
        points = tsne_embedding(features, seed=result.config.seed)
        fig = plots.plot_tsne(points, np.asarray(split.labels)[chosen], result.dataset.class_names)
        fig.axes[0].set_title(
            f"t-SNE of the {units}-unit layer X[{layer}] (seed {result.config.seed}): the first {TSNE_PER_CLASS} "
            f"test images of each class, or all it has ({len(chosen)} in all)"
        )
        return [plots.save_figure(fig, out_dir / "tsne.png")]

    def summary(self, per_seed: list[dict[str, Any]]) -> dict[str, Any]:
        """``class_accuracy``: the mean over seeds of each class's test accuracy."""
        names = per_seed[0].get("class_accuracy") or {}
        if not names:
            return {}
        return {"class_accuracy": {name: mean_std([s["class_accuracy"][name] for s in per_seed])[0] for name in names}}

    def final_problem(self, final: dict[str, Any]) -> str | None:
        """``class_accuracy`` (class -> accuracy or null) and each seed's ``layer_history``
        (``hidden_sizes``, and per layer its lists of losses and seconds, numbers or null)."""
        accuracy = final.get("class_accuracy")
        if accuracy is not None and not isinstance(accuracy, dict):
            return "class_accuracy is not an object"
        for name, value in (accuracy or {}).items():
            if not _number_or_null(value):
                return f"class_accuracy.{name} is not a number or null"
        for i, seed in enumerate(final["per_seed"]):
            restored = seed.get("resumed_pretraining_epochs")
            if restored is not None and not (
                isinstance(restored, list) and all(type(n) is int and n >= 0 for n in restored)
            ):
                return f"per_seed[{i}].resumed_pretraining_epochs is not a list of epoch counts"
        dataset = final.get("dataset")
        pretraining = dataset.get("pretraining") if isinstance(dataset, dict) else None
        if pretraining is not None:
            if not isinstance(pretraining, dict) or not isinstance(pretraining.get("split"), str):
                return "dataset.pretraining is not an object with a split"
            for key in ("images", "available"):
                if type(pretraining.get(key)) is not int:
                    return f"dataset.pretraining.{key} is not an integer"
        for i, seed in enumerate(final["per_seed"]):
            layers = seed.get("layer_history")
            where = f"per_seed[{i}].layer_history"
            if layers is None:
                continue
            if not isinstance(layers, dict):
                return f"{where} is not an object"
            sizes = layers.get("hidden_sizes", [])
            if not isinstance(sizes, list) or not all(isinstance(n, int) and not isinstance(n, bool) for n in sizes):
                return f"{where}.hidden_sizes is not a list of integers"
            for key, values in layers.items():
                if key != "hidden_sizes" and not (isinstance(values, list) and all(map(_number_or_null, values))):
                    return f"{where}.{key} is not a list of numbers or null"
            keys = [f"ae{k}_{what}" for k in range(len(sizes)) for what in ("train_loss", "val_loss", "epoch_seconds")]
            lacking = [key for key in keys if key not in layers]
            if lacking:
                return f"{where} has no {', '.join(lacking)}"
        return None

    def final_plots(self, final: dict[str, Any], out_dir: Path) -> list[Path]:
        """``class_accuracy.png`` (mean over seeds) and ``ae_losses.png`` (the first seed),
        each titled with the seeds it shows."""
        from dlops import plots

        files = []
        if final.get("class_accuracy"):
            files.append(
                plots.save_figure(
                    plots.plot_class_accuracy(final["class_accuracy"], n_seeds=len(final["per_seed"])),
                    out_dir / "class_accuracy.png",
                )
            )
        seed = final["per_seed"][0]
        layer_history = seed.get("layer_history")
        if layer_history:
            seconds = layer_seconds_per_epoch(layer_history) if "hidden_sizes" in layer_history else None
            fig = plots.plot_ae_losses(seed["history"], layer_history, seconds, seed=seed["seed"])
            files.append(plots.save_figure(fig, out_dir / "ae_losses.png"))
        return files

    def figure_captions(self, final: dict[str, Any]) -> tuple[tuple[str, str], ...]:
        """The t-SNE's caption names the layer it shows, of the run's own hidden sizes."""
        sizes = _hidden_sizes(final)
        if not sizes:
            return self.report_figures
        return tuple(
            (png, tsne_caption(sizes) if png == "tsne.png" else caption) for png, caption in self.report_figures
        )

    def resumed_text(self, seed: dict[str, Any]) -> str:
        """A seed resumed inside pretraining (``resumed_from_epoch`` counts fine-tuning epochs,
        0 there) names the last pretraining epoch its checkpoint held, as the stop line does:
        "after pretraining AE 2 epoch 1" (``resumed_pretraining_epochs`` [2, 2, 1, 0, ...])."""
        restored = seed.get("resumed_pretraining_epochs") or []
        if seed["resumed_from_epoch"] or not any(restored):
            return super().resumed_text(seed)
        layer = max(k for k, n in enumerate(restored) if n)
        return f"after pretraining AE {layer} epoch {restored[layer]}"

    def report_rows(self, final: dict[str, Any]) -> list[tuple[str, str]]:
        """The images pretraining learnt from: the training split or STL-10's unlabeled ones."""
        text = pretraining_text(final)
        return [("pretraining images", text)] if text else []

    def report_tables(self, final: dict[str, Any]) -> list[Table]:
        """The per-class test accuracy (mean over seeds) and the pretraining cost per layer."""
        tables = []
        if final.get("class_accuracy"):
            rows = tuple((name, "–" if acc is None else f"{acc:.4f}") for name, acc in final["class_accuracy"].items())
            seeds = len(final.get("per_seed") or ())
            over = f"mean over {seeds} seeds" if seeds > 1 else f"seed {final['per_seed'][0].get('seed', 0)}"
            tables.append(Table(f"Per-class test accuracy ({over})", ("class", "accuracy"), rows))
        layer_history = final["per_seed"][0].get("layer_history")
        if layer_history and "hidden_sizes" in layer_history:
            tables.append(layer_cost_table(layer_history))
        return tables


def _hidden_sizes(final: dict[str, Any]) -> list[int] | None:
    """The hidden sizes of the run ``final.json`` describes (its first seed's pretraining
    record, else its config), or None where it holds none that is a list of positive integers."""
    layers = (final.get("per_seed") or [{}])[0].get("layer_history")
    config = final.get("config")
    for sizes in (
        layers.get("hidden_sizes") if isinstance(layers, dict) else None,
        config.get("hidden_sizes") if isinstance(config, dict) else None,
    ):
        if isinstance(sizes, list) and sizes and all(type(n) is int and n > 0 for n in sizes):
            return sizes
    return None


def _number_or_null(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


TRAINER = AutoencoderTrainer()
