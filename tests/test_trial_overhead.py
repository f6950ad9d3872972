"""What a study run costs beyond training: after the first trial's collection the
survivors are frozen, so later trials' collections walk only their own objects, and a
digits study never imports scikit-learn (neither for the data nor through
optuna-dashboard, whose import loads it)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.specs import tiny_workers_spec

CODE = """
import gc, json, sys
from dlops.cli import app

calls = []
freeze, unfreeze = gc.freeze, gc.unfreeze
def spy_freeze():
    calls.append(("freeze", gc.get_freeze_count(), len(study_trials())))
    freeze()
def spy_unfreeze():
    calls.append(("unfreeze", gc.get_freeze_count(), len(study_trials())))
    unfreeze()
def study_trials():
    import optuna
    from dlops.paths import default_storage_url
    try:
        return optuna.load_study(study_name="tiny-workers", storage=default_storage_url()).trials
    except KeyError:
        return []
gc.freeze, gc.unfreeze = spy_freeze, spy_unfreeze
try:
    app(["study", "run", sys.argv[1], "--n-trials", "3", "--device", "cpu"], standalone_mode=False)
finally:
    print(json.dumps({"calls": calls, "frozen_at_exit": gc.get_freeze_count(), "sklearn": "sklearn" in sys.modules}))
"""


def test_survivors_frozen_after_the_first_trial_until_the_run_ends(tmp_path: Path) -> None:
    spec = tiny_workers_spec(tmp_path)
    env = {**os.environ, "DLOPS_HOME": str(tmp_path / "home"), "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", CODE, str(spec)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    calls = result["calls"]
    # frozen once, after the first trial (nothing frozen before), handed back when the run ended
    assert [c[0] for c in calls] == ["freeze", "unfreeze"], calls
    assert calls[0][1] == 0 and calls[0][2] == 1, calls
    assert calls[1][1] > 10_000 and calls[1][2] == 3, calls
    assert result["frozen_at_exit"] == 0
    assert result["sklearn"] is False  # a digits study never imports scikit-learn
    assert re.search(r"│ complete +│ 3 ", out.stdout), out.stdout[-1500:]


FAILING = """
import sys
import dlops.trainers.resnet as resnet
from dlops.cli import app

def fit(*args, **kwargs):
    if sys.argv[2] == "oom":
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 360000000000 bytes. Error code 12")
    return 1 / 0
resnet.fit = fit
app(["study", "run", sys.argv[1], "--n-trials", "2", "--device", "cpu"])
"""


def test_a_failed_trial_is_one_line_and_only_a_bug_prints_its_traceback(tmp_path: Path) -> None:
    """Each failed trial ends in dlops's line; Optuna's own warnings (its traceback, then
    "failed with value None") are not printed. Running out of memory is explained in that
    line; an error dlops cannot name prints its traceback once per trial, on stderr."""
    spec = tiny_workers_spec(tmp_path)
    env = {**os.environ, "DLOPS_HOME": str(tmp_path / "home"), "PYTHONPATH": str(Path(__file__).parents[1])}
    for kind in ("oom", "bug"):
        out = subprocess.run(
            [sys.executable, "-c", FAILING, str(spec), kind], capture_output=True, text=True, env=env, timeout=120
        )
        assert out.returncode == 2, out.stderr[-2000:]
        assert "failed with" not in out.stdout + out.stderr  # Optuna's warnings
        ends = [line for line in out.stdout.splitlines() if re.match(r"trial +\d+  failed: ", line)]
        assert len(ends) == 2, out.stdout
        if kind == "oom":
            assert all(
                line.endswith(
                    "failed: out of memory (tried to allocate 360000000000 bytes): a smaller model or batch size "
                    "needs less"
                )
                for line in ends
            ), ends
            assert "Traceback" not in out.stderr
        else:
            assert all(line.endswith("failed: ZeroDivisionError: division by zero") for line in ends), ends
            assert out.stderr.count("Traceback (most recent call last)") == 2, out.stderr
            assert 'File "<string>"' in out.stderr and "ZeroDivisionError: division by zero" in out.stderr
        assert out.stderr.strip().splitlines()[-1].startswith("error: 2 trials failed in this run; giving up")
