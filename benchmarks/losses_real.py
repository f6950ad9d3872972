"""The three losses on a real Tiny ImageNet subset at one budget: test top-1/top-5.

Each run is ``dlops.trainers.resnet.fit`` (ResNet18, SGD momentum 0.9, cosine schedule, seed 0)
on the first ``--classes`` classes and the first ``--per-class`` training images of
each, validated on the hold-out, then tested once on the official val images of
those classes; after training, each model is also scored several ways (nearest centroid
from 50 or all images per class, Euclidean or cosine; a linear probe on the pooled
backbone feature; batch-hard figures of the test embeddings), cross-entropy's pooled
feature included, so the losses' representations compare directly. Every loss gets the
same epochs, batch size and width and the same small lr sweep; every other setting comes from the loss's study spec
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
from torch.nn import functional as F

from dlops.data import Split, first_per_class, get_dataset, take_subset
from dlops.data.loader import BatchLoader
from dlops.losses import batch_hard_distances
from dlops.metrics import class_centroids, topk_accuracy
from dlops.paths import data_root
from dlops.spec import load_spec
from dlops.trainers.base import autocast
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


@torch.no_grad()
def embed(result: Any, split: Split, mean: Any, std: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eval-mode features of ``split``: the embedding in the space the loss scores
    (normalised where the loss normalises; for a model with a classifier its pooled feature,
    normalised), the pooled backbone feature (before any embedding head), and the labels."""
    model, device = result.model, result.device
    model.eval()
    embs, pooled, labels = [], [], []
    hook = model.head.register_forward_hook(lambda module, inputs, output: pooled.append(inputs[0].float()))
    try:
        for x, y in BatchLoader(split, result.config.eval_batch_size, mean, std, device):
            with autocast(device):
                e, _ = model(x)
            e = e.float()
            scored = result.loss_fn.scored_by == "centroids"
            embs.append(result.loss_fn.scoring_embedding(e) if scored else F.normalize(e, dim=1))
            labels.append(y)
    finally:
        hook.remove()
    return torch.cat(embs), torch.cat(pooled), torch.cat(labels)


def linear_probe(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor
) -> dict[int, float]:
    """Test top-1/top-5 of a multinomial logistic regression (scikit-learn, fixed settings)
    fitted on frozen, standardised features: how linearly separable a backbone left them."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x.cpu().numpy())
    clf = LogisticRegression(C=0.1, max_iter=2000).fit(scaler.transform(train_x.cpu().numpy()), train_y.cpu().numpy())
    scores = torch.from_numpy(clf.decision_function(scaler.transform(test_x.cpu().numpy())))
    return topk_accuracy(scores, test_y.cpu())


def batch_hard_on(
    e: torch.Tensor, y: torch.Tensor, k: int = 6, batches: int = 50, margin: float = 0.2
) -> dict[str, float]:
    """Batch-hard figures of fixed embeddings ``e`` over ``batches`` random P x K batches
    (P = every class, K = ``k``; seed 0): the share of anchors whose hardest triplet violates
    ``margin``, and the mean hardest-positive and hardest-negative distances. On a model
    trained with cross-entropy it says how far its (normalised) features are from what the
    triplet loss asks for."""
    gen = torch.Generator().manual_seed(0)
    by_class = [torch.nonzero(y.cpu() == c).flatten() for c in range(int(y.max()) + 1)]
    rows = []
    for _ in range(batches):
        idx = torch.cat([c[torch.randperm(len(c), generator=gen)[:k]] for c in by_class if len(c) >= 2])
        d_ap, d_an, valid = batch_hard_distances(e[idx.to(e.device)], y[idx.to(y.device)])
        rows.append(
            torch.stack([((d_ap + margin) >= d_an)[valid].float().mean(), d_ap[valid].mean(), d_an[valid].mean()])
        )
    violated, pos, neg = torch.stack(rows).mean(0).tolist()
    return {"violated": violated, "pos_dist": pos, "neg_dist": neg}


def centroid_scoring(result: Any, train: Split, test: Split, mean: Any, std: Any) -> dict[str, float]:
    """Test top-1/top-5 from one trained model, several ways: by nearest class centroid with
    centroids of the first 50 training images of each class or of all, compared by Euclidean
    distance (the mean of the normalised embeddings as it is) or by cosine (the mean
    re-normalised); and a linear probe on the pooled backbone feature. A model with a
    classifier has its pooled feature scored by centroids the same way, to compare."""
    train_e, train_f, train_y = embed(result, train, mean, std)
    test_e, test_f, test_y = embed(result, test, mean, std)
    n = int(train_y.max()) + 1
    out: dict[str, float] = {}
    first50 = torch.from_numpy(first_per_class(train_y.cpu().numpy(), 50)).to(train_y.device)
    for cap_name, keep in (("50", first50), ("all", None)):
        e, y = (train_e, train_y) if keep is None else (train_e[keep], train_y[keep])
        c = class_centroids(e, y, n)
        for how, scores in (
            ("euclid", -torch.cdist(test_e, c)),
            ("cosine", test_e @ F.normalize(c, dim=1).T),
        ):
            acc = topk_accuracy(scores, test_y)
            out[f"{how}_{cap_name}_top1"], out[f"{how}_{cap_name}_top5"] = acc[1], acc[5]
    probe = linear_probe(train_f, train_y, test_f, test_y)
    out["probe_top1"], out["probe_top5"] = probe[1], probe[5]
    out.update({f"test_batch_hard_{k}": v for k, v in batch_hard_on(test_e, test_y).items()})
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
            scoring = centroid_scoring(result, dataset.train, test, mean, std)
            row = {
                "tag": args.tag,
                "loss": loss,
                "lr": lr,
                "overrides": overrides,
                "test_top1": t["top1"],
                "test_top5": t["top5"],
                "best_val_top5": max(result.history["val_top5"]),
                "centroid_scoring": scoring,
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
            print(
                "  by centroid, test top-1 / top-5: "
                + ", ".join(
                    f"{how} {cap}: {scoring[f'{how}_{cap}_top1']:.3f} / {scoring[f'{how}_{cap}_top5']:.3f}"
                    for how in ("euclid", "cosine")
                    for cap in ("50", "all")
                )
                + f"; linear probe on the pooled feature: {scoring['probe_top1']:.3f} / {scoring['probe_top5']:.3f}"
                + "; batch-hard on test ({} x 6, margin 0.2): violated {:.3f}, pos / neg dist {:.3f} / {:.3f}".format(
                    dataset.num_classes,
                    scoring["test_batch_hard_violated"],
                    scoring["test_batch_hard_pos_dist"],
                    scoring["test_batch_hard_neg_dist"],
                ),
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
