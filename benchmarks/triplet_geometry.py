"""Where batch-hard triplets start: the geometry of a freshly initialised ResNet18's
embeddings on real Tiny ImageNet images, for each embedding head.

One P x K training batch (20 classes x 6 images of the subset ``losses_real.py`` uses),
forward only, in training mode (as the loss sees it). Prints, per head, the mean
cosine similarity of two different images' embeddings, and the batch-hard figures of
the triplet diagnostics on L2-normalised embeddings (violated fraction with margin
0.2, hardest-positive and hardest-negative distances). Several seeds, averaged.

    OMP_NUM_THREADS=1 DLOPS_HOME=$FULL python benchmarks/triplet_geometry.py
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from dlops.data import get_dataset, take_subset
from dlops.data.loader import BatchLoader
from dlops.losses import batch_hard_distances
from dlops.models import ResNet18
from dlops.paths import data_root

HEADS = {
    "pooled (after the last ReLU)": dict(),
    "linear 128": dict(embedding_dim=128),
    "BatchNorm on pooled": dict(embedding_bn=True),
    "linear 128 + BatchNorm": dict(embedding_dim=128, embedding_bn=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    dataset = take_subset(get_dataset("tiny-imagenet", data_root()), args.classes, args.per_class)
    mean, std = dataset.channel_stats()
    loader = BatchLoader(dataset.train, 120, mean, std, "cpu", shuffle=True, augment=True, pk=(args.classes, 6))
    x, y = next(iter(loader))
    print(
        "| head | mean cosine of two images | violated (margin 0.2) | hardest-positive dist | hardest-negative dist |"
    )
    print("| --- | --- | --- | --- | --- |")
    for name, kw in HEADS.items():
        figures = torch.zeros(4)
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            model = ResNet18(dataset.num_classes, width=args.width, **kw).train()
            with torch.no_grad():
                e = F.normalize(model(x)[0], dim=1)
            cos = e @ e.T
            off = ~torch.eye(len(y), dtype=torch.bool)
            d_ap, d_an, _ = batch_hard_distances(e, y)
            figures += torch.stack([cos[off].mean(), (d_ap + 0.2 > d_an).float().mean(), d_ap.mean(), d_an.mean()])
        c, v, p, n = (figures / args.seeds).tolist()
        print(f"| {name} | {c:.3f} | {v:.3f} | {p:.3f} | {n:.3f} |", flush=True)


if __name__ == "__main__":
    main()
