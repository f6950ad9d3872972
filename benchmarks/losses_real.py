"""The three losses on a real Tiny ImageNet subset at one budget: test top-1/top-5.

Each run is ``dlops.trainers.resnet.fit`` (ResNet18, SGD momentum 0.9, cosine schedule, seed 0)
on the first ``--classes`` classes and the first ``--per-class`` training images of
each, validated on the hold-out, then tested once on the official val images of
those classes. Every loss gets the same epochs, batch size and width and the same
small lr sweep; every other setting comes from the loss's study spec
(``study/resnet18-LOSS.toml``: its ``[train]`` and ``[baseline]``, e.g. the triplet
embedding head and margin, the center-loss lambda and alpha). A table goes to stdout
and every run (config, history, test figures, seconds) to ``--out`` as JSON.

    OMP_NUM_THREADS=1 DLOPS_HOME=$FULL \\
        python benchmarks/losses_real.py --losses ce,center,triplet --lrs 0.02,0.05,0.1
    # the old triplet model, for the diagnosis:
    python benchmarks/losses_real.py --losses triplet --lrs 0.05 --set embedding_dim=0 --set embedding_bn=false

``--set KEY=VALUE`` overrides a ``TrainConfig`` field for every run (repeatable); a
``KEY@LOSS=VALUE`` form applies only to that loss.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from dlops.data import get_dataset, take_subset
from dlops.paths import data_root
from dlops.spec import load_spec
from dlops.trainers.resnet import TrainConfig, evaluate, fit

CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}  # what --set may change


def parse_value(key: str, text: str) -> Any:
    field = CONFIG_FIELDS[key]
    default = field.default
    if text.lower() == "none" and "None" in str(field.type):  # an optional setting: int | None, str | None
        return None
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise SystemExit(f"--set {key}: expected true or false, got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(default, int):
        return int(text)
    if isinstance(default, float):
        return float(text)
    return text


def parse_sets(items: list[str]) -> dict[str | None, dict[str, Any]]:
    """``{None: overrides for every loss, loss: overrides for that loss}``."""
    out: dict[str | None, dict[str, Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        key, _, loss = key.partition("@")
        if key not in CONFIG_FIELDS:
            raise SystemExit(f"--set {key}: not a TrainConfig field")
        out.setdefault(loss or None, {})[key] = parse_value(key, text)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--losses", default="ce,center,triplet")
    parser.add_argument(
        "--lrs", default="0.02,0.05,0.1", help="comma-separated learning rates, each run for every loss"
    )
    parser.add_argument("--dataset", default="tiny-imagenet", help="tiny-imagenet; digits for quick screens")
    parser.add_argument("--classes", type=int, default=20, help="first N classes (0: all)")
    parser.add_argument("--per-class", type=int, default=100, help="first M training images per class (0: all)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", action="append", default=[], metavar="KEY[@LOSS]=VALUE")
    parser.add_argument("--tag", default="", help="a label for this invocation's rows")
    parser.add_argument("--out", default="benchmarks/results/losses_real.json", help="JSON file; runs are appended")
    args = parser.parse_args()

    sets = parse_sets(args.set)
    root = data_root()
    classes, per_class = args.classes or None, args.per_class or None
    dataset = take_subset(get_dataset(args.dataset, root), classes, per_class)
    test = dataset.test()
    mean, std = dataset.channel_stats()
    print(
        f"{args.dataset} at {root}: {dataset.num_classes} classes, train {len(dataset.train)}, val {len(dataset.val)}, "
        f"test {len(test)}; {args.epochs} epochs, width {args.width}, batch {args.batch_size}, "
        f"threads {torch.get_num_threads()}",
        flush=True,
    )

    rows = []
    for loss in args.losses.split(","):
        for lr in (float(x) for x in args.lrs.split(",")):
            overrides = {**sets.get(None, {}), **sets.get(loss, {})}
            # The loss's study spec gives every other setting (the triplet embedding head,
            # margin, K; the center-loss lambda and alpha): its baseline with this budget.
            spec = load_spec(f"resnet18-{loss}")
            config = spec.config(
                args.dataset,
                spec.baseline_params(),
                data_root=str(root),
                subset_classes=classes,
                subset_per_class=per_class,
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=lr,
                width=args.width,
                seed=args.seed,
                device=args.device,
            ).replace(**overrides)
            t0 = time.perf_counter()

            def show(epoch: int, m: dict[str, float], loss: str = loss, lr: float = lr) -> None:
                extra = "".join(
                    f" {k}={m[k]:.3f}"
                    for k in ("triplet_violated", "triplet_pos_dist", "triplet_neg_dist", "embedding_norm")
                    if k in m
                )
                print(
                    f"  {loss} lr={lr:g} epoch {epoch}: loss={m['train_loss']:.4f} val_top5={m['val_top5']:.3f}"
                    f"{extra} ({m['epoch_seconds']:.0f}s)",
                    flush=True,
                )

            result = fit(config, report=show, dataset=dataset)
            t = evaluate(result.model, result.loss_fn, test, mean, std, result.device, config.eval_batch_size)
            row = {
                "tag": args.tag,
                "loss": loss,
                "lr": lr,
                "overrides": overrides,
                "test_top1": t["top1"],
                "test_top5": t["top5"],
                "best_val_top5": max(result.history["val_top5"]),
                "seconds": time.perf_counter() - t0,
                "history": result.history,
                "config": dataclasses.asdict(config),
            }
            rows.append(row)
            print(
                f"{loss:8s} lr={lr:<6g} {overrides} test top-1 {t['top1']:.3f} top-5 {t['top5']:.3f} "
                f"({row['seconds']:.0f}s)",
                flush=True,
            )

    print("\n| tag | loss | lr | overrides | test top-1 | test top-5 | best val top-5 | violated per epoch |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        v = r["history"].get("triplet_violated")
        print(
            f"| {r['tag']} | {r['loss']} | {r['lr']:g} | {r['overrides'] or ''} | {r['test_top1']:.3f} | "
            f"{r['test_top5']:.3f} | {r['best_val_top5']:.3f} | "
            f"{'' if v is None else ' '.join(f'{x:.2f}' for x in v)} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.exists() else []
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(previous + rows, indent=1, default=float))
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
