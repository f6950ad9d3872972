"""Training and evaluation throughput of ResNet18 (3x3 stem) on 64x64 images, 200 classes.

What a study's epoch costs, piece by piece, on the device it runs on:

* the loader alone (``dlops.data.loader.BatchLoader``: on a GPU the split is resident
  there; each batch gathered, cropped, flipped and normalised), shuffled and P x K;
* training images/s per loss x batch size x {eager, compiled}: loader + forward (bf16
  autocast and channels_last on CUDA) + loss + backward + SGD step, with the same
  on-device sums ``fit`` keeps; the peak device memory of each;
* evaluation images/s (``dlops.trainers.resnet.evaluate``, the function a study calls) per eval
  batch size;
* options: ``torch.backends.cudnn.benchmark`` on and off;
* the projected seconds of one full Tiny ImageNet epoch (90,000 training + 10,000
  validation images; the triplet model also embeds 10,000 training images for its
  centroids) at each loss's best batch size.

Images are synthetic uint8 of the real shape. Each figure is the median of
``--repeats`` timings of ``--steps`` steps after ``--warmup`` steps, timed with CUDA
events on a GPU (perf_counter on the CPU). On the CPU it runs tiny sizes (``--smoke``,
the default there) and finishes in seconds; ``--full`` forces the real sizes.

    python benchmarks/throughput.py                         # CPU: smoke sizes
    python benchmarks/throughput.py --json out/throughput.json   # GPU: the real sizes
    python benchmarks/throughput.py --modes eager --batch-sizes 256   # one slice
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dlops.data import Split
from dlops.data.loader import BatchLoader, pk_shape
from dlops.losses import LOSSES
from dlops.models import ResNet18
from dlops.trainers.base import evaluate, resolve_device
from dlops.trainers.resnet import compile_model, train_step

TRAIN_IMAGES, VAL_IMAGES, CENTROID_IMAGES = 90_000, 10_000, 10_000  # one full Tiny ImageNet epoch
MEAN, STD = np.array([0.480, 0.448, 0.398]), np.array([0.277, 0.269, 0.282])

FULL = dict(
    image_size=64,
    width=64,
    classes=200,
    batch_sizes="128,256,512",
    eval_batch_sizes="512,1024,2048",
    train_images=20_000,
    val_images=10_000,
    steps=10,
    repeats=5,
    warmup=5,
)
SMOKE = dict(
    image_size=32,
    width=8,
    classes=20,
    batch_sizes="16,32",
    eval_batch_sizes="64,128",
    train_images=512,
    val_images=256,
    steps=2,
    repeats=3,
    warmup=1,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="tiny sizes (the default on the CPU)")
    size.add_argument("--full", action="store_true", help="the real sizes (the default on a GPU)")
    p.add_argument("--losses", default="ce,triplet,center")
    p.add_argument(
        "--modes",
        default=None,
        help="eager,compiled (default: both on a GPU, eager on the CPU, where compiling ResNet18 takes minutes)",
    )
    p.add_argument(
        "--compile-budget-s",
        type=float,
        default=240.0,
        help="no new compiled batch size starts after this many seconds of compiled work",
    )
    for name in FULL:
        p.add_argument("--" + name.replace("_", "-"), default=None, type=type(FULL[name]))
    p.add_argument("--json", type=Path, default=None, help="write the results here (after every section)")
    args = p.parse_args(argv)
    args.device = resolve_device(args.device)
    args.smoke = args.smoke or (args.device.type == "cpu" and not args.full)
    for name, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",")]
    args.eval_batch_sizes = [int(b) for b in str(args.eval_batch_sizes).split(",")]
    args.losses = args.losses.split(",")
    args.modes = (args.modes or ("eager,compiled" if args.device.type == "cuda" else "eager")).split(",")
    return args


class Timer:
    """Seconds of ``steps`` calls, device work included (CUDA events, or a host clock)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], None], steps: int) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        return time.perf_counter() - t0

    def median(self, fn: Callable[[], None], steps: int, repeats: int, warmup: int) -> float:
        for _ in range(warmup):
            fn()
        if self.cuda:
            torch.cuda.synchronize()
        return statistics.median(self(fn, steps) for _ in range(repeats))


def endless(loader: BatchLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield from loader


def synthetic_split(n: int, size: int, classes: int, seed: int) -> Split:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g).numpy()
    return Split(images, np.arange(n, dtype=np.int64) % classes)


def loader_for(split: Split, batch_size: int, device: torch.device, classes: int, pk: bool) -> BatchLoader:
    """The training loader ``fit`` builds (padding 8 of 64 px, flips), shuffled or P x K; full
    batches only. A timed step is a full batch: ``--train-images`` 20,000 at batch 512 leave 32
    over, and that short batch, inside the timed repeats, would recompile a compiled model (for
    dynamic shapes, which the batches after it then run) and autotune cuDNN anew."""
    return BatchLoader(
        split,
        batch_size,
        MEAN,
        STD,
        device,
        shuffle=True,
        augment=True,
        hflip=True,
        crop_padding=split.images.shape[-1] // 8,
        seed=0,
        pk=pk_shape(batch_size, classes, 4) if pk else None,
        drop_last=True,
        channels_last=device.type == "cuda",
    )


def peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args, self.device = args, args.device
        self.timer = Timer(self.device)
        self.results: dict[str, Any] = {
            "meta": meta(args),
            "loader": [],
            "train": [],
            "eval": [],
            "options": [],
            "projection": [],
            "skipped": [],
        }
        self.train = synthetic_split(args.train_images, args.image_size, args.classes, 0)
        self.val = synthetic_split(args.val_images, args.image_size, args.classes, 1)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # as fit sets it (TrainConfig.cudnn_benchmark)

    compile_started: float | None = None

    def compile_spent(self) -> float:
        return 0.0 if self.compile_started is None else time.perf_counter() - self.compile_started

    def save(self) -> None:
        """Write the JSON whole or not at all: a stage killed at its time limit keeps the last one."""
        if self.args.json:
            self.args.json.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.args.json.with_name(self.args.json.name + ".tmp")
            tmp.write_text(json.dumps(self.results, indent=1))
            os.replace(tmp, self.args.json)

    def model(self) -> ResNet18:
        torch.manual_seed(0)
        model = ResNet18(self.args.classes, 3, self.args.width).to(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        return model

    # ---------------------------------------------------------------- loader
    def loader(self) -> None:
        a = self.args
        for bs in a.batch_sizes:
            for pk in (False, True):
                batches = endless(loader_for(self.train, bs, self.device, a.classes, pk))
                secs = self.timer.median(lambda batches=batches: next(batches), a.steps, a.repeats, a.warmup)
                ms = secs / a.steps * 1e3
                self.results["loader"].append(
                    {
                        "batch_size": bs,
                        "sampler": "pk" if pk else "shuffled",
                        "ms_per_batch": ms,
                        "images_per_s": bs / (ms / 1e3),
                    }
                )
        self.save()

    # ---------------------------------------------------------------- training
    def step_fn(self, net: torch.nn.Module, loss_name: str, bs: int) -> tuple[Callable[[], None], torch.nn.Module]:
        """One training step as ``fit`` runs it (loader, then ``train_step``: autocast forward, loss, backward,
        SGD, the epoch's on-device sums)."""
        a, device = self.args, self.device
        loss_fn = LOSSES[loss_name](a.classes, 8 * a.width).to(device)
        params = list(net.parameters())
        optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=5e-4)
        batches = endless(loader_for(self.train, bs, device, a.classes, loss_fn.needs_pk))
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        net.train()
        loss_fn.train()

        def step() -> None:
            nonlocal loss_sum, correct
            x, y = next(batches)
            loss, _, logits = train_step(net, loss_fn, optimizer, x, y, device)
            loss_sum += loss.detach() * len(y)
            if loss_fn.scored_by == "logits":
                correct += (logits.detach().argmax(1) == y).sum()

        return step, loss_fn

    def measure_train(
        self, net: torch.nn.Module, mode: str, loss_name: str, bs: int, extra: dict | None = None
    ) -> dict:
        a = self.args
        reset_peak(self.device)
        step, _ = self.step_fn(net, loss_name, bs)
        t0 = time.perf_counter()
        step()  # the first step (a compiled model compiles here)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        secs = self.timer.median(step, a.steps, a.repeats, a.warmup)
        ms = secs / a.steps * 1e3
        row = {
            "loss": loss_name,
            "batch_size": bs,
            "mode": mode,
            "ms_per_step": ms,
            "images_per_s": bs / (ms / 1e3),
            "first_step_s": first_s,
            "peak_mib": peak_mib(self.device),
            **(extra or {}),
        }
        self.results["train"].append(row)
        self.save()
        print(
            f"  train {loss_name:<8} bs {bs:>4} {mode:<8} {row['images_per_s']:>10.0f} img/s "
            f"({ms:.2f} ms/step; first step {first_s:.1f} s)",
            flush=True,
        )
        return row

    def training(self, mode: str) -> None:
        a = self.args
        if mode == "eager":
            net = self.model()
            for loss_name in a.losses:
                for bs in a.batch_sizes:
                    self.measure_train(net, "eager", loss_name, bs)
        if mode == "compiled":
            self.compile_started = time.perf_counter()
            for bs in sorted(a.batch_sizes, reverse=True):  # the largest (usually the fastest) first
                if self.compile_spent() > a.compile_budget_s:
                    self.results["skipped"].append(
                        {"what": f"compiled, batch {bs}", "why": f"compile budget of {a.compile_budget_s:.0f} s spent"}
                    )
                    continue
                torch._dynamo.reset()  # a fresh graph per batch size: static shapes, as a run has
                net = compile_model(self.model())
                for loss_name in a.losses:
                    self.measure_train(net, "compiled", loss_name, bs)
        self.save()

    # ---------------------------------------------------------------- evaluation and options
    def evaluation(self, mode: str) -> None:
        a = self.args
        if mode == "compiled" and not any(r["mode"] == "compiled" for r in self.results["train"]):
            return
        if mode == "compiled" and self.compile_spent() > a.compile_budget_s:
            self.results["skipped"].append(
                {"what": "compiled evaluation", "why": f"compile budget of {a.compile_budget_s:.0f} s spent"}
            )
            return
        net = self.model()
        if mode == "compiled":
            torch._dynamo.reset()
            net = compile_model(net)
        loss_fn = LOSSES["ce"](a.classes, 8 * a.width).to(self.device)
        sizes = a.eval_batch_sizes if mode == "eager" else a.eval_batch_sizes[-1:]
        for bs in sizes:

            def run(net: torch.nn.Module = net, loss_fn: torch.nn.Module = loss_fn, bs: int = bs) -> None:
                evaluate(net, loss_fn, self.val, MEAN, STD, self.device, bs)

            reset_peak(self.device)
            t0 = time.perf_counter()
            run()
            first_s = time.perf_counter() - t0
            secs = statistics.median(self.timer(run, 1) for _ in range(max(2, a.repeats // 2)))
            self.results["eval"].append(
                {
                    "mode": mode,
                    "batch_size": bs,
                    "images_per_s": len(self.val) / secs,
                    "seconds": secs,
                    "first_s": first_s,
                    "peak_mib": peak_mib(self.device),
                }
            )
            print(f"  eval  {mode:<8} bs {bs:>4} {len(self.val) / secs:>10.0f} img/s", flush=True)
        self.save()

    def options(self) -> None:
        a = self.args
        if self.device.type != "cuda":
            self.results["skipped"].append({"what": "cudnn.benchmark on/off", "why": "CUDA only"})
            return
        bs = a.batch_sizes[len(a.batch_sizes) // 2]
        net = self.model()
        for flag in (False, True):
            torch.backends.cudnn.benchmark = flag
            row = self.measure_train(net, "eager", "ce", bs, {"option": f"cudnn.benchmark={flag}"})
            self.results["train"].remove(row)
            self.results["options"].append(row)
        torch.backends.cudnn.benchmark = True
        self.save()

    # ---------------------------------------------------------------- projection
    def project(self) -> None:
        """The projection from what has been measured so far (rebuilt on every call)."""
        train = self.results["train"]
        self.results["projection"] = []
        ce_best = {
            m: max(
                (r for r in train if r["loss"] == "ce" and r["mode"] == m),
                key=lambda r: r["images_per_s"],
                default=None,
            )
            for m in self.args.modes
        }
        loader_ms = {(r["batch_size"], r["sampler"]): r["ms_per_batch"] for r in self.results["loader"]}
        for mode in self.args.modes:
            for loss_name in self.args.losses:
                rows = [r for r in train if r["loss"] == loss_name and r["mode"] == mode]
                if not rows:
                    continue
                best = max(rows, key=lambda r: r["images_per_s"])
                same_bs_ce = next(
                    (
                        r
                        for r in train
                        if r["loss"] == "ce" and r["mode"] == mode and r["batch_size"] == best["batch_size"]
                    ),
                    None,
                )
                # a run evaluates in its training mode (fit compiles the model for both)
                eval_ips = max(
                    (r["images_per_s"] for r in self.results["eval"] if r["mode"] == mode),
                    default=max((r["images_per_s"] for r in self.results["eval"]), default=float("nan")),
                )
                eval_images = VAL_IMAGES + (CENTROID_IMAGES if LOSSES[loss_name].scored_by == "centroids" else 0)
                train_s = TRAIN_IMAGES / best["images_per_s"]
                eval_s = eval_images / eval_ips
                sampler = "pk" if LOSSES[loss_name].needs_pk else "shuffled"
                lms = loader_ms.get((best["batch_size"], sampler))
                self.results["projection"].append(
                    {
                        "loss": loss_name,
                        "mode": mode,
                        "best_batch_size": best["batch_size"],
                        "train_images_per_s": best["images_per_s"],
                        "step_vs_ce": best["ms_per_step"] / same_bs_ce["ms_per_step"] if same_bs_ce else None,
                        "best_vs_best_ce": ce_best[mode]["images_per_s"] / best["images_per_s"]
                        if ce_best[mode]
                        else None,
                        "loader_share": lms / best["ms_per_step"] if lms else None,
                        "peak_mib": best["peak_mib"],
                        "epoch_train_s": train_s,
                        "epoch_eval_s": eval_s,
                        "epoch_s": train_s + eval_s,
                    }
                )
        self.save()

    def table(self) -> str:
        r = self.results
        lines = [
            f"{r['meta']['device_name']} | torch {r['meta']['torch']} | ResNet18 width {self.args.width}, "
            f"{self.args.image_size}x{self.args.image_size}, {self.args.classes} classes"
            + (" | SMOKE sizes" if self.args.smoke else "")
        ]
        lines.append(f"{'loader':<10} {'batch':>6} {'sampler':>9} {'ms/batch':>9} {'images/s':>11}")
        for x in r["loader"]:
            lines.append(
                f"{'':<10} {x['batch_size']:>6} {x['sampler']:>9} {x['ms_per_batch']:>9.3f} {x['images_per_s']:>11.0f}"
            )
        lines.append(f"{'train':<10} {'batch':>6} {'mode':>9} {'ms/step':>9} {'images/s':>11} {'peak MiB':>9}  loss")
        for x in r["train"]:
            mem = f"{x['peak_mib']:.0f}" if x["peak_mib"] is not None else "-"
            lines.append(
                f"{'':<10} {x['batch_size']:>6} {x['mode']:>9} {x['ms_per_step']:>9.2f} {x['images_per_s']:>11.0f} "
                f"{mem:>9}  {x['loss']}"
            )
        for x in r["options"]:
            lines.append(
                f"{'option':<10} {x['batch_size']:>6} {x['option']:>26} {x['images_per_s']:>11.0f} img/s (ce, eager)"
            )
        lines.append(f"{'eval':<10} {'batch':>6} {'mode':>9} {'images/s':>21}")
        for x in r["eval"]:
            lines.append(f"{'':<10} {x['batch_size']:>6} {x['mode']:>9} {x['images_per_s']:>21.0f}")
        lines.append(
            f"{'epoch':<10} {'loss':>8} {'mode':>9} {'best bs':>7} {'img/s':>9} {'vs ce':>6} {'loader':>7} "
            f"{'peak MiB':>9} {'epoch s':>8}  (90k train + 10k val)"
        )
        for x in r["projection"]:
            vs = f"{x['step_vs_ce']:.3f}" if x["step_vs_ce"] else "-"
            share = f"{100 * x['loader_share']:.1f}%" if x["loader_share"] else "-"
            mem = f"{x['peak_mib']:.0f}" if x["peak_mib"] is not None else "-"
            lines.append(
                f"{'':<10} {x['loss']:>8} {x['mode']:>9} {x['best_batch_size']:>7} {x['train_images_per_s']:>9.0f} "
                f"{vs:>6} {share:>7} {mem:>9} {x['epoch_s']:>8.2f}"
            )
        for x in r["skipped"]:
            lines.append(f"skipped: {x['what']} ({x['why']})")
        return "\n".join(lines)


def meta(args: argparse.Namespace) -> dict[str, Any]:
    device = args.device
    from dlops.versions import git_commit

    commit = git_commit()  # the GPU machine's copy has no .git: $DLOPS_GIT_COMMIT there
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "python": sys.version.split()[0],
        "smoke": args.smoke,
        "settings": {k: (str(v) if isinstance(v, (Path, torch.device)) else v) for k, v in vars(args).items()},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    bench = Bench(args)
    print(
        f"throughput on {bench.results['meta']['device_name']} ({args.device}); smoke={args.smoke}; "
        f"modes {','.join(args.modes)}",
        flush=True,
    )
    # Eager first, then compiled, each block ending in the projection: the core figures are on
    # disk before any compiling, which can outlast a stage's time limit.
    sections: list[Callable[[], None]] = [bench.loader]
    for k, mode in enumerate(sorted(args.modes, key=lambda m: m != "eager")):
        sections += [functools.partial(bench.training, mode), functools.partial(bench.evaluation, mode)]
        if k == 0:
            sections.append(bench.options)
        sections.append(bench.project)
    for section in sections:
        section()
    bench.results["meta"]["seconds"] = time.perf_counter() - started
    bench.save()
    print(bench.table())
    print(f"({bench.results['meta']['seconds']:.1f} s)")
    return bench.results


if __name__ == "__main__":
    main()
