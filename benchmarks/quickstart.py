"""The README's quickstart, timed: ``dlops study run --loss ce --dataset digits --n-trials 6
--epochs 4`` in a fresh ``DLOPS_HOME`` each time, as it runs now and as it ran before its
start-up was trimmed (the same code, made to pay the old costs: scikit-learn imported for
the digits, optuna-dashboard imported for the notes, and no freezing of the first trial's
survivors, so every later trial's collection walks torch's and Optuna's objects again).
The two alternate, so a busy machine slows both alike; the figure is the ratio of medians.

    python benchmarks/quickstart.py --repeats 3

Prints wall and CPU seconds per run and writes ``benchmarks/results/quickstart.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMAND = ["study", "run", "--loss", "ce", "--dataset", "digits", "--n-trials", "6", "--epochs", "4"]

RUN = """
import sys
if sys.argv[1] == "before":
    import sklearn.datasets, optuna_dashboard  # noqa: F401  what the digits and the notes imported
    import dlops.runner
    dlops.runner.SurvivorFreeze.__call__ = lambda self: None
from dlops.cli import app
app(sys.argv[2:], prog_name="dlops")
"""


def one(variant: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "DLOPS_HOME": home, "PYTHONPATH": str(ROOT)}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", RUN, variant, *COMMAND], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise SystemExit(f"{variant}: exit {out.returncode}\n{out.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quickstart.json"))
    args = ap.parse_args(argv)
    runs: dict[str, list[dict[str, float]]] = {"before": [], "now": []}
    for i in range(args.repeats):
        for variant in ("before", "now"):
            run = one(variant)
            runs[variant].append(run)
            print(f"repeat {i + 1} {variant:>6}: {run['wall_s']:.2f} s wall, {run['cpu_s']:.2f} s CPU")
    median = {v: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "cpu_s")} for v, rs in runs.items()}
    ratio = median["now"]["wall_s"] / median["before"]["wall_s"]
    print(
        f"median wall: before {median['before']['wall_s']:.2f} s, now {median['now']['wall_s']:.2f} s "
        f"(now/before {ratio:.3f}); CPU {median['before']['cpu_s']:.2f} s -> {median['now']['cpu_s']:.2f} s"
    )
    result = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "dlops " + " ".join(COMMAND),
        "threads": os.environ.get("OMP_NUM_THREADS", "torch default"),
        "cpus": os.cpu_count(),
        "runs": runs,
        "median": median,
        "wall_now_over_before": round(ratio, 3),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
