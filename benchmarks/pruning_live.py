"""The live check of a spec's pruner on digits: the same spec and sampler seed run with the
pruner and without, for several seeds; epochs trained and best value side by side.

A replay (``dlops study replay``) keeps the recorded trials fixed. Live, the sampler (TPE)
learns from every finished trial, and a pruned trial tells it less than a complete one, so
the pruned run proposes other trials than the unpruned one from its first pruned trial on:
the two runs of one seed are the same study only up to there (``first_pruned`` below).
Hence several seeds, and the mean and spread.

    OMP_NUM_THREADS=1 python benchmarks/pruning_live.py --spec resnet18-ce --trials 24 --width 16

Resumable like ``benchmarks/pruning.py`` (same ``--home``): a run that already has its
trials is not trained again. Writes ``benchmarks/results/pruning/live-<spec>-<dataset>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import re
import shlex
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results" / "pruning"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", default="resnet18-ce")
    ap.add_argument("--pruner", default="spec", help="TYPE[:key=value,...], or 'spec' for the spec's [pruner]")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--trials", type=int, default=24, help="finished trials per run")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--home", default=str(ROOT / "benchmarks" / ".pruning-home"))
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--deadline", default=None, help="HH:MM (UTC): start no run after this")
    args = ap.parse_args(argv)

    os.environ["DLOPS_HOME"] = args.home
    Path(args.home).mkdir(parents=True, exist_ok=True)
    import optuna

    from dlops.objective import RunOptions
    from dlops.replay import parse_pruner, pruner_label
    from dlops.runner import run_study
    from dlops.spec import load_spec
    from dlops.studies import FINISHED, epochs_summary

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{Path(args.home).absolute() / 'curves.db'}"
    spec = load_spec(args.spec).for_dataset(args.dataset)
    chosen = dict(spec.pruner) if args.pruner == "spec" else parse_pruner(args.pruner)
    overrides = {"width": args.width} if args.width and spec.trainer == "resnet18" else {}
    deadline = None
    if args.deadline:
        h, m = (int(x) for x in args.deadline.split(":"))
        deadline = dt.datetime.now(dt.UTC).replace(hour=h, minute=m, second=0, microsecond=0)

    runs = []
    for seed in args.seeds:
        for table in [chosen] + ([{"type": "none"}] if chosen.get("type") != "none" else []):
            label = pruner_label(table)
            name = (
                f"live-{args.spec}-{args.dataset}"
                + (f"-w{args.width}" if overrides else "")
                + f"-s{seed}-"
                + re.sub(r"[^A-Za-z0-9]+", "_", label)
            )
            try:
                study = optuna.load_study(study_name=name, storage=url)
                done = sum(t.state in FINISHED for t in study.get_trials(deepcopy=False))
            except KeyError:
                done = 0
            if done < args.trials:
                if deadline is not None and dt.datetime.now(dt.UTC) >= deadline:
                    print(f"deadline {args.deadline} UTC passed: {name} not run", flush=True)
                    continue
                result = run_study(
                    dataclasses.replace(spec, pruner=dict(table)),
                    RunOptions(
                        dataset=args.dataset,
                        n_trials=args.trials - done,
                        storage=url,
                        study_name=name,
                        seed=seed,
                        device=args.device,
                        train_overrides=overrides,
                        heartbeat_interval=None,
                    ),
                )
                if result.interrupted:  # Ctrl-C / SIGTERM: the trial resumes next time
                    return 128 + result.interrupted
            study = optuna.load_study(study_name=name, storage=url)
            trials = [t for t in study.get_trials(deepcopy=False) if t.state in FINISHED][: args.trials]
            ep = epochs_summary(trials)
            complete = [t for t in trials if t.value is not None and t.state.name == "COMPLETE"]
            best = (
                max(complete, key=lambda t: t.value)
                if spec.direction == "maximize"
                else min(complete, key=lambda t: t.value)
            )
            pruned = sorted(ep["pruned_stop_epochs"])
            runs.append(
                {
                    "seed": seed,
                    "pruner": label,
                    "study": name,
                    "trials": len(trials),
                    "epochs": ep["trained"],
                    "epochs_unpruned_same_trials": ep["unpruned"],
                    "pruned": len(pruned),
                    "first_pruned": pruned[0] if pruned else None,
                    "best_value": best.value,
                    "best_trial": best.number,
                }
            )
            print(json.dumps(runs[-1]), flush=True)

    summary = {}
    for label in dict.fromkeys(r["pruner"] for r in runs):
        mine = [r for r in runs if r["pruner"] == label]

        def sd(xs: list[float]) -> float:
            return statistics.stdev(xs) if len(xs) > 1 else 0.0

        summary[label] = {
            "runs": len(mine),
            "epochs_mean": statistics.mean(r["epochs"] for r in mine),
            "epochs_sd": sd([r["epochs"] for r in mine]),
            "best_mean": statistics.mean(r["best_value"] for r in mine),
            "best_sd": sd([r["best_value"] for r in mine]),
        }
    out = Path(args.out) / f"live-{args.spec}-{args.dataset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    command = (
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python benchmarks/pruning_live.py "
        + shlex.join(argv if argv is not None else sys.argv[1:])
    )
    out.write_text(
        json.dumps(
            {
                "spec": args.spec,
                "dataset": args.dataset,
                "metric": spec.metric,
                "settings": {
                    "width": args.width,
                    "trials": args.trials,
                    "device": args.device,
                    "sampler": dict(spec.sampler),
                },
                "command": command,
                "runs": runs,
                "summary": summary,
            },
            indent=1,
        )
        + "\n"
    )
    for label, s in summary.items():
        print(
            f"{label}: {s['runs']} seeds, epochs {s['epochs_mean']:.1f} ± {s['epochs_sd']:.1f}, "
            f"best {spec.metric} {s['best_mean']:.4f} ± {s['best_sd']:.4f}"
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
