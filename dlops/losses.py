"""The three losses of the ResNet18 studies, as modules ``loss(embedding, logits, labels)``.

``LOSSES`` maps the name used in specs and on the command line to the class. Each
class says how its model is scored (``scored_by``: ``"logits"`` or ``"centroids"``)
and whether it needs P x K batches (``needs_pk``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 activations (CUDA autocast) are upcast; fp32/fp64 pass unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class Loss(nn.Module):
    """What every loss declares: how its model is scored, whether it needs P x K batches,
    the embedding it scores, and its per-epoch diagnostics (none by default)."""

    scored_by: ClassVar[str] = "logits"  # or "centroids": nearest class centroid in scoring_embedding space
    needs_pk: ClassVar[bool] = False

    def scoring_embedding(self, embedding: torch.Tensor) -> torch.Tensor:
        return embedding

    def pop_diagnostics(self) -> dict[str, float]:
        """This loss's own per-epoch figures since the last call (none by default)."""
        return {}

    def validation_loss_sum(self, embedding: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training objective summed over a validation batch, with no side effect (no
        center moves): softmax cross-entropy by default. Only for losses scored by logits."""
        return F.cross_entropy(at_least_fp32(logits), labels, reduction="sum")


class CrossEntropyLoss(Loss):
    """Softmax cross-entropy on the logits, averaged over the batch."""

    def __init__(self, num_classes: int, embedding_dim: int, **_: float):
        super().__init__()

    def forward(self, embedding: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(at_least_fp32(logits), labels)


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distance matrix of the rows of ``x`` from one matrix product.

    Squared distances are clamped at 1e-12 before the square root so that the zero
    diagonal has a finite gradient.
    """
    sq = (x * x).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    return d2.clamp_min(1e-12).sqrt()


def _distances_and_pairs(
    embedding: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distance matrix of a batch's embeddings, and which pairs are positives (same
    label, not the anchor itself) and negatives."""
    d = pairwise_distances(at_least_fp32(embedding))
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return d, same & ~eye, ~same


def batch_hard_distances(
    embedding: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch-hard mining (Hermans, Beyer & Leibe 2017): for every anchor, ``d_ap`` = the
    distance to its farthest positive (same label, not itself), ``d_an`` = the distance to
    its nearest negative, and ``valid`` = whether it has at least one of each."""
    d, pos_mask, neg_mask = _distances_and_pairs(embedding, labels)
    d_ap = torch.where(pos_mask, d, torch.zeros_like(d)).amax(1)
    d_an = torch.where(neg_mask, d, torch.full_like(d, float("inf"))).amin(1)
    return d_ap, d_an, pos_mask.any(1) & neg_mask.any(1)


def batch_weighted_distances(
    embedding: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softly weighted batch-hard mining (Ristani & Tomasi 2018, "adaptive weights"): for
    every anchor, ``d_ap`` = the mean of its positives' distances weighted by
    ``softmax(d)`` over the positives, ``d_an`` = the mean of its negatives' distances
    weighted by ``softmax(-d)`` over the negatives. The farthest positive and the nearest
    negative weigh most, as in batch-hard mining, but every pair gets a share of the
    gradient (the weights are differentiated through, as in their formulation).
    ``valid`` as in :func:`batch_hard_distances`."""
    d, pos_mask, neg_mask = _distances_and_pairs(embedding, labels)
    w_p = torch.softmax(d.masked_fill(~pos_mask, float("-inf")), dim=1).nan_to_num(0.0)
    w_n = torch.softmax((-d).masked_fill(~neg_mask, float("-inf")), dim=1).nan_to_num(0.0)
    return (w_p * d).sum(1), (w_n * d).sum(1), pos_mask.any(1) & neg_mask.any(1)


TRIPLET_MINING = {"hard": batch_hard_distances, "weighted": batch_weighted_distances}
"""The triplet loss's mining, by the values ``triplet_mining`` takes: each gives every anchor's
``(d_ap, d_an, valid)``."""


def batch_hard_triplet_loss(
    embedding: torch.Tensor, labels: torch.Tensor, margin: float, soft: bool = False, mining: str = "hard"
) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans, Beyer & Leibe 2017, eq. 5).

    For every anchor ``a`` of the batch: ``d_ap`` = distance to its farthest positive
    (same label, not ``a`` itself), ``d_an`` = distance to its nearest negative; the loss
    is the mean over anchors of ``max(0, margin + d_ap - d_an)`` (the hinge), or with
    ``soft`` of ``softplus(d_ap - d_an) = log(1 + exp(d_ap - d_an))`` (their soft margin,
    which has no margin: ``margin`` is ignored). With ``mining="weighted"`` the two
    distances are softmax-weighted means over all positives and negatives instead
    (:func:`batch_weighted_distances`). Anchors with no positive or no negative
    in the batch are left out. Distances are Euclidean on the embeddings exactly as given
    (this function does not normalise them).
    """
    d_ap, d_an, valid = TRIPLET_MINING[mining](embedding, labels)
    if not bool(valid.any()):
        return embedding.sum() * 0.0
    gap = d_ap - d_an
    per_anchor = F.softplus(gap) if soft else F.relu(margin + gap)
    return per_anchor[valid].mean()


TRIPLET_DIAGNOSTICS = ("triplet_violated", "triplet_pos_dist", "triplet_neg_dist", "embedding_norm")
"""Per-epoch means over the training batches, in a triplet run's history, always of
batch-hard mining (with ``triplet_mining = "weighted"`` too, so runs compare on one
yardstick): the fraction of anchors whose batch-hard triplet is violated (hinge: ``d_ap + margin >= d_an``; soft
margin: ``d_ap >= d_an``; ties count, so a collapsed embedding, all distances 0, reads
1.0), the hardest-positive and hardest-negative distances (in the space the loss sees),
and the norm of the embedding before normalisation."""


class BatchHardTripletLoss(Loss):
    """Batch-hard triplet loss, by default on L2-normalised embeddings (distances lie in
    [0, 2], so the margin is on that scale). ``triplet_soft`` swaps the hinge for the soft
    margin (then ``margin`` plays no part); ``triplet_mining = "weighted"`` softens the
    mining (:data:`TRIPLET_MINING`). Needs P x K batches. The model has no
    classifier: it is scored by its nearest class centroids in the space the loss sees.

    In training mode every call also adds the batch's diagnostics (``TRIPLET_DIAGNOSTICS``)
    to running sums kept on the embedding's device, so they cost no host sync per step;
    ``pop_diagnostics()`` returns the means since the last pop and resets them.
    """

    scored_by = "centroids"
    needs_pk = True

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        margin: float = 0.2,
        triplet_soft: bool = False,
        normalize_embedding: bool = True,
        triplet_mining: str = "hard",
        **_: float,
    ):
        super().__init__()
        if triplet_mining not in TRIPLET_MINING:
            raise ValueError(f"unknown triplet_mining {triplet_mining!r} ({', '.join(TRIPLET_MINING)})")
        self.mining = triplet_mining
        self.margin = margin
        self.soft = bool(triplet_soft)
        self.normalize = bool(normalize_embedding)
        self._diag_sum: torch.Tensor | None = None
        self._diag_batches = 0

    def forward(self, embedding: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        e = self.scoring_embedding(embedding)
        if self.training:
            self._add_diagnostics(embedding, e, labels)
        return batch_hard_triplet_loss(e, labels, self.margin, soft=self.soft, mining=self.mining)

    def scoring_embedding(self, embedding: torch.Tensor) -> torch.Tensor:
        e = at_least_fp32(embedding)
        return F.normalize(e, dim=1) if self.normalize else e

    @torch.no_grad()
    def _add_diagnostics(self, raw: torch.Tensor, e: torch.Tensor, labels: torch.Tensor) -> None:
        # Mining again under no_grad costs one small B x B matrix; it keeps the loss
        # function itself the plain, naive-loop-tested formula.
        d_ap, d_an, valid = batch_hard_distances(e.detach(), labels)
        w = valid.to(e.dtype)
        n = w.sum().clamp_min(1.0)
        live_margin = 0.0 if self.soft else self.margin
        row = torch.stack(
            [
                (((d_ap + live_margin) >= d_an).to(e.dtype) * w).sum() / n,
                (d_ap * w).sum() / n,
                (torch.where(valid, d_an, torch.zeros_like(d_an))).sum() / n,
                torch.linalg.vector_norm(at_least_fp32(raw.detach()), dim=1).mean(),
            ]
        )
        self._diag_sum = row if self._diag_sum is None else self._diag_sum + row
        self._diag_batches += 1

    def pop_diagnostics(self) -> dict[str, float]:
        """Means of ``TRIPLET_DIAGNOSTICS`` over the training batches since the last pop
        (NaN where there were none); resets the sums."""
        if self._diag_sum is None:
            values = [float("nan")] * len(TRIPLET_DIAGNOSTICS)
        else:
            values = (self._diag_sum / self._diag_batches).tolist()
        self._diag_sum, self._diag_batches = None, 0
        return dict(zip(TRIPLET_DIAGNOSTICS, values, strict=True))


class CenterLoss(Loss):
    """Softmax cross-entropy plus center loss (Wen et al. 2016)::

        L = CE(logits, y) + lambda / 2 * mean_i ||f_i - c_{y_i}||^2

    ``f_i`` is the pooled embedding. The centers ``c_j`` are a buffer, not parameters:
    the main SGD (its learning rate, momentum and weight decay) never touches them.
    After computing the loss of a training batch they move toward the batch's class
    means (Wen et al., eq. 4)::

        delta_j = sum_{i: y_i = j} (c_j - f_i) / (1 + n_j)      n_j = #{i: y_i = j}
        c_j    <- c_j - alpha * delta_j

    Classes absent from the batch keep their center. Centers start at zero.
    """

    centers: torch.Tensor  # a buffer: saved with the model, not a parameter

    def __init__(
        self, num_classes: int, embedding_dim: int, center_lambda: float = 0.003, center_alpha: float = 0.5, **_: float
    ):
        super().__init__()
        self.center_lambda = center_lambda
        self.center_alpha = center_alpha
        self.register_buffer("centers", torch.zeros(num_classes, embedding_dim))

    def _center_distances(self, f: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """||f_i - c_{y_i}||^2 for every row of ``f``."""
        return ((f - self.centers[labels]) ** 2).sum(1)

    def forward(self, embedding: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        f = at_least_fp32(embedding)
        center_term = self._center_distances(f, labels).mean()
        loss = F.cross_entropy(at_least_fp32(logits), labels) + 0.5 * self.center_lambda * center_term
        if self.training:
            self.update_centers(f.detach(), labels)
        return loss

    def validation_loss_sum(self, embedding: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy plus the center term, as in training, summed; the centers stay put."""
        center_term = self._center_distances(at_least_fp32(embedding), labels).sum()
        return super().validation_loss_sum(embedding, logits, labels) + 0.5 * self.center_lambda * center_term

    @torch.no_grad()
    def update_centers(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        counts = torch.bincount(labels, minlength=self.centers.shape[0]).to(features.dtype)
        sums = torch.zeros_like(self.centers).index_add_(0, labels, features)
        delta = (counts[:, None] * self.centers - sums) / (1.0 + counts[:, None])
        self.centers -= self.center_alpha * delta


LOSSES: dict[str, type[Loss]] = {
    "ce": CrossEntropyLoss,
    "triplet": BatchHardTripletLoss,
    "center": CenterLoss,
}
