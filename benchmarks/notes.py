"""What the dashboard notes cost per trial, per storage backend.

After every trial ``dlops study run`` writes the trial's note (its per-epoch table) and,
under the study lock, refreshes the study note (``dlops.notes.RunNotes.trial_finished``).
This builds a study of T finished trials (E epochs each, a full history per trial, the
baseline first, like a real study) and times that hook after every trial. Reported: the
median and the mean milliseconds per trial, and the mean over the last 5 trials (notes
are study system attrs, so a study with more trials has more to read back).

    python benchmarks/notes.py                      # all backends reachable here
    python benchmarks/notes.py --trials 100 --backends sqlite journal

PostgreSQL: postgresql+psycopg2://postgres@127.0.0.1:5432/test; Redis: redis://127.0.0.1:6379/0
(override with --postgresql / --redis). Every run uses a fresh study and removes it.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
import uuid
import warnings
from pathlib import Path

import optuna

optuna.logging.set_verbosity(optuna.logging.ERROR)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def run(kind: str, url: str, trials: int, epochs: int) -> dict[str, float]:
    from dlops.notes import RunNotes, StudyContext
    from dlops.objective import RunOptions
    from dlops.runner import open_study, prepare_study
    from dlops.spec import load_spec
    from dlops.storage import connect

    storage = connect(url)
    spec = load_spec("resnet18-ce").for_dataset("digits")
    options = RunOptions(
        dataset="digits", storage=url, study_name=f"notes-bench-{uuid.uuid4().hex[:8]}", n_trials=trials
    )
    study = open_study(spec, options, storage)
    with storage.lock(study.study_name):
        prepare_study(study, spec, options)
    notes = RunNotes(StudyContext.of(spec, options, storage.masked))
    notes.opened(study)
    rng = random.Random(0)
    costs = []
    for n in range(trials):
        trial = study.ask()
        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        trial.set_user_attr("config", {"lr": lr, "epochs": epochs, "width": 64, "dataset": "digits", "seed": n})
        history = {
            k: [rng.random() for _ in range(epochs)]
            for k in ("train_loss", "train_acc", "val_loss", "val_top1", "val_top5", "lr", "epoch_seconds")
        }
        trial.set_user_attr("history", history)
        for e, v in enumerate(history["val_top1"]):
            trial.report(v, e)
        study.tell(trial, history["val_top1"][-1])
        frozen = storage.optuna.get_trial(trial._trial_id)
        start = time.perf_counter()
        notes.trial_finished(study, storage, frozen)
        costs.append((time.perf_counter() - start) * 1000)
    from optuna_dashboard import get_note
    from optuna_dashboard._note import get_note_from_system_attrs

    note = get_note(study)
    attrs = storage.optuna.get_study_system_attrs(study._study_id)
    last = get_note_from_system_attrs(attrs, study.trials[-1]._trial_id)["body"]
    assert f"Trials: {trials} complete" in note and f"# Trial {trials - 1}" in last, "the notes were not written"
    if kind == "postgresql":
        optuna.delete_study(study_name=study.study_name, storage=storage.optuna)
    return {
        "ms_median": statistics.median(costs),
        "ms_mean": statistics.fmean(costs),
        "ms_last5": statistics.fmean(costs[-5:]),
        "trials": trials,
        "epochs": epochs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--backends", nargs="+", default=["sqlite", "journal", "postgresql", "redis"])
    parser.add_argument("--postgresql", default="postgresql+psycopg2://postgres@127.0.0.1:5432/test")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    tag = uuid.uuid4().hex[:8]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        urls = {
            "sqlite": f"sqlite:///{Path(tmp) / 'bench.db'}",
            "journal": f"journal://{Path(tmp) / 'bench.log'}",
            "postgresql": args.postgresql,
            "redis": f"{args.redis}?prefix=dlops-notes-bench-{tag}",
        }
        for kind in args.backends:
            try:
                results[kind] = run(kind, urls[kind], args.trials, args.epochs)
            except Exception as exc:  # noqa: BLE001 - a backend that is not reachable here
                results[kind] = {"error": str(exc).splitlines()[0]}
            finally:
                if kind == "redis":
                    import redis

                    client = redis.Redis.from_url(args.redis)
                    for key in client.scan_iter(f"dlops-notes-bench-{tag}*"):
                        client.delete(key)
            print(kind, json.dumps(results[kind]), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
