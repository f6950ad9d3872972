"""The GPU machine's script, rehearsed on the CPU: every stage of
``benchmarks/device_run.sh --smoke`` runs at tiny sizes (about 2-3 minutes on 2 cores), so
the script cannot rot between GPU runs. With the Tiny ImageNet sample the studies and
curves run on a 10-class subset of it; without, the script skips the fetch with its
reason and they run on digits."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sqlite3
import subprocess
import sys
import tarfile
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
    assert re.fullmatch(r"14 skipped in [\d.]+s", summary["cuda_tests"])  # pytest -m cuda skips on the CPU
    assert "no CUDA GPU visible" in log  # ...with the reason
    assert summary["versions"]["cuda_available"] is False and summary["versions"]["packages"]["optuna"]
    assert summary["versions"]["dlops"]["from"] == str(ROOT / "dlops")  # the checkout's code, not a copy

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
    assert {s["dataset"] for s in summary["studies"].values()} == {expected_dataset}  # the figures say their data
    assert summary["versions"]["commit"]

    curves = json.loads((out / "curves.json").read_text())
    assert list(curves) == ["ce", "triplet", "center"]
    for loss, run in curves.items():
        h = run["history"]
        assert len(h["val_top5"]) == 2 and all(math.isfinite(v) for v in h["train_loss"]), (loss, h)
        assert run["config"]["dataset"] == expected_dataset
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _full_call(out: Path, parts: Path, state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """One device call of ``device_full.sh --smoke``: the parts that came with it in ``parts``."""
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "DLOPS_FULL_STATE": str(state),
        "DLOPS_FULL_PARTS": str(parts),
    }
    env.pop("DLOPS_HOME", None)
    env.pop("DLOPS_STORAGE", None)
    return subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "device_full.sh"), str(out), "--smoke", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )


@pytest.mark.device_rehearsal
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_full_data_script_joins_parts_over_calls_and_runs_what_is_left(tmp_path: Path) -> None:
    """``benchmarks/device_full.sh`` on the CPU: the archive in three parts over three calls (one
    damaged on the way and sent again), then the reference runs, one call finishing what the
    last one left. The real sample where there is one, else a small tree in the same layout."""
    from data_trees import write_tiny_imagenet, zip_tree

    if TINY_IMAGENET_SAMPLE.exists():
        archive = TINY_IMAGENET_SAMPLE
    else:
        archive = zip_tree(write_tiny_imagenet(tmp_path / "tree", classes=4, train_per_class=10), tmp_path / "t.zip")
    part_mib = archive.stat().st_size / 2.5 / 2**20  # three parts
    cut = tmp_path / "cut"
    split = [sys.executable, str(ROOT / "benchmarks" / "device_parts.py"), "split", str(archive), str(cut)]
    subprocess.run([*split, "--part-mib", str(part_mib)], check=True)
    state = tmp_path / "state"

    def carry(call: str, names: list[str]) -> Path:
        folder = tmp_path / call
        folder.mkdir()
        for name in ["MANIFEST.json", *names]:
            (folder / name).write_bytes((cut / name).read_bytes())
        return folder

    # Call 1: part-01 and a damaged part-02. Only part-01 is kept; nothing runs yet.
    first = carry("call1", ["part-01", "part-02"])
    (first / "part-02").write_bytes(b"\0" + (first / "part-02").read_bytes()[1:])
    done = _full_call(tmp_path / "out1", first, state)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "parts this call: part-01; REJECTED (size or md5): part-02" in log
    assert "waiting for parts: 1 of 3 here; missing part-02, part-03" in log
    assert not (state / "home").exists()

    # Call 2: the other parts: joined, checked, fetched; two runs of two epochs.
    done = _full_call(tmp_path / "out2", carry("call2", ["part-02", "part-03"]), state, "--runs", "ce,original")
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert f"joined 3 parts, {archive.stat().st_size:,} bytes" in log
    reports = state / "home" / "reports"
    ce = json.loads((reports / "resnet18-ce" / "final.json").read_text())
    original = json.loads((reports / "resnet18-ce-original" / "final.json").read_text())
    assert ce["params"]["lr"] == json.loads((ROOT / "benchmarks/reference-params/resnet18-ce.json").read_text())["lr"]
    assert ce["dataset"]["name"] == original["dataset"]["name"] == "tiny-imagenet"
    assert (original["config"]["lr_schedule"], original["config"]["augment"]) == ("constant", False)
    assert len(ce["per_seed"][0]["history"]["val_top5"]) == 2  # the rehearsal's --epochs 2 (default)

    # Call 3, no parts: what is done stays done; the run not done yet runs.
    done = _full_call(tmp_path / "out3", tmp_path / "nothing", state, "--runs", "ce,triplet,original")
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "== ce: done in an earlier call" in log and "== original: done in an earlier call" in log
    assert "== triplet: done" in log
    assert json.loads((reports / "resnet18-ce" / "final.json").read_text())["created"] == ce["created"]

    out = tmp_path / "out3"
    files = sorted(p.name for p in out.iterdir())
    assert files == ["results.tar.gz", "run.log", "summary.json", "summary.md"]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["run"] for r in summary["runs"]] == ["ce", "triplet", "original"]
    assert all(r["done"] and 0 <= r["test_top5"] <= 1 and r["epochs"] == 2 for r in summary["runs"])
    assert summary["archive"]["md5"] == hashlib.md5(archive.read_bytes()).hexdigest()
    table = (out / "summary.md").read_text()
    assert "| original | resnet18-ce-original | lr 0.001" in table
    run_log = (out / "run.log").read_text()
    assert run_log.count("dlops full-data runs:") == 3  # every call's log, kept across calls
    with tarfile.open(out / "results.tar.gz") as tar:
        names = set(tar.getnames())
    assert {f"home/reports/resnet18-{r}/{f}" for r in ("ce", "triplet") for f in ("final.json", "curves.png")} <= names


@pytest.mark.device_rehearsal
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_hanging_stage_is_cut_so_that_the_stages_after_it_still_run(tmp_path: Path) -> None:
    """The stage limits add up to more than the budget: a stage that hangs (here the CUDA
    tests) is cut where it would eat the floors of the stages after it, not at its own limit,
    and the study after it still runs."""
    wrapper = tmp_path / "python"
    wrapper.write_text(
        "#!/usr/bin/env bash\n"
        'if [ "$1 $2" = "-m pytest" ]; then echo hanging; sleep 600; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    wrapper.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(wrapper), "OMP_NUM_THREADS": "1"}
    env.pop("DLOPS_HOME", None)
    env.pop("DLOPS_STORAGE", None)
    budget = 75  # 15 s kept for the summary; the study's floor (30 s) and the fetch's (20 s) held back
    stages = "cuda_tests,fetch,study_ce"
    script = str(ROOT / "benchmarks" / "device_run.sh")
    done = subprocess.run(
        ["bash", script, str(out), "--smoke", "--budget-s", str(budget), "--stages", stages],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    log = done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    status = {s["stage"]: s for s in summary["stages"]}
    assert status["cuda_tests"]["status"] == "timeout", log[-4000:]
    assert status["cuda_tests"]["seconds"] < budget - 15 - 20 - 30 + 12, log[-4000:]  # its share, not its 90 s
    assert status["fetch"]["status"] in ("ok", "skipped")  # skipped without the sample: digits then
    assert status["study_ce"]["status"] == "ok", log[-4000:]
    assert done.returncode == 1  # a stage timed out
