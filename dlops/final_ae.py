"""The autoencoder's part of a reference run (see :mod:`dlops.final`): test accuracy,
per-class accuracy, the pretraining curves kept in ``final.json``, and the t-SNE of
the 256-unit layer ``X[3]`` for the first 500 test images of each class."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from dlops.objective import json_safe

TSNE_LAYER = 3  # X[3]: the 256-unit layer of X = [1024, 1000, 500, 256, 128, 64]
TSNE_PER_CLASS = 500


def _figures(model: Any, loss_fn: Any, dataset: Any, split: Any, device: torch.device, batch_size: int) -> dict[str, Any]:
    from dlops.ae_report import class_accuracy
    from dlops.autoencoder import predict
    from dlops.train import evaluate

    mean, std = dataset.channel_stats()
    m = evaluate(model, loss_fn, split, mean, std, device, batch_size)
    predictions = predict(model, split.images, batch_size)
    return {
        "test_accuracy": float(np.mean(predictions == np.asarray(split.labels))) if len(split) else float("nan"),
        "test_top1": m["top1"],
        "test_top5": m["top5"],
        "test_loss": m["loss"],
        "class_accuracy": class_accuracy(split.labels, predictions, dataset.class_names),
    }


def test_metrics(result: Any, split: Any) -> dict[str, Any]:
    return _figures(result.model, result.loss_fn, result.dataset, split, result.device, result.config.eval_batch_size)


def weights(result: Any) -> dict[str, Any]:
    return {"model": result.model.state_dict()}


def seed_record(result: Any) -> dict[str, Any]:
    """Pretraining curves per layer, so ``ae_losses.png`` can be redrawn from final.json."""
    return {"layer_history": json_safe(result.layer_history)}


def evaluate_weights(config: Any, saved: dict[str, Any], device: torch.device) -> dict[str, Any]:
    from dlops.autoencoder import StackedClassifier
    from dlops.losses import CrossEntropyLoss
    from dlops.train import load_dataset

    dataset = load_dataset(config)
    model = StackedClassifier(dataset.image_shape, list(config.hidden_sizes), dataset.num_classes, config.dropout)
    model.load_state_dict(saved["model"])  # includes the input normalisation buffers
    model = model.to(device).eval()
    loss_fn = CrossEntropyLoss(dataset.num_classes, model.embedding_dim)
    return _figures(model, loss_fn, dataset, dataset.test(), device, config.eval_batch_size)


def extras(result: Any, split: Any, out_dir: Path) -> list[Path]:
    """``tsne.png``: t-SNE of layer ``X[3]`` (the last hidden layer of a smaller stack)
    for the first 500 test images of each class."""
    from dlops.ae_report import layer_activations, plot_tsne, tsne_embedding, tsne_selection
    from dlops.report import save_figure

    layer = min(TSNE_LAYER, len(result.model.encoders) - 1)
    units = result.model.encoders[layer][0].out_features
    chosen = tsne_selection(split.labels, per_class=TSNE_PER_CLASS)
    features = layer_activations(result.model, np.asarray(split.images)[chosen], layer_index=layer)
    points = tsne_embedding(features, seed=result.config.seed)
    fig = plot_tsne(points, np.asarray(split.labels)[chosen], result.dataset.class_names)
    fig.axes[0].set_title(f"t-SNE of the {units}-unit layer X[{layer}]: the first {TSNE_PER_CLASS} test images "
                          f"of each class, or all it has ({len(chosen)} in all)")
    return [save_figure(fig, out_dir / "tsne.png")]
