"""``benchmarks/throughput.py`` at tiny sizes on the CPU: every timed step is a full batch,
and a run cut short (the device script's stage limit) leaves its eager figures and their
projection on disk, whole."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("throughput", ROOT / "benchmarks" / "throughput.py")
assert _spec is not None and _spec.loader is not None
throughput = importlib.util.module_from_spec(_spec)
sys.modules["throughput"] = throughput
_spec.loader.exec_module(throughput)

TINY = ["--device", "cpu", "--smoke", "--steps", "2", "--repeats", "1", "--warmup", "1"]


@pytest.mark.parametrize("pk", [False, True], ids=["shuffled", "pk"])
def test_the_timed_loader_gives_only_full_batches(pk: bool) -> None:
    # 20,000 images at batch 512 leave 32 over: a short batch inside the timed steps would
    # recompile a compiled model (then running dynamic shapes) and autotune cuDNN again.
    split = throughput.synthetic_split(20 * 32 + 5, 8, 20, 0)
    loader = throughput.loader_for(split, 32, torch.device("cpu"), 20, pk)
    batches = [len(y) for _x, y in loader]
    assert batches == [32] * 20


class Cut(Exception):
    """The stage's time limit, arriving while the model compiles."""


def test_a_run_cut_while_compiling_keeps_the_eager_figures_and_their_projection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "throughput.json"

    def compile_cut_short(model: torch.nn.Module) -> torch.nn.Module:
        raise Cut

    monkeypatch.setattr(throughput, "compile_model", compile_cut_short)
    with pytest.raises(Cut):
        throughput.main(
            [*TINY, "--losses", "ce,triplet", "--batch-sizes", "16", "--modes", "compiled,eager", "--json", str(out)]
        )
    tp = json.loads(out.read_text())
    assert not (tmp_path / "throughput.json.tmp").exists()
    assert {(r["loss"], r["mode"]) for r in tp["train"]} == {("ce", "eager"), ("triplet", "eager")}
    assert {r["mode"] for r in tp["eval"]} == {"eager"}
    assert [(p["loss"], p["mode"]) for p in tp["projection"]] == [("ce", "eager"), ("triplet", "eager")]
    for p in tp["projection"]:
        assert math.isfinite(p["epoch_s"]) and p["epoch_s"] > 0
        assert p["loader_share"] and p["loader_share"] > 0  # the loader of the same batch size was timed
    assert tp["projection"][0]["step_vs_ce"] == pytest.approx(1.0)
