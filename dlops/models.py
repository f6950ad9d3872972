"""ResNet18 as in the original report: 3x3 stem conv + BN + ReLU (no max-pool), four
stages of two BasicBlocks, global average pooling, linear head.

``forward`` returns ``(embedding, logits)``: the embedding feeds metric losses, the
logits (a linear layer on the embedding) feed cross-entropy. By default the embedding
is the pooled 512-d feature (``8 * width`` in general), which comes after a ReLU and so
is non-negative. With ``embedding_dim > 0`` a linear head maps the pooled feature to
an ``embedding_dim``-d embedding (Hermans et al. 2017 put such a head on their backbone
for the triplet loss); ``embedding_bn`` adds BatchNorm on the embedding. The triplet
study needs the BatchNorm, not just the head: pooled features share a large common
component (two images' L2-normalised embeddings have cosine 0.94 at initialisation, a
linear head keeps it), and BatchNorm removes it (benchmarks/triplet_geometry.py).
``width`` is the number of channels of the first stage (64 in ResNet18); smaller widths
keep the same architecture for quick tests.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        width: int = 64,
        embedding_dim: int = 0,
        embedding_bn: bool = False,
    ):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        stages, in_planes = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            planes = width * 2**i
            stages.append(nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)))
            in_planes = planes
        self.stages = nn.Sequential(*stages)
        self.embedding_dim = embedding_dim if embedding_dim > 0 else in_planes
        head: list[nn.Module] = []
        if embedding_dim > 0:
            head.append(nn.Linear(in_planes, embedding_dim, bias=not embedding_bn))
        if embedding_bn:
            head.append(nn.BatchNorm1d(self.embedding_dim))
        self.head = nn.Sequential(*head)  # empty: the identity
        self.fc = nn.Linear(self.embedding_dim, num_classes)
        # Class centroids in embedding space, for models scored by nearest centroid
        # (triplet loss). A buffer, so checkpoints carry them.
        self.centroids: torch.Tensor
        self.register_buffer("centroids", torch.zeros(num_classes, self.embedding_dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedding, logits), both float32 even under autocast: the convolutions run in
        its low precision, the embedding head and the classifier (a few thousand of the
        network's FLOPs per image) in float32, so nearest-centroid distances, the triplet
        mining and the 5th and 6th scores of top-5 are not rounded to bfloat16's 3 digits."""
        features = self.stages(self.stem(x))
        pooled = torch.flatten(F.adaptive_avg_pool2d(features, 1), 1)
        with torch.autocast(pooled.device.type, enabled=False):
            embedding = self.head(pooled.float())
            return embedding, self.fc(embedding)


MODELS: dict[str, Callable[..., nn.Module]] = {"resnet18": ResNet18}
