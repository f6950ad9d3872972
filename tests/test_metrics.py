import torch

from dlops.metrics import centroid_scores, class_centroids, topk_accuracy, topk_correct


def test_topk_from_logits_on_a_hand_made_case() -> None:
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # label 0: top-1 hit
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # label 1: rank 5 -> top-5 hit only
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # label 0: rank 6 -> miss
            [0.0, 0.0, 0.0, 1.0, 0.0, 0.0],  # label 3: top-1 hit
        ]
    )
    labels = torch.tensor([0, 1, 0, 3])
    assert topk_correct(scores, labels) == {1: 2, 5: 3}
    assert topk_accuracy(scores, labels) == {1: 0.5, 5: 0.75}


def test_topk_with_fewer_classes_than_k_counts_everything() -> None:
    scores = torch.tensor([[0.2, 0.8], [0.6, 0.4]])
    assert topk_correct(scores, torch.tensor([0, 1])) == {1: 0, 5: 2}


def test_class_centroids_are_class_means() -> None:
    emb = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0], [5.0, 5.0]])
    labels = torch.tensor([0, 0, 1, 2])
    c = class_centroids(emb, labels, 4)
    torch.testing.assert_close(c, torch.tensor([[1.0, 0.0], [10.0, 10.0], [5.0, 5.0], [0.0, 0.0]]))


def test_top5_from_nearest_centroids() -> None:
    # Six centroids on a line; the query sits at 2.2, so nearest first: 2, 3, 1, 4, 0, 5.
    centroids = torch.tensor([[float(i), 0.0] for i in range(6)])
    query = torch.tensor([[2.2, 0.0], [2.2, 0.0], [2.2, 0.0]])
    labels = torch.tensor([2, 0, 5])
    scores = centroid_scores(query, centroids)
    assert scores.argsort(1, descending=True)[0].tolist() == [2, 3, 1, 4, 0, 5]
    assert topk_correct(scores, labels) == {1: 1, 5: 2}
