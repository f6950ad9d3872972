"""Storage overhead of dlops' worker loop, per backend, and many workers on one study.

1. Per trial: what one dlops worker asks of the storage for a trial of E epochs (take the
   study lock, recover dead workers' trials, count, ask, record the owner and the config;
   per epoch the history attr, ``report`` and ``should_prune``; then ``tell``), run through
   the real loop (``dlops.runner._run_trials``) with a trivial objective. Reported in
   milliseconds per trial and as a share of a 1-second trial.
2. Concurrency: W worker processes x T trivial trials on one study (shared target W*T):
   finished trials, duplicates, failures, errors, wall time.

    python benchmarks/storage.py                       # all backends reachable here
    python benchmarks/storage.py --backends postgresql --workers 8 --trials-per-worker 50

PostgreSQL: postgresql+psycopg2://postgres@127.0.0.1:5432/test; Redis: redis://127.0.0.1:6379/0
(override with --postgresql / --redis). Every run uses a fresh study and removes it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import time
import traceback
import uuid
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

optuna.logging.set_verbosity(optuna.logging.ERROR)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def backend_urls(args: argparse.Namespace, tmp: Path, tag: str) -> dict[str, str]:
    return {
        "sqlite": f"sqlite:///{tmp / 'bench.db'}",
        "journal": f"journal://{tmp / 'bench.log'}",
        "postgresql": args.postgresql,
        "redis": f"{args.redis}?prefix=dlops-bench-{tag}",
    }


def reachable(url: str) -> str | None:
    from dlops.storage import connect

    try:
        connect(url)
    except Exception as exc:  # noqa: BLE001
        return str(exc)
    return None


def cleanup(kind: str, url: str, names: list[str], tag: str) -> None:
    if kind == "postgresql":
        for name in names:
            try:
                optuna.delete_study(study_name=name, storage=url)
            except KeyError:
                pass
    if kind == "redis":
        import redis

        from dlops.storage import _split_redis_prefix

        client = redis.Redis.from_url(_split_redis_prefix(url)[0])
        for key in client.scan_iter(f"dlops-bench-{tag}*"):
            client.delete(key)


def trivial_objective(gate: Any, epochs: int, history_len: int = 7):
    """The storage calls of dlops' objective, without the training."""

    def objective(trial: optuna.Trial) -> float:
        gate(trial)
        x = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        trial.set_user_attr("config", {"lr": x, "epochs": epochs, "width": 64, "dataset": "tiny-imagenet"})
        history: dict[str, list[float]] = {}
        for epoch in range(epochs):
            for k in range(history_len):
                history.setdefault(f"metric{k}", []).append(0.5 + 0.01 * epoch)
            trial.set_user_attr("history", history)
            trial.report(0.5 + 0.01 * epoch, epoch)
            trial.should_prune()
        return 0.5 + x

    return objective


def run_loop(
    url: str, name: str, target: int, epochs: int, worker: int, heartbeat: int | None, warmup: int = 0
) -> dict[str, Any]:
    """One worker: dlops' loop until the study has ``target`` finished trials (after
    ``warmup`` untimed trials). Imports and connecting are not timed."""
    from dlops.runner import _run_trials, _TrialGate
    from dlops.stopping import GracefulStop
    from dlops.storage import connect

    try:
        storage = connect(url, heartbeat_interval=heartbeat)
        study = optuna.create_study(
            study_name=name,
            storage=storage.optuna,
            load_if_exists=True,
            sampler=optuna.samplers.RandomSampler(seed=worker),
            direction="maximize",
        )
        gate = _TrialGate()
        with GracefulStop() as stop:
            objective = trivial_objective(gate, epochs)
            # gc_after_trial off: a full gc.collect() per trial (dlops' default, for GPU memory)
            # costs ~0.1-0.3 s with torch loaded and is no storage cost.
            loop = dict(max_failures=target, timeout=None, stop=stop, say=lambda m: None, gc_after_trial=False)
            if warmup:
                _run_trials(study, storage, objective, gate, target=warmup, **loop)
            started = time.perf_counter()
            _run_trials(study, storage, objective, gate, target=target + warmup, **loop)
        return {"ok": True, "seconds": time.perf_counter() - started}
    except Exception:  # noqa: BLE001 - counted as an error of this backend
        return {"ok": False, "error": traceback.format_exc(limit=3)}


def per_trial_overhead(url: str, trials: int, epochs: int, heartbeat: int | None) -> dict[str, Any]:
    """ms per trial with ``epochs`` reports, and with none (the fixed part), on fresh studies."""
    out: dict[str, Any] = {"trials": trials, "epochs": epochs, "studies": []}
    for e, key in ((epochs, "ms_per_trial"), (0, "ms_fixed")):
        name = f"bench-{uuid.uuid4().hex[:8]}"
        out["studies"].append(name)
        result = run_loop(url, name, trials, e, 0, heartbeat, warmup=2)
        if not result["ok"]:
            return {**out, "error": result["error"]}
        out[key] = round(result["seconds"] * 1000 / trials, 1)
    out["ms_per_epoch"] = round((out["ms_per_trial"] - out["ms_fixed"]) / max(epochs, 1), 1)
    out["share_of_1s_trial_pct"] = round(out["ms_per_trial"] / 10, 1)
    return out


def _worker(args: tuple) -> dict[str, Any]:
    return run_loop(*args)


def concurrency(url: str, workers: int, per_worker: int, epochs: int, heartbeat: int | None) -> dict[str, Any]:
    name = f"bench-par-{uuid.uuid4().hex[:8]}"
    target = workers * per_worker
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(workers) as pool:
        results = pool.map(_worker, [(url, name, target, epochs, w, heartbeat) for w in range(workers)])
    wall = time.perf_counter() - t0
    from dlops.storage import connect

    trials = optuna.load_study(study_name=name, storage=connect(url).optuna).get_trials()
    numbers = [t.number for t in trials]
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    span = (max(ends) - min(starts)).total_seconds() if starts and ends else float("nan")
    errors = [r["error"] for r in results if not r["ok"]]
    return {
        "study": name,
        "workers": workers,
        "trials_per_worker": per_worker,
        "finished": sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials),
        "failed": sum(t.state == TrialState.FAIL for t in trials),
        "left_running_or_waiting": sum(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials),
        "duplicate_numbers": len(numbers) - len(set(numbers)),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "wall_seconds": round(wall, 1),  # with starting the processes
        "trial_span_seconds": round(span, 1),  # first trial start to last trial end
        "trials_per_second": round(len(trials) / span, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="sqlite,journal,postgresql,redis")
    p.add_argument("--postgresql", default="postgresql+psycopg2://postgres@127.0.0.1:5432/test")
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    p.add_argument("--trials", type=int, default=30, help="trials for the per-trial overhead")
    p.add_argument("--epochs", type=int, default=10, help="reports per trial")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--trials-per-worker", type=int, default=50)
    p.add_argument("--concurrency-backends", default="postgresql", help="backends for the many-worker run")
    p.add_argument("--heartbeat", type=int, default=60, help="heartbeat interval on PostgreSQL (dlops' default)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()

    tag = uuid.uuid4().hex[:8]
    report: dict[str, Any] = {"per_trial": {}, "concurrency": {}}
    with tempfile.TemporaryDirectory() as tmp:
        urls = backend_urls(args, Path(tmp), tag)
        for kind in args.backends.split(","):
            url = urls[kind]
            why = reachable(url)
            if why:
                print(f"{kind}: skipped ({why})")
                continue
            hb = args.heartbeat if kind == "postgresql" else None
            r = per_trial_overhead(url, args.trials, args.epochs, hb)
            report["per_trial"][kind] = r
            cleanup(kind, url, r["studies"], tag)
            if "error" in r:
                print(f"{kind}: error\n{r['error']}")
            else:
                print(
                    f"{kind:<11} {r['ms_per_trial']:>7.1f} ms per trial of {args.epochs} epochs "
                    f"({r['ms_fixed']:.1f} ms fixed + {r['ms_per_epoch']:.1f} ms per epoch) "
                    f"= {r['share_of_1s_trial_pct']:.1f}% of a 1-second trial",
                    flush=True,
                )
            if kind in args.concurrency_backends.split(","):
                c = concurrency(url, args.workers, args.trials_per_worker, 3, hb)
                report["concurrency"][kind] = c
                cleanup(kind, url, [c["study"]], tag)
                print(
                    f"{kind:<11} {c['workers']} workers x {c['trials_per_worker']} trials: {c['finished']} finished, "
                    f"{c['failed']} failed, {c['duplicate_numbers']} duplicate numbers, {c['errors']} errors, "
                    f"{c['left_running_or_waiting']} left running/waiting; trials ran in {c['trial_span_seconds']} s "
                    f"({c['trials_per_second']} trials/s; {c['wall_seconds']} s with process start-up)",
                    flush=True,
                )
                if c["first_error"]:
                    print(c["first_error"])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
