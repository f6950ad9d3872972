"""Each loss against a naive per-sample loop: values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dlops.losses import (
    LOSSES,
    TRIPLET_DIAGNOSTICS,
    BatchHardTripletLoss,
    CenterLoss,
    batch_hard_distances,
    batch_hard_triplet_loss,
    batch_weighted_distances,
    pairwise_distances,
)


def naive_anchor_distances(emb: torch.Tensor, labels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each anchor's distances to its positives and to its negatives, one anchor at a time,
    for every anchor that has both."""
    out = []
    n = len(labels)
    for a in range(n):
        pos = [torch.linalg.vector_norm(emb[a] - emb[p]) for p in range(n) if p != a and labels[p] == labels[a]]
        neg = [torch.linalg.vector_norm(emb[a] - emb[q]) for q in range(n) if labels[q] != labels[a]]
        if pos and neg:
            out.append((torch.stack(pos), torch.stack(neg)))
    return out


def naive_hardest(emb: torch.Tensor, labels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(farthest positive, nearest negative) distance of every anchor that has both."""
    return [(dp.max(), dn.min()) for dp, dn in naive_anchor_distances(emb, labels)]


def naive_batch_hard(emb: torch.Tensor, labels: torch.Tensor, margin: float, soft: bool = False) -> torch.Tensor:
    terms = []
    for d_ap, d_an in naive_hardest(emb, labels):
        terms.append(torch.log1p(torch.exp(d_ap - d_an)) if soft else torch.clamp(margin + d_ap - d_an, min=0))
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


@pytest.mark.parametrize("seed", [0, 1])
def test_soft_margin_batch_hard_triplet_matches_naive_loop(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3])
    emb = torch.randn(len(labels), 16, generator=g, dtype=torch.float64)
    a = emb.clone().requires_grad_(True)
    b = emb.clone().requires_grad_(True)
    fast = batch_hard_triplet_loss(a, labels, margin=123.0, soft=True)  # the soft margin has no margin
    slow = naive_batch_hard(b, labels, margin=0.0, soft=True)
    fast.backward()
    slow.backward()
    torch.testing.assert_close(fast, slow)
    torch.testing.assert_close(a.grad, b.grad)


def naive_weighted(emb: torch.Tensor, labels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(softmax(d)-weighted positive, softmax(-d)-weighted negative) distance of every
    anchor that has both (Ristani & Tomasi 2018)."""
    out = []
    for dp, dn in naive_anchor_distances(emb, labels):
        wp, wn = torch.exp(dp) / torch.exp(dp).sum(), torch.exp(-dn) / torch.exp(-dn).sum()
        out.append(((wp * dp).sum(), (wn * dn).sum()))
    return out


@pytest.mark.parametrize("soft", [False, True])
def test_weighted_mining_matches_naive_loop(soft: bool) -> None:
    g = torch.Generator().manual_seed(4)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3])  # class 3 has no positive: left out
    emb = torch.randn(len(labels), 16, generator=g, dtype=torch.float64)
    a = emb.clone().requires_grad_(True)
    b = emb.clone().requires_grad_(True)
    fast = batch_hard_triplet_loss(a, labels, margin=1.5, soft=soft, mining="weighted")
    terms = [
        torch.log1p(torch.exp(ap - an)) if soft else torch.clamp(1.5 + ap - an, min=0)
        for ap, an in naive_weighted(b, labels)
    ]
    slow = torch.stack(terms).mean()
    fast.backward()
    slow.backward()
    torch.testing.assert_close(fast, slow)
    torch.testing.assert_close(a.grad, b.grad)  # the weights are differentiated through, too
    # Unlike batch-hard, every positive and every negative of an anchor gets a gradient.
    for mine, moved in ((batch_hard_distances, 2), (batch_weighted_distances, 1 + 6)):
        x = emb.clone().requires_grad_(True)
        mine(x, labels)[1][0].backward()  # anchor 0's negative term: itself and its negatives
        assert int((x.grad.abs().sum(1) > 0).sum()) == moved
    d_ap, d_an, valid = batch_weighted_distances(emb, labels)
    pairs = naive_hardest(emb, labels)
    assert valid.tolist() == [True] * 8 + [False]
    # A softmax-weighted mean lies between the nearest and the farthest: at most the hardest.
    assert all(float(d_ap[i]) <= float(ap) and float(d_an[i]) >= float(an) for i, (ap, an) in enumerate(pairs))


def test_soft_margin_keeps_a_gradient_for_satisfied_triplets() -> None:
    # Classes far apart: the hinge is zero and flat; the soft margin still pulls.
    labels = torch.tensor([0, 0, 1, 1])
    emb = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.0, 5.1]], requires_grad=True)
    loss = batch_hard_triplet_loss(emb, labels, margin=1.0, soft=True)
    loss.backward()
    assert 0 < loss.item() < 0.01 and emb.grad.abs().sum() > 0


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_triplet_diagnostics_match_naive_loop(soft: bool, normalize: bool) -> None:
    g = torch.Generator().manual_seed(5)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3])  # class 3: no positive, left out
    batches = [torch.randn(len(labels), 6, generator=g, dtype=torch.float64) * 3 for _ in range(2)]
    margin = 0.4
    loss = BatchHardTripletLoss(4, 6, margin=margin, triplet_soft=soft, normalize_embedding=normalize)
    loss.train()
    expected = {k: 0.0 for k in TRIPLET_DIAGNOSTICS}
    for emb in batches:
        value = loss(emb, None, labels)
        seen = F.normalize(emb, dim=1) if normalize else emb
        torch.testing.assert_close(value, naive_batch_hard(seen, labels, margin, soft))
        pairs = naive_hardest(seen, labels)
        live = 0.0 if soft else margin
        expected["triplet_violated"] += sum(float(ap + live >= an) for ap, an in pairs) / len(pairs) / len(batches)
        expected["triplet_pos_dist"] += sum(float(ap) for ap, _ in pairs) / len(pairs) / len(batches)
        expected["triplet_neg_dist"] += sum(float(an) for _, an in pairs) / len(pairs) / len(batches)
        expected["embedding_norm"] += float(emb.norm(dim=1).mean()) / len(batches)
    loss.eval()
    loss(batches[0] * 10, None, labels)  # evaluation calls add nothing
    got = loss.pop_diagnostics()
    assert got == pytest.approx(expected)
    assert all(v != v for v in loss.pop_diagnostics().values())  # reset: NaN until the next batch


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


def test_center_loss_validation_sum_is_the_training_objective_and_moves_no_center() -> None:
    """A center-loss run's val_loss is what its train_loss is (cross-entropy plus the
    center term), not cross-entropy alone; and validating never moves a center."""
    g = torch.Generator().manual_seed(1)
    feats, logits = torch.randn(7, 5, generator=g), torch.randn(7, 3, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    loss_fn = CenterLoss(3, 5, center_lambda=0.4, center_alpha=0.5)
    loss_fn.centers.copy_(torch.randn(3, 5, generator=g))
    before = loss_fn.centers.clone()
    got = loss_fn.validation_loss_sum(feats, logits, labels)
    torch.testing.assert_close(loss_fn.centers, before)  # still in training mode, and no update
    naive = sum(
        F.cross_entropy(logits[i : i + 1], labels[i : i + 1]) + 0.2 * ((feats[i] - before[labels[i]]) ** 2).sum()
        for i in range(7)
    )
    torch.testing.assert_close(got, naive)
    assert float(got) > float(F.cross_entropy(logits, labels, reduction="sum")) + 1.0
    ce = LOSSES["ce"](3, 5)
    torch.testing.assert_close(
        ce.validation_loss_sum(feats, logits, labels), F.cross_entropy(logits, labels, reduction="sum")
    )


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
