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
    # source stays the study's name: Hyperband's brackets hash it, so a replay of the file
    # uses the brackets a live run of this study would
    curves.spec = spec_name
    curves.settings = settings
    curves.command = command
    write_curves(curves, out)
    return len(curves.trials)


def curves_files(root: Path) -> list[Path]:
    """Every dlops-curves JSON file under ``root`` (these digits curves, and curves a GPU
    run on real images leaves under benchmarks/results/)."""
    found = []
    for path in sorted(root.rglob("*.json")):
        try:
            if json.loads(path.read_text()).get("format") == "dlops-curves":
                found.append(path)
        except (OSError, ValueError, AttributeError):
            continue
    return found


def write_results(results_root: Path, out: Path, orders: int) -> Path:
    """Replay every recorded curves file with the default pruners and the spec's own
    ``[pruner]``: ``replay-<name>.txt`` (the table) and ``.json`` next to the curves, and
    the summary page ``out/RESULTS.md``."""
    from dlops.replay import DEFAULT_CANDIDATES, choose, format_table, pruner_label, read_curves, replay, replay_orders
    from dlops.spec import load_spec

    lines = [
        "# Pruning on recorded learning curves",
        "",
        "Written by `python benchmarks/pruning.py --results` from the curves files below "
        "(`dlops study replay FILE` prints any one of these tables). Each pruner sees the recorded trials in "
        "their original order, epoch by epoch; *kept best*: the best trial that survives is within "
        "0.5 points of the unpruned best. *Orders*: the same replay over "
        f"{orders} shuffles of the trial order (trial 0, the baseline, first). *Chosen*: the fewest epochs "
        "among the pruners that keep the best in the recorded order and in at least 80% of the shuffled "
        "orders (the fewest in the recorded order alone is often a lucky one: see each table).",
        "",
    ]
    summary = [
        "| curves | trials | unpruned best | spec's pruner: share, kept best | chosen "
        "| its share | top-3 kept | orders kept best / mean share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    details = []
    for path in curves_files(results_root):
        curves = read_curves(path)
        if curves.pruned:
            curves = curves.complete_only()
        pruners = list(DEFAULT_CANDIDATES)
        own = None
        if curves.spec:
            try:
                own = pruner_label(dict(load_spec(curves.spec).pruner))
            except Exception:  # noqa: BLE001 - a curves file of a spec this tree lacks
                own = None
            if own and own not in pruners:
                pruners.append(own)
        results = replay(curves, pruners)
        robust = replay_orders(curves, pruners, orders=orders)
        chosen = choose(results, robust)
        fewest = choose(results)
        stem = path.stem
        table = format_table(results)
        head = (
            f"replay of {curves.source}: {len(curves.trials)} trials, {results[0].total_epochs} epochs unpruned; "
            f"unpruned best {curves.metric} {results[0].unpruned_best:.4f} (trial {results[0].unpruned_best_trial})"
        )
        (path.parent / f"replay-{stem}.txt").write_text(head + "\n" + table + "\n")
        (path.parent / f"replay-{stem}.json").write_text(
            json.dumps(
                {
                    "curves": str(path.relative_to(ROOT)),
                    "chosen": chosen.pruner if chosen else None,
                    "fewest_epochs_keeping_best_in_this_order": fewest.pruner if fewest else None,
                    "spec_pruner": own,
                    "results": [r.to_dict() for r in results],
                    "orders": robust,
                },
                indent=1,
            )
            + "\n"
        )
        mine = next((r for r in results if r.pruner == own), None)
        rel = path.relative_to(ROOT)
        setting = ", ".join(
            f"{k} {v}" for k, v in curves.settings.items() if k in ("width", "subset_per_class", "device")
        )
        row = [
            f"[{rel.name}]({os.path.relpath(path, out)})" + (f" ({setting})" if setting else ""),
            str(len(curves.trials)),
            f"{results[0].unpruned_best:.4f} (trial {results[0].unpruned_best_trial})",
            f"`{own}`: {100 * mine.share:.0f}%, {'yes' if mine.kept_best else 'no'}" if mine else "–",
        ]
        if chosen:
            rb = robust[chosen.pruner]
            row += [
                f"`{chosen.pruner}`",
                f"{100 * chosen.share:.0f}%",
                f"{chosen.top3_kept}/{len(chosen.top3)}",
                f"{100 * rb['kept_best']:.0f}% / {100 * rb['share']:.0f}%",
            ]
        else:
            row += ["none keeps it", "–", "–", "–"]
        summary.append("| " + " | ".join(row) + " |")
        details += [
            f"## {rel}",
            "",
            f"Recorded by: `{curves.command}`" if curves.command else "",
            "",
            "```",
            head,
            table,
            "```",
            "",
            f"Fewest epochs keeping the best in the recorded order: `{fewest.pruner if fewest else '-'}`"
            + (
                f" (kept it in {100 * robust[fewest.pruner]['kept_best']:.0f}% of the shuffled orders)"
                if fewest
                else ""
            )
            + f"; chosen: `{chosen.pruner if chosen else '-'}`.",
            "",
        ]
        details += [
            "Over shuffled orders (kept best / mean share): "
            + "; ".join(f"`{k}` {100 * v['kept_best']:.0f}% / {100 * v['share']:.0f}%" for k, v in robust.items()),
            "",
        ]
    page = out / "RESULTS.md"
    page.write_text("\n".join(lines + summary + [""] + details))
    return page


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
    ap.add_argument(
        "--results",
        action="store_true",
        help="record nothing: replay every curves file under "
        "benchmarks/results and write the replay tables and RESULTS.md",
    )
    ap.add_argument("--orders", type=int, default=20, help="--results: shuffled trial orders for the check")
    args = ap.parse_args(argv)
    if args.results:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        print(f"wrote {write_results(ROOT / 'benchmarks' / 'results', Path(args.out), args.orders)}")
        return 0

    os.environ["DLOPS_HOME"] = args.home
    Path(args.home).mkdir(parents=True, exist_ok=True)
    import optuna

    from dlops.objective import RunOptions
    from dlops.runner import run_study
    from dlops.spec import load_spec
    from dlops.studies import FINISHED, state_counts

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{Path(args.home).absolute() / 'curves.db'}"
    deadline = None
    if args.deadline:
        h, m = (int(x) for x in args.deadline.split(":"))
        now = dt.datetime.now(dt.UTC)
        deadline = now.replace(hour=h, minute=m, second=0, microsecond=0)
    command = (
        "OMP_NUM_THREADS="
        + os.environ.get("OMP_NUM_THREADS", "")
        + " python benchmarks/pruning.py "
        + shlex.join(a for a in (argv if argv is not None else sys.argv[1:]) if True)
    )
    out = Path(args.out)

    def finished(name: str) -> int:
        try:
            s = optuna.load_study(study_name=name, storage=url)
        except KeyError:
            return 0
        c = state_counts(s)
        return sum(c[st.name] for st in FINISHED)

    def plan(spec_name: str):
        spec = load_spec(spec_name).for_dataset(args.dataset)
        name = study_name(
            spec_name, args.dataset, args.width if spec.trainer == "resnet18" else None, args.subset_per_class
        )
        overrides = {
            k: v
            for k, v in {
                "subset_per_class": args.subset_per_class,
                "width": args.width if spec.trainer == "resnet18" else None,
            }.items()
            if v
        }
        settings = {
            "dataset": args.dataset,
            "pruner": "none",
            "device": args.device,
            "sampler": dict(spec.sampler),
            **overrides,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        }
        return spec, name, overrides, settings

    stopped = None
    while stopped is None:
        pending = [(s, *plan(s)) for s in args.specs if finished(plan(s)[1]) < args.trials]
        if not pending:
            break
        for spec_name, spec, name, overrides, settings in pending:
            if deadline is not None and dt.datetime.now(dt.UTC) >= deadline:
                print(f"deadline {args.deadline} UTC passed: stopping", flush=True)
                stopped = 0
                break
            unpruned = dataclasses.replace(spec, pruner={"type": "none"})
            options = RunOptions(
                dataset=args.dataset,
                n_trials=1,
                storage=url,
                study_name=name,
                device=args.device,
                train_overrides=overrides,
                heartbeat_interval=None,
            )
            t0 = time.monotonic()
            # One trial per call, so the sampler is new each call: seeded with the spec's seed
            # + the trials finished so far (run_study's `worker` offset), it does not draw the
            # same start-up trial every time. Trial k still trains with seed + k.
            result = run_study(unpruned, options, worker=finished(name))
            n = export(spec_name, name, url, out / f"{spec_name}-{args.dataset}.json", settings, command)
            print(
                f"{name}: {n} trials ({time.monotonic() - t0:.0f} s for the last; states {result.counts})", flush=True
            )
            if result.interrupted:  # Ctrl-C / SIGTERM: the interrupted trial resumes next time
                stopped = 128 + result.interrupted
                break
    for spec_name in args.specs:  # every file as the database now holds it
        spec, name, overrides, settings = plan(spec_name)
        if finished(name):
            export(spec_name, name, url, out / f"{spec_name}-{args.dataset}.json", settings, command)
    return stopped or 0


if __name__ == "__main__":
    raise SystemExit(main())
