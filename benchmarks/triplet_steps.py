"""How large and how consistent the first SGD steps of each loss are, on real Tiny ImageNet
images (the subset ``losses_real.py`` uses), for a freshly initialised ResNet18 with the
settings of each loss's study spec.

Prints, for cross-entropy and the triplet loss:

- ``‖g‖/‖w‖`` per block: the gradient's norm relative to the weights' (conv and linear
  weights), summed over the first ``--batches`` real batches (P x K, as the triplet loss
  trains);
- the gradient coherence over those batches: ``‖mean g‖ / mean ‖g‖`` of the backbone's
  gradient (1: every batch points the same way; ``1/sqrt(batches)``: no common
  direction);
- the norm of all conv weights (and of the stem's) before and after ``--epochs`` epochs of
  ``fit`` at each loss's lr (cosine schedule over those epochs, seed 0).

    OMP_NUM_THREADS=1 DLOPS_HOME=$FULL python benchmarks/triplet_steps.py
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from dlops.data import get_dataset, take_subset
from dlops.losses import LOSSES
from dlops.paths import data_root
from dlops.spec import load_spec
from dlops.trainers.resnet import TrainConfig, build_model_and_loss, fit, training_loader


def block_of(name: str) -> str:
    return ".".join(name.split(".")[:3]) if name.startswith("stages") else name.split(".")[0]


def conv_norms(model: nn.Module) -> tuple[float, float]:
    """The norm of every conv weight together, and of the stem's."""
    convs = [p.detach() for p in model.parameters() if p.dim() == 4]
    return float(torch.sqrt(sum((p * p).sum() for p in convs))), float(convs[0].norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lrs", default="ce=0.02,triplet=0.1", help="each loss's lr for the epochs of fit")
    args = parser.parse_args()
    lrs = {k: float(v) for k, v in (item.split("=") for item in args.lrs.split(","))}

    dataset = take_subset(get_dataset("tiny-imagenet", data_root()), args.classes, args.per_class)
    mean, std = dataset.channel_stats()
    device = torch.device("cpu")
    ratios: dict[str, dict[str, float]] = {}
    for loss, lr in lrs.items():
        spec = load_spec(f"resnet18-{loss}")
        config: TrainConfig = spec.config(  # type: ignore[assignment]
            "tiny-imagenet",
            spec.baseline_params(),
            width=args.width,
            subset_classes=args.classes,
            subset_per_class=args.per_class,
            epochs=args.epochs,
            lr=lr,
            device="cpu",
        )
        torch.manual_seed(config.seed)
        model, loss_fn = build_model_and_loss(config, dataset, device)
        model.train()
        # fit's own P x K batches (the triplet loss's) for every loss: both see the same images.
        pk_loss = LOSSES["triplet"](dataset.num_classes, 1)
        loader = training_loader(config, dataset, pk_loss, mean, std, device)
        sums: dict[str, list[float]] = {}
        backbone = []
        for i, (x, y) in enumerate(loader):
            if i == args.batches:
                break
            model.zero_grad()
            embedding, logits = model(x)
            loss_fn(embedding, logits, y).backward()
            for name, p in model.named_parameters():
                if p.grad is None or p.dim() < 2:
                    continue
                s = sums.setdefault(block_of(name), [0.0, 0.0])
                s[0] += float((p.grad * p.grad).sum())
                s[1] += float((p.detach() * p.detach()).sum())
            backbone.append(
                torch.cat(
                    [
                        p.grad.flatten()
                        for name, p in model.named_parameters()
                        if p.grad is not None and name.startswith(("stem", "stages"))
                    ]
                )
            )
        ratios[loss] = {b: (g / w) ** 0.5 for b, (g, w) in sums.items()}
        grads = torch.stack(backbone)
        coherence = float(grads.mean(0).norm() / grads.norm(dim=1).mean())
        before = conv_norms(model)
        torch.manual_seed(config.seed)
        after = conv_norms(fit(config, dataset=dataset).model)
        print(
            f"{loss}: gradient coherence over {len(backbone)} batches {coherence:.2f} "
            f"(no common direction: {len(backbone) ** -0.5:.2f}); conv weight norm, all / stem: "
            f"{before[0]:.2f} / {before[1]:.2f} at initialisation, {after[0]:.2f} / {after[1]:.2f} after "
            f"{args.epochs} epochs at lr {lr:g}",
            flush=True,
        )

    losses = list(ratios)
    print("\n| block | " + " | ".join(f"{ln} ‖g‖/‖w‖" for ln in losses) + " | ratio |")
    print("| --- | " + " | ".join("---" for _ in losses) + " | --- |")
    for block in dict.fromkeys(b for ln in losses for b in ratios[ln]):
        values = [ratios[ln].get(block) for ln in losses]
        ratio = values[-1] / values[0] if None not in values and len(values) > 1 else None
        print(
            f"| {block} | "
            + " | ".join("" if v is None else f"{v:.2e}" for v in values)
            + f" | {'' if ratio is None else f'{ratio:.2f}'} |"
        )


if __name__ == "__main__":
    main()
