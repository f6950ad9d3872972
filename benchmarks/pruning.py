"""Record unpruned learning curves on digits, for ``dlops study replay``.

One study per spec (resnet18-ce, resnet18-triplet, resnet18-center, autoencoder), each with
the spec's search space, sampler and baseline, on the embedded digits dataset, with the
pruner switched off so every trial trains all its epochs. The trials' per-epoch values of
the spec's objective are written as JSON curves (``dlops.replay`` reads them) under
``benchmarks/results/pruning/``, one file per spec, rewritten after every trial.

Incremental and resumable: the studies live in an SQLite database under ``--home``
(default ``benchmarks/.pruning-home``, not in git); each call adds trials round-robin
(one trial per spec in turn) until every study has ``--trials`` finished trials or
``--deadline`` passes, and a later call with the same ``--home`` goes on where it stopped.
A study whose database is gone can be recorded again from scratch; the JSON files only
ever hold what the database holds.

    OMP_NUM_THREADS=1 python benchmarks/pruning.py --trials 24 --width 16
    OMP_NUM_THREADS=1 python benchmarks/pruning.py --trials 24 --width 16 --deadline 18:00   # UTC

Reduced cost (say so when quoting the curves): ``--width`` sets the ResNet18 first-stage
channels (the specs train width 64) and ``--subset-per-class`` the training images per
class; both are stored in each JSON file's ``settings``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SPECS = ("resnet18-ce", "resnet18-triplet", "resnet18-center", "autoencoder")
OUT = ROOT / "benchmarks" / "results" / "pruning"


def study_name(spec: str, dataset: str, width: int | None, subset: int | None) -> str:
    tag = "".join(f"-{k}{v}" for k, v in (("w", width), ("spc", subset)) if v)
    return f"curves-{spec}-{dataset}{tag}"


def export(spec_name: str, study_name_: str, url: str, out: Path, settings: dict, command: str) -> int:
    import optuna

    from dlops.replay import curves_from_study, write_curves

    study = optuna.load_study(study_name=study_name_, storage=url)
    curves = curves_from_study(study)
    curves.source = f"{study_name_} (benchmarks/pruning.py, unpruned)"
    curves.spec = spec_name
    curves.settings = settings
    curves.command = command
    write_curves(curves, out)
    return len(curves.trials)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=24, help="finished trials per study to reach")
    ap.add_argument("--specs", nargs="+", default=list(SPECS))
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--width", type=int, default=None, help="ResNet18 width (the specs: 64)")
    ap.add_argument("--subset-per-class", type=int, default=None)
    ap.add_argument("--home", default=str(ROOT / "benchmarks" / ".pruning-home"))
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--deadline", default=None, help="HH:MM (UTC): start no trial after this")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    os.environ["DLOPS_HOME"] = args.home
    Path(args.home).mkdir(parents=True, exist_ok=True)
    import optuna

    from dlops.search import RunOptions, run_study, state_counts, FINISHED
    from dlops.spec import load_spec

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{Path(args.home).absolute() / 'curves.db'}"
    deadline = None
    if args.deadline:
        h, m = (int(x) for x in args.deadline.split(":"))
        now = dt.datetime.now(dt.timezone.utc)
        deadline = now.replace(hour=h, minute=m, second=0, microsecond=0)
    command = "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "") + " python benchmarks/pruning.py " + \
        shlex.join(a for a in (argv if argv is not None else sys.argv[1:]) if True)
    out = Path(args.out)

    def finished(name: str) -> int:
        try:
            s = optuna.load_study(study_name=name, storage=url)
        except KeyError:
            return 0
        c = state_counts(s)
        return sum(c[st.name] for st in FINISHED)

    while True:
        pending = []
        for spec_name in args.specs:
            spec = load_spec(spec_name).for_dataset(args.dataset)
            name = study_name(spec_name, args.dataset, args.width if spec.trainer == "resnet18" else None,
                              args.subset_per_class)
            if finished(name) < args.trials:
                pending.append((spec_name, spec, name))
        if not pending:
            break
        for spec_name, spec, name in pending:
            if deadline is not None and dt.datetime.now(dt.timezone.utc) >= deadline:
                print(f"deadline {args.deadline} UTC passed: stopping", flush=True)
                return 0
            unpruned = dataclasses.replace(spec, pruner={"type": "none"})
            overrides = {k: v for k, v in {"subset_per_class": args.subset_per_class,
                                           "width": args.width if spec.trainer == "resnet18" else None}.items() if v}
            options = RunOptions(dataset=args.dataset, n_trials=1, storage=url, study_name=name, device=args.device,
                                 train_overrides=overrides, heartbeat_interval=None)
            t0 = time.monotonic()
            result = run_study(unpruned, options)
            settings = {"dataset": args.dataset, "pruner": "none", "device": args.device,
                        "sampler": dict(spec.sampler), **overrides,
                        "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
            n = export(spec_name, name, url, out / f"{spec_name}-{args.dataset}.json", settings, command)
            print(f"{name}: {n} trials ({time.monotonic() - t0:.0f} s for the last; states {result.counts})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
