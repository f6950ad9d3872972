"""The GPU machine's script, rehearsed on the CPU: every stage of
``benchmarks/device_run.sh --smoke`` runs at tiny sizes (about 2-3 minutes on 2 cores), so
the script cannot rot between GPU runs. With the Tiny ImageNet sample the studies and
curves run on a 10-class subset of it; without, the script skips the fetch with its
reason and they run on digits."""

from __future__ import annotations

import json
import math
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_IMAGENET_SAMPLE

ROOT = Path(__file__).resolve().parents[1]
STAGES = [
    "install",
    "versions",
    "cuda_tests",
    "throughput",
    "fetch",
    "study_ce",
    "study_triplet",
    "study_center",
    "curves",
]


@pytest.mark.device_rehearsal
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_device_script_rehearses_every_stage_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "out"
    sample = TINY_IMAGENET_SAMPLE if TINY_IMAGENET_SAMPLE.exists() else tmp_path / "no-sample.zip"
    env = {**os.environ, "PYTHON": sys.executable, "DLOPS_TINY_IMAGENET_SAMPLE": str(sample), "OMP_NUM_THREADS": "1"}
    env.pop("DLOPS_HOME", None)
    env.pop("DLOPS_STORAGE", None)
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "device_run.sh"), str(out), "--smoke"],
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
        cwd=tmp_path,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]

    # What the device tool brings back: at most 8 plain files with plain names.
    files = sorted(p.name for p in out.iterdir())
    assert all(p.is_file() for p in out.iterdir()) and len(files) <= 8, files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)
    assert set(files) == {
        "run.log",
        "summary.json",
        "throughput.json",
        "studies.db",
        "curves.json",
        "curves.png",
        "logs.tar.gz",
    }
    assert (out / "run.log").read_text().strip() == done.stdout.strip()  # the whole console, kept
    assert "SUMMARY" in "\n".join(done.stdout.splitlines()[-25:])  # the table comes last

    summary = json.loads((out / "summary.json").read_text())
    status = {s["stage"]: s["status"] for s in summary["stages"]}
    assert list(status) == STAGES
    with_sample = TINY_IMAGENET_SAMPLE.exists()
    assert status == {s: ("skipped" if s == "fetch" and not with_sample else "ok") for s in STAGES}
    if not with_sample:
        assert "no Tiny ImageNet sample at" in log
    assert re.fullmatch(r"12 skipped in [\d.]+s", summary["cuda_tests"])  # pytest -m cuda skips on the CPU
    assert "no CUDA GPU visible" in log  # ...with the reason
    assert summary["versions"]["cuda_available"] is False and summary["versions"]["packages"]["optuna"]

    tp = json.loads((out / "throughput.json").read_text())
    assert tp["meta"]["smoke"] is True
    assert {(r["loss"], r["batch_size"]) for r in tp["train"]} == {
        (ln, b) for ln in ("ce", "triplet", "center") for b in (16, 32)
    }
    assert all(r["images_per_s"] > 0 for r in tp["train"] + tp["loader"] + tp["eval"])
    assert [p["loss"] for p in tp["projection"]] == ["ce", "triplet", "center"]
    assert all(p["epoch_s"] > 0 for p in tp["projection"])

    with sqlite3.connect(out / "studies.db") as db:
        names = dict(db.execute("select study_id, study_name from studies").fetchall())
        finished = db.execute(
            "select study_id, count(*) from trials where state in ('COMPLETE', 'PRUNED') group by study_id"
        ).fetchall()
        configs = [
            json.loads(v) for (v,) in db.execute("select value_json from trial_user_attributes where key = 'config'")
        ]
    assert sorted(names.values()) == ["device-ce", "device-center", "device-triplet"]
    assert sorted(n for _, n in finished) == [4, 4, 4]
    expected_dataset = "tiny-imagenet" if with_sample else "digits"
    assert {c["dataset"] for c in configs} == {expected_dataset} and {c["width"] for c in configs} == {8}

    curves = json.loads((out / "curves.json").read_text())
    assert list(curves) == ["ce", "triplet", "center"]
    for loss, run in curves.items():
        h = run["history"]
        assert len(h["val_top5"]) == 2 and all(math.isfinite(v) for v in h["train_loss"]), (loss, h)
        assert run["config"]["dataset"] == expected_dataset
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
