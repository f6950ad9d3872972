"""What a ResNet18 reference run's report says beyond the generic test table and curves,
from its ``final.json`` alone: how its test figures were scored and what its test loss
adds up, which differ between the losses, and, for the triplet loss, its diagnostics per
epoch (:data:`dlops.losses.TRIPLET_DIAGNOSTICS`) as a figure and a table."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dlops.losses import TRIPLET_DIAGNOSTICS
from dlops.trainers.base import Table

TRIPLET_FIGURE = "triplet.png"
TRIPLET_CAPTION = (
    "triplet diagnostics per epoch (means over the training batches): the share of anchors whose "
    "batch-hard triplet is violated, the hardest-positive and hardest-negative distances, the "
    "embedding norm before normalisation"
)


def _config(final: dict[str, Any]) -> dict[str, Any]:
    config = final.get("config")
    return config if isinstance(config, dict) else {}


def has_triplet_diagnostics(final: dict[str, Any]) -> bool:
    """Whether the run's seeds recorded the triplet diagnostics (a triplet run does)."""
    return any("triplet_violated" in (seed.get("history") or {}) for seed in final.get("per_seed") or ())


def diagnostics_problem(final: dict[str, Any]) -> str | None:
    """A triplet diagnostic that is not a list of numbers or null, named, or None."""
    for i, seed in enumerate(final.get("per_seed") or ()):
        history = seed.get("history") or {}
        for key in TRIPLET_DIAGNOSTICS:
            values = history.get(key)
            if values is None:
                continue
            numbers = isinstance(values, list) and all(
                v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values
            )
            if not numbers:
                return f"per_seed[{i}].history.{key} is not a list of numbers or null"
    return None


def triplet_plots(final: dict[str, Any], out_dir: Path) -> list[Path]:
    """``triplet.png`` where the run recorded the triplet diagnostics."""
    if not has_triplet_diagnostics(final):
        return []
    from dlops import plots

    histories = [seed["history"] for seed in final["per_seed"]]
    title = f"{final['spec']}: triplet diagnostics on the training batches"
    return [plots.save_figure(plots.plot_triplet_diagnostics(histories, title), out_dir / TRIPLET_FIGURE)]


def _cell(value: Any, fmt: str) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return format(value, fmt)
    return "–"


def triplet_table(final: dict[str, Any]) -> list[Table]:
    """Each seed's diagnostics after its last epoch."""
    if not has_triplet_diagnostics(final):
        return []
    rows = []
    for seed in final["per_seed"]:
        history = seed.get("history") or {}
        last = {key: (history.get(key) or [None])[-1] for key in TRIPLET_DIAGNOSTICS}
        rows.append(
            (
                str(seed.get("seed", "?")),
                _cell(last["triplet_violated"], ".3f"),
                _cell(last["triplet_pos_dist"], ".3f"),
                _cell(last["triplet_neg_dist"], ".3f"),
                _cell(last["embedding_norm"], ".2f"),
            )
        )
    return [
        Table(
            "Triplet diagnostics after the last epoch (training batches)",
            ("seed", "violated", "hardest positive d(a,p)", "hardest negative d(a,n)", "embedding norm"),
            tuple(rows),
        )
    ]


def test_notes(final: dict[str, Any]) -> list[str]:
    """How the run's test figures were scored and what its test loss is, by loss."""
    config = _config(final)
    loss = config.get("loss")
    if loss == "triplet":
        cap = config.get("centroid_images_per_class")
        per_class = (
            f"its first {cap} training images (all of them where it has fewer)" if cap else "all its training images"
        )
        margin = (
            "soft margin"
            if config.get("triplet_soft")
            else f"hinge, margin {config['margin']:.4g}"
            if isinstance(config.get("margin"), (int, float))
            else "hinge"
        )
        embedding = "L2-normalised embedding" if config.get("normalize_embedding", True) else "embedding"
        mining = (
            "Batch-hard triplet loss with softmax-weighted mining"
            if config.get("triplet_mining") == "weighted"
            else "Batch-hard triplet loss"
        )
        return [
            f"{mining} ({margin}): the model has no classifier. Its test top-1 and top-5 rank "
            f"the classes by the distance of a test image's {embedding} to each class centroid, the "
            f"mean embedding of {per_class}, taken after the last epoch. It has no test loss "
            "(–). The training accuracy in the curves is the nearest-centroid top-1 of each epoch's own "
            "training embeddings."
        ]
    if loss == "center":
        lam = config.get("center_lambda")
        weight = f"center_lambda = {lam:.4g}" if isinstance(lam, (int, float)) else "center_lambda"
        return [
            "test_loss is the training objective: cross-entropy plus center_lambda / 2 × the mean squared "
            f"distance of an image's feature to its class center ({weight}). It is larger than the plain "
            "cross-entropy of a `ce` run with the same predictions: compare the losses by top-1 and top-5."
        ]
    if loss == "ce":
        return ["test_loss is the softmax cross-entropy."]
    return []
