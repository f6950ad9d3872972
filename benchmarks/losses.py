"""Training-step time of triplet and center loss relative to cross-entropy.

Same ResNet18, same batch size, same device; the batch is synthetic (random images,
P x K labels so that batch-hard mining has positives and negatives). A step is
forward + loss + backward + SGD step. The three losses are timed in interleaved
rounds so that machine noise hits them alike; the figure is the median step time.
Then one real epoch per loss on digits (``dlops.trainers.resnet.fit``) checks that the
``epoch_seconds`` of a run's history agree.

    python benchmarks/losses.py                 # CPU defaults: 32x32 images, batch 64
    python benchmarks/losses.py --device cuda --image-size 64 --batch-size 128
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dlops.losses import LOSSES
from dlops.models import ResNet18
from dlops.trainers.base import resolve_device
from dlops.trainers.resnet import TrainConfig, fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per loss per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-epoch", action="store_true", help="skip the digits epoch check")
    args = parser.parse_args()

    device = resolve_device(args.device)
    torch.manual_seed(0)
    k = 4
    p = args.batch_size // k
    x = torch.randn(p * k, 3, args.image_size, args.image_size, device=device)
    y = torch.arange(p, device=device).repeat_interleave(k)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)

    setups = {}
    for name in ("ce", "triplet", "center"):
        model = ResNet18(args.classes, 3, args.width).to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        loss_fn = LOSSES[name](args.classes, model.embedding_dim).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
        setups[name] = (model, loss_fn, opt)

    def step(name: str) -> None:
        model, loss_fn, opt = setups[name]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            emb, logits = model(x)
        loss = loss_fn(emb, logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for name in setups:  # warm-up
        for _ in range(2):
            step(name)
    times: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(args.rounds):
        for name in setups:
            for _ in range(args.steps):
                sync()
                t0 = time.perf_counter()
                step(name)
                sync()
                times[name].append(time.perf_counter() - t0)

    print(
        f"device {device}, ResNet18 width {args.width}, batch {p * k} (P={p} x K={k}), "
        f"{args.image_size}x{args.image_size}, {args.classes} classes, "
        f"{args.rounds * args.steps} steps per loss"
    )
    base = statistics.median(times["ce"])
    print(f"{'loss':<8} {'median step (ms)':>17} {'vs ce':>7}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<8} {med * 1e3:>17.1f} {med / base:>7.3f}x")

    if not args.skip_epoch:
        print("\none epoch on digits (ResNet18 width 16, batch 128), epoch_seconds from the run's history:")
        secs = {}
        for name in ("ce", "triplet", "center"):
            cfg = TrainConfig(
                loss=name,
                dataset="digits",
                epochs=1,
                width=16,
                batch_size=128,
                lr=0.02,
                device=str(device),
                augment=True,
            )
            fit(cfg)  # warm-up (allocator, caches)
            secs[name] = fit(cfg).history["epoch_seconds"][0]
        for name, s in secs.items():
            print(f"{name:<8} {s:>8.2f} s {s / secs['ce']:>7.3f}x")


if __name__ == "__main__":
    main()
