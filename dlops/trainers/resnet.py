"""The ResNet18 trainer (``trainer = "resnet18"``): ``fit(config, report=None) -> FitResult``,
SGD with a cosine or constant schedule and any loss of :mod:`dlops.losses`, plus what a
reference run needs (test figures, weights). ``TRAINER`` is its :class:`Trainer`.

It serves studies, final runs and tests alike. It knows nothing of Optuna: after each
epoch it calls ``report(epoch, metrics)``; the caller turns that into ``trial.report``
and pruning (by raising from the callback).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dlops.data import Dataset, Split, first_per_class
from dlops.data.loader import BatchLoader, pk_shape
from dlops.errors import DlopsError
from dlops.losses import LOSSES, TRIPLET_MINING, Loss
from dlops.metrics import centroid_scores, class_centroids, topk_correct
from dlops.models import MODELS
from dlops.trainers import resnet_report
from dlops.trainers.base import (
    HISTORY_KEYS,
    MAX_LR,
    FitResult,
    ProgressFn,
    ReportFn,
    Table,
    Trainer,
    autocast,
    centroids_of,
    check_epoch_loss,
    check_range,
    check_set_and_typed,
    check_step_loss,
    describe_device,
    epoch_row,
    evaluate,
    load_dataset,
    load_state,
    resolve_device,
    save_state,
)


@dataclass
class TrainConfig:
    """Everything one training run needs. Specs set these; trials override some."""

    model: str = "resnet18"
    loss: str = "ce"
    dataset: str = "digits"
    data_root: str | None = None
    subset_classes: int | None = None  # cheap fidelity: the first N classes...
    subset_per_class: int | None = None  # ...and the first M training images of each
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    lr_schedule: str = "cosine"  # "cosine" (per epoch, to 0 after the last) or "constant"
    warmup_epochs: int = 0  # a linear ramp of the lr, step by step, over the first N epochs (0: none)
    margin: float = 0.2  # triplet hinge margin (unused with triplet_soft)
    triplet_soft: bool = False  # triplet: soft margin softplus(d_ap - d_an) instead of the hinge
    triplet_mining: str = "hard"  # triplet: "hard" (batch-hard) or "weighted" (softmax-weighted batch-hard)
    normalize_embedding: bool = True  # triplet: L2-normalise embeddings before distances
    embedding_dim: int = 0  # 0: the pooled features are the embedding; > 0: a linear head to this size
    embedding_bn: bool = False  # BatchNorm on the embedding (centres it: no shared orthant)
    center_lambda: float = 0.003  # center loss weight (Wen et al. 2016)
    center_alpha: float = 0.5  # center update rate
    samples_per_class: int = 4  # K of P x K batches (triplet)
    centroid_images_per_class: int | None = 50  # centroids from the first M of each class (None: all)
    width: int = 64  # ResNet18 first-stage channels
    augment: bool = True
    eval_batch_size: int = 512
    seed: int = 0
    device: str = "auto"
    # Speed only (results agree within rounding; a checkpoint resumes across them):
    compile: bool = False  # torch.compile the model for training and evaluation
    cudnn_benchmark: bool = True  # CUDA: let cuDNN pick the fastest kernels for each shape

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def build_model_and_loss(config: TrainConfig, dataset: Dataset, device: torch.device) -> tuple[nn.Module, Loss]:
    if config.model not in MODELS:
        raise DlopsError(f"unknown model {config.model!r} (known: {', '.join(MODELS)})")
    if config.loss not in LOSSES:
        raise DlopsError(f"unknown loss {config.loss!r} (known: {', '.join(LOSSES)})")
    model = MODELS[config.model](
        dataset.num_classes,
        in_channels=dataset.image_shape[0],
        width=config.width,
        embedding_dim=config.embedding_dim,
        embedding_bn=config.embedding_bn,
    )
    loss_fn = LOSSES[config.loss](
        dataset.num_classes,
        model.embedding_dim,
        margin=config.margin,
        triplet_soft=config.triplet_soft,
        normalize_embedding=config.normalize_embedding,
        triplet_mining=config.triplet_mining,
        center_lambda=config.center_lambda,
        center_alpha=config.center_alpha,
    )
    model, loss_fn = model.to(device), loss_fn.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, loss_fn


def train_step(
    net: nn.Module,
    loss_fn: Loss,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One SGD step: the forward pass under autocast, the loss, backward, the update.
    Returns ``(loss, embedding, logits)``; nothing here reads a value back to the host."""
    with autocast(device):
        embedding, logits = net(x)
    loss = loss_fn(embedding, logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, embedding, logits


_ONE_PER_CLASS = (
    "samples_per_class must be at least 2 with the {loss} loss, got {k}: with one image of each class "
    "in a batch no anchor has a positive, the loss is 0 and nothing trains"
)


def training_loader(
    config: TrainConfig,
    dataset: Dataset,
    loss_fn: Loss,
    mean: np.ndarray,
    std: np.ndarray,
    device: torch.device,
) -> BatchLoader:
    """The shuffled, augmented training batches of ``fit`` (P x K for a loss that needs them),
    normalised by ``dataset.channel_stats()`` (``mean``, ``std``: the caller has them)."""
    pk = pk_shape(config.batch_size, dataset.num_classes, config.samples_per_class) if loss_fn.needs_pk else None
    if pk is not None and pk[1] < 2:
        raise DlopsError(_ONE_PER_CLASS.format(k=pk[1], loss=config.loss))
    return BatchLoader(
        dataset.train,
        config.batch_size,
        mean,
        std,
        device,
        shuffle=True,
        augment=config.augment,
        hflip=dataset.hflip,
        crop_padding=dataset.crop_padding,
        seed=config.seed,
        pk=pk,
        channels_last=device.type == "cuda",
    )


def compile_model(model: nn.Module) -> nn.Module:
    """``torch.compile(model)``: the compiled module shares the parameters and buffers of
    ``model`` (its ``state_dict`` keys gain an ``_orig_mod.`` prefix, so checkpoints are
    taken from ``model`` itself)."""
    return torch.compile(model)  # type: ignore[return-value]  # typed as a function; it returns the module wrapped


@torch.no_grad()
def update_centroids(
    model: nn.Module,
    loss_fn: Loss,
    split: Split,
    mean: np.ndarray,
    std: np.ndarray,
    device: torch.device,
    batch_size: int = 512,
) -> None:
    """Set ``model.centroids`` to the class means of the eval-mode embeddings of ``split``."""
    model.eval()
    embs, labels = [], []
    for x, y in BatchLoader(split, batch_size, mean, std, device, channels_last=device.type == "cuda"):
        with autocast(device):
            embedding, _ = model(x)
        embs.append(loss_fn.scoring_embedding(embedding))
        labels.append(y)
    centroids = centroids_of(model)
    centroids.copy_(class_centroids(torch.cat(embs).float(), torch.cat(labels), centroids.shape[0]))


def _lr_factor(config: TrainConfig, epoch: int) -> float:
    """The schedule's share of ``lr`` in ``epoch``, warm-up aside: 1 during the warm-up (its
    ramp, :func:`warmup_factor`, climbs to ``lr``), then constant or a cosine that starts at 1
    in the last warm-up epoch (where the ramp reaches ``lr``; epoch 0 without a warm-up) and
    would reach 0 after the last epoch. Without a warm-up or with one epoch of it, that is
    the plain cosine over ``epochs``."""
    if config.lr_schedule == "constant" or epoch < config.warmup_epochs:
        return 1.0
    if config.lr_schedule == "cosine":
        start = max(config.warmup_epochs - 1, 0)
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - start) / (config.epochs - start)))
    raise DlopsError(f"unknown lr_schedule {config.lr_schedule!r} (cosine, constant)")


def warmup_factor(config: TrainConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
    """The linear warm-up's share of ``lr`` at ``step`` of ``epoch``: it rises by equal steps
    to 1 (``lr`` itself) at the last step of epoch ``warmup_epochs - 1``, and is 1 after."""
    if epoch >= config.warmup_epochs:
        return 1.0
    return (epoch * steps_per_epoch + step + 1) / (config.warmup_epochs * steps_per_epoch)


def fit(
    config: TrainConfig,
    report: ReportFn | None = None,
    *,
    dataset: Dataset | None = None,
    checkpoint_path: Path | None = None,
) -> FitResult:
    """Train ``config`` and validate after every epoch.

    ``report(epoch, metrics)`` is called after each epoch (epochs count from 0) with
    ``train_loss``, ``train_acc``, ``val_loss``, ``val_top1``, ``val_top5``, ``lr`` and
    ``epoch_seconds``; it may raise to stop training (pruning). With
    ``checkpoint_path``, the full state (model, optimizer, loss state, loader and RNG
    state, history) is saved after every epoch, and an existing checkpoint is resumed:
    the result equals that of an uninterrupted run (exactly, on the CPU). Epochs
    restored from a checkpoint are reported again, so a new trial sees all of them.
    """
    started = time.perf_counter()
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    if dataset is None:
        dataset = load_dataset(config)
    if len(dataset.train) == 0:
        raise DlopsError(
            f"the {dataset.name} training split has no images: rebuild its cache with a smaller "
            f"--val-fraction (`dlops data prepare {dataset.name} --force`)"
        )
    mean, std = dataset.channel_stats()
    model, loss_fn = build_model_and_loss(config, dataset, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = config.cudnn_benchmark
    # ``model`` stays the plain module (checkpoints, results); ``net`` runs the batches.
    net = compile_model(model) if config.compile else model
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=config.nesterov and config.momentum > 0,
    )
    train_loader = training_loader(config, dataset, loss_fn, mean, std, device)
    centroid_split: Split | None = None  # the images the centroids come from (triplet)
    if loss_fn.scored_by == "centroids":
        cap = config.centroid_images_per_class
        keep = first_per_class(dataset.train.labels, cap) if cap else np.arange(len(dataset.train))
        centroid_split = Split(np.ascontiguousarray(dataset.train.images[keep]), np.asarray(dataset.train.labels)[keep])
    history: dict[str, list[float]] = {k: [] for k in HISTORY_KEYS}
    start_epoch = 0
    # Read onto the CPU whatever the device: the RNG states (the loader's generator, torch's)
    # must stay CPU tensors, and load_state_dict moves the rest to the model's device.
    state = load_state(checkpoint_path, config, map_location="cpu")  # CorruptCheckpoint if damaged
    if state is not None:
        model.load_state_dict(state["model"])
        loss_fn.load_state_dict(state["loss"])
        optimizer.load_state_dict(state["optimizer"])
        train_loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["torch_rng"].cpu())
        history = state["history"]
        start_epoch = state["epoch"] + 1
        for epoch in range(start_epoch):
            metrics = {k: history[k][epoch] for k in history}
            if report is not None:
                report(epoch, metrics)

    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        lr = config.lr * _lr_factor(config, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        loss_fn.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        embeddings, labels = [], []
        steps_per_epoch = len(train_loader)
        for step, (x, y) in enumerate(train_loader):
            if epoch < config.warmup_epochs:
                for group in optimizer.param_groups:
                    group["lr"] = lr * warmup_factor(config, epoch, step, steps_per_epoch)
            loss, embedding, logits = train_step(net, loss_fn, optimizer, x, y, device)
            loss_sum += loss.detach() * len(y)
            seen += len(y)
            if loss_fn.scored_by == "centroids":
                embeddings.append(loss_fn.scoring_embedding(embedding.detach()))
                labels.append(y)
            else:
                correct += (logits.detach().argmax(1) == y).sum()
            check_step_loss(loss, epoch, step)
        train_loss = check_epoch_loss(float(loss_sum) / max(seen, 1), epoch, step)
        lr = optimizer.param_groups[0]["lr"]  # the epoch's lr; in a warm-up epoch, where its ramp ended
        if loss_fn.scored_by == "centroids":
            # Training accuracy: nearest-centroid top-1 of this epoch's own training
            # embeddings (train mode, as they came). The model's centroids, used for
            # validation and test, are taken in eval mode (the mode they are compared in)
            # from a fixed sample of the training images.
            emb, lab = torch.cat(embeddings), torch.cat(labels)
            train_acc = topk_correct(centroid_scores(emb, class_centroids(emb, lab, dataset.num_classes)), lab, (1,))[
                1
            ] / len(lab)
            assert centroid_split is not None  # set above for every model scored by centroids
            update_centroids(net, loss_fn, centroid_split, mean, std, device, config.eval_batch_size)
        else:
            train_acc = float(correct) / max(seen, 1)
        val = evaluate(net, loss_fn, dataset.val, mean, std, device, config.eval_batch_size)
        metrics = epoch_row(train_loss, train_acc, val, lr, time.perf_counter() - t0)
        # A loss may keep its own per-epoch figures (the triplet loss: TRIPLET_DIAGNOSTICS).
        metrics.update(loss_fn.pop_diagnostics())
        for k, v in metrics.items():
            history.setdefault(k, []).append(v)
        if checkpoint_path is not None:
            save_state(
                checkpoint_path,
                config,
                epoch,
                model=model.state_dict(),
                loss=loss_fn.state_dict(),
                optimizer=optimizer.state_dict(),
                loader=train_loader.state_dict(),
                torch_rng=torch.get_rng_state(),
                history=history,
            )
        if report is not None:
            report(epoch, metrics)

    last = {k: v[-1] for k, v in history.items() if v}
    return FitResult(
        config=config,
        history=history,
        model=model,
        loss_fn=loss_fn,
        dataset=dataset,
        device=device,
        start_epoch=start_epoch,
        seconds=time.perf_counter() - started,
        metrics=last,
        extra_user_attrs={"device": describe_device(device)},
    )


def validate_config(config: TrainConfig) -> None:
    """Reject settings no run could use, with one clear line: a null or mistyped setting, a
    name no model, loss or schedule has, a number outside what its setting means."""
    check_set_and_typed(config)
    if config.loss not in LOSSES:
        raise DlopsError(f"unknown loss {config.loss!r} (known: {', '.join(LOSSES)})")
    if config.model not in MODELS:
        raise DlopsError(f"unknown model {config.model!r} (known: {', '.join(MODELS)})")
    if config.lr_schedule not in ("cosine", "constant"):
        raise DlopsError(f"unknown lr_schedule {config.lr_schedule!r} (cosine, constant)")
    if config.triplet_mining not in TRIPLET_MINING:
        raise DlopsError(f"unknown triplet_mining {config.triplet_mining!r} ({', '.join(TRIPLET_MINING)})")
    for name in ("epochs", "batch_size", "width", "samples_per_class", "eval_batch_size"):
        check_range(config, name, 1, integer=True)
    for name in ("subset_classes", "subset_per_class", "centroid_images_per_class"):  # None: all
        check_range(config, name, 1, integer=True)
    for name in ("embedding_dim", "warmup_epochs"):  # 0: no head, no warm-up
        check_range(config, name, 0, integer=True)
    check_range(config, "seed", integer=True)
    check_range(config, "lr", 0, MAX_LR, low_open=True)
    check_range(config, "momentum", 0, 1, high_open=True)  # 1 would never forget a gradient
    check_range(config, "weight_decay", 0)
    check_range(config, "margin", 0)  # a distance (in [0, 2] between normalised embeddings)
    check_range(config, "center_lambda", 0)  # 0: plain cross-entropy
    check_range(config, "center_alpha", 0, 1)  # the share of the way to the batch means a center moves
    if LOSSES[config.loss].needs_pk and config.samples_per_class < 2:
        raise DlopsError(_ONE_PER_CLASS.format(k=config.samples_per_class, loss=config.loss))
    if config.warmup_epochs > config.epochs:
        raise DlopsError(
            f"warmup_epochs = {config.warmup_epochs} is more than the {config.epochs} epochs of the run: "
            "its lr would never reach lr"
        )


def _test_figures(
    model: nn.Module, loss_fn: Loss, dataset: Dataset, split: Split, device: torch.device, batch_size: int
) -> dict[str, Any]:
    mean, std = dataset.channel_stats()
    m = evaluate(model, loss_fn, split, mean, std, device, batch_size)
    return {"test_top1": m["top1"], "test_top5": m["top5"], "test_loss": m["loss"]}


def loss_settings(loss: str) -> set[str]:
    """The settings of :class:`TrainConfig` that the loss ``loss`` reads: its constructor's
    keywords, ``samples_per_class`` for P x K batches, ``centroid_images_per_class`` when
    scored by centroids."""
    cls = LOSSES[loss]
    read = set(inspect.signature(cls.__init__).parameters) & {f.name for f in dataclasses.fields(TrainConfig)}
    if cls.needs_pk:
        read.add("samples_per_class")
    if cls.scored_by == "centroids":
        read.add("centroid_images_per_class")
    return read


class ResNetTrainer(Trainer[TrainConfig]):
    name = "resnet18"
    config_class = TrainConfig
    metrics = HISTORY_KEYS
    title = "ResNet18"
    index_by_loss = True
    report_figures = ((resnet_report.TRIPLET_FIGURE, resnet_report.TRIPLET_CAPTION),)  # a triplet run's only

    def validate(self, config: TrainConfig) -> None:
        validate_config(config)

    def foreign_settings(self, config: TrainConfig) -> dict[str, str]:
        if config.loss not in LOSSES:
            return {}
        mine = loss_settings(config.loss)
        readers: dict[str, list[str]] = {}
        for other in LOSSES:
            for setting in loss_settings(other) - mine:
                readers.setdefault(setting, []).append(other)
        return {setting: "the " + " and ".join(losses) + " loss" for setting, losses in readers.items()}

    def fit(
        self,
        config: TrainConfig,
        report: ReportFn | None = None,
        *,
        checkpoint_path: Path | None = None,
        progress: ProgressFn | None = None,
    ) -> FitResult:
        return fit(config, report, checkpoint_path=checkpoint_path)

    def test_metrics(self, result: FitResult, split: Split) -> dict[str, Any]:
        return _test_figures(
            result.model, result.loss_fn, result.dataset, split, result.device, result.config.eval_batch_size
        )

    def weights(self, result: FitResult) -> dict[str, Any]:
        return {"model": result.model.state_dict(), "loss": result.loss_fn.state_dict()}

    def evaluate_weights(self, config: TrainConfig, saved: dict[str, Any], device: torch.device) -> dict[str, Any]:
        dataset = load_dataset(config)
        model, loss_fn = build_model_and_loss(config, dataset, device)
        model.load_state_dict(saved["model"])
        loss_fn.load_state_dict(saved["loss"])
        return _test_figures(model, loss_fn, dataset, dataset.test(), device, config.eval_batch_size)

    # ---- the written report (dlops.trainers.resnet_report)
    def final_problem(self, final: dict[str, Any]) -> str | None:
        return resnet_report.diagnostics_problem(final)

    def final_plots(self, final: dict[str, Any], out_dir: Path) -> list[Path]:
        return resnet_report.triplet_plots(final, out_dir)

    def report_tables(self, final: dict[str, Any]) -> list[Table]:
        return resnet_report.triplet_table(final)

    def figure_captions(self, final: dict[str, Any]) -> tuple[tuple[str, str], ...]:
        return self.report_figures if resnet_report.has_triplet_diagnostics(final) else ()

    def test_notes(self, final: dict[str, Any]) -> list[str]:
        return resnet_report.test_notes(final)


TRAINER = ResNetTrainer()
