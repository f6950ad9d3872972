"""What a study run costs beyond training: after the first trial's collection the
survivors are frozen, so later trials' collections walk only their own objects, and a
digits study never imports scikit-learn (neither for the data nor through
optuna-dashboard, whose import loads it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.specs import tiny_workers_spec

CODE = """
import gc, json, sys
from dlops.cli import app
import dlops.runner as runner

counts = []
real = runner.freeze_survivors
def spy():
    before = gc.get_freeze_count()
    real()
    counts.append((before, gc.get_freeze_count()))
runner.freeze_survivors = spy
try:
    app(["study", "run", sys.argv[1], "--n-trials", "3", "--device", "cpu"], standalone_mode=False)
finally:
    print(json.dumps({"counts": counts, "sklearn": "sklearn" in sys.modules}))
"""


def test_survivors_frozen_once_after_the_first_trial(tmp_path: Path) -> None:
    spec = tiny_workers_spec(tmp_path)
    env = {**os.environ, "DLOPS_HOME": str(tmp_path / "home"), "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", CODE, str(spec)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    counts = result["counts"]
    assert len(counts) == 3, counts  # called after every trial
    assert counts[0][0] == 0 and counts[0][1] > 10_000, counts  # the first freezes the process's objects
    assert all(before == after for before, after in counts[1:]), counts  # later calls freeze nothing more
    assert result["sklearn"] is False  # a digits study never imports scikit-learn
    assert "│ complete      │ 3" in out.stdout, out.stdout[-1500:]
