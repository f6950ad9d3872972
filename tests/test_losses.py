"""Each loss against a naive per-sample loop: values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dlops.losses import LOSSES, BatchHardTripletLoss, CenterLoss, batch_hard_triplet_loss, pairwise_distances


def naive_batch_hard(emb: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    terms = []
    n = len(labels)
    for a in range(n):
        pos = [torch.linalg.vector_norm(emb[a] - emb[p]) for p in range(n) if p != a and labels[p] == labels[a]]
        neg = [torch.linalg.vector_norm(emb[a] - emb[q]) for q in range(n) if labels[q] != labels[a]]
        if not pos or not neg:
            continue
        terms.append(torch.clamp(margin + torch.stack(pos).max() - torch.stack(neg).min(), min=0))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_hard_triplet_matches_naive_loop(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3])  # class 3 has no positive: left out
    emb = torch.randn(len(labels), 16, generator=g, dtype=torch.float64)
    a = emb.clone().requires_grad_(True)
    b = emb.clone().requires_grad_(True)
    fast = batch_hard_triplet_loss(a, labels, margin=1.5)
    slow = naive_batch_hard(b, labels, margin=1.5)
    fast.backward()
    slow.backward()
    assert fast.item() > 0
    torch.testing.assert_close(fast, slow)
    torch.testing.assert_close(a.grad, b.grad)


def test_triplet_module_normalises_embeddings() -> None:
    g = torch.Generator().manual_seed(3)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    emb = torch.randn(6, 8, generator=g)
    loss = BatchHardTripletLoss(3, 8, margin=0.3)
    expected = naive_batch_hard(F.normalize(emb, dim=1), labels, 0.3)
    torch.testing.assert_close(loss(emb * 7.0, None, labels), expected)  # scale-free


def test_triplet_loss_is_zero_when_classes_are_separated_by_the_margin() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    emb = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.0, 5.1]])
    assert batch_hard_triplet_loss(emb, labels, margin=1.0).item() == 0.0


def test_pairwise_distances_match_cdist() -> None:
    x = torch.randn(10, 5, dtype=torch.float64)
    torch.testing.assert_close(pairwise_distances(x), torch.cdist(x, x), atol=1e-5, rtol=0)


def test_cross_entropy_matches_naive_loop() -> None:
    logits = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 4, 2, 2, 1, 3, 0])
    loss = LOSSES["ce"](5, 3)(None, logits, labels)
    naive = torch.stack([-(torch.log_softmax(logits[i], 0)[labels[i]]) for i in range(7)]).mean()
    torch.testing.assert_close(loss, naive)


def test_center_loss_value_gradient_and_update_match_naive_loop() -> None:
    g = torch.Generator().manual_seed(0)
    num_classes, dim = 4, 6
    feats = torch.randn(9, dim, generator=g, dtype=torch.float64)
    logits = torch.randn(9, num_classes, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 0, 1, 0])  # class 3 absent
    centers = torch.randn(num_classes, dim, generator=g, dtype=torch.float64)
    lam, alpha = 0.7, 0.3

    loss_fn = CenterLoss(num_classes, dim, center_lambda=lam, center_alpha=alpha).double()
    loss_fn.centers.copy_(centers)
    f = feats.clone().requires_grad_(True)
    loss = loss_fn(f, logits, labels)
    loss.backward()

    f2 = feats.clone().requires_grad_(True)
    ce = F.cross_entropy(logits, labels)
    center_term = torch.stack([((f2[i] - centers[labels[i]]) ** 2).sum() for i in range(9)]).mean()
    naive = ce + lam / 2 * center_term
    naive.backward()
    torch.testing.assert_close(loss, naive)
    torch.testing.assert_close(f.grad, f2.grad)

    # Wen et al. eq. 4, one class at a time
    expected = centers.clone()
    for j in range(num_classes):
        members = [i for i in range(9) if labels[i] == j]
        delta = sum((centers[j] - feats[i] for i in members), torch.zeros(dim, dtype=torch.float64))
        expected[j] = centers[j] - alpha * delta / (1 + len(members))
    torch.testing.assert_close(loss_fn.centers, expected)
    torch.testing.assert_close(loss_fn.centers[3], centers[3])  # absent class unchanged


def test_center_loss_centers_are_not_moved_by_sgd() -> None:
    loss_fn = CenterLoss(3, 4, center_lambda=1.0, center_alpha=0.0)
    assert list(loss_fn.parameters()) == []  # a buffer: no optimizer, no weight decay
    loss_fn.eval()  # no update in eval mode either
    before = loss_fn.centers.clone()
    loss_fn(torch.randn(5, 4), torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1]))
    torch.testing.assert_close(loss_fn.centers, before)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_registered_loss_gives_a_finite_differentiable_scalar(name: str) -> None:
    loss_fn = LOSSES[name](3, 8)
    emb = torch.randn(12, 8, requires_grad=True)
    logits = torch.randn(12, 3, requires_grad=True)
    labels = torch.arange(3).repeat_interleave(4)
    loss = loss_fn(emb, logits, labels)
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert loss_fn.scored_by in ("logits", "centroids")
