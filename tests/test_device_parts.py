"""``benchmarks/device_parts.py``: a file cut into parts for several device calls comes back
byte for byte, a damaged or foreign part is refused by name, and every call's carry list
stays within the limit."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("device_parts", ROOT / "benchmarks" / "device_parts.py")
assert _spec is not None and _spec.loader is not None
parts = importlib.util.module_from_spec(_spec)
sys.modules["device_parts"] = parts
_spec.loader.exec_module(parts)

MiB = 1024 * 1024


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    path = tmp_path / "data.zip"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, size=int(2.5 * MiB), dtype=np.uint8).tobytes())
    return path


def _carry(src: Path, names: list[str], call: Path) -> Path:
    """What one device call brings: the manifest and some parts."""
    call.mkdir(parents=True)
    for name in [parts.MANIFEST, *names]:
        (call / name).write_bytes((src / name).read_bytes())
    return call


def test_parts_sent_over_several_calls_join_to_the_same_bytes(tmp_path: Path, archive: Path) -> None:
    manifest = parts.split(archive, tmp_path / "out", part_mib=1)
    assert [p["name"] for p in manifest["parts"]] == ["part-01", "part-02", "part-03"]
    assert [p["size"] for p in manifest["parts"]] == [MiB, MiB, MiB // 2]
    assert manifest["md5"] == hashlib.md5(archive.read_bytes()).hexdigest()

    state, whole = tmp_path / "state", tmp_path / "joined.zip"
    assert parts.collect(_carry(tmp_path / "out", ["part-03"], tmp_path / "c1"), state) == (["part-03"], [])
    code, message = parts.join(state, whole)
    assert code == parts.MISSING and message.endswith("1 of 3 here; missing part-01, part-02")
    assert not whole.exists()

    parts.collect(_carry(tmp_path / "out", ["part-01", "part-02"], tmp_path / "c2"), state)
    code, message = parts.join(state, whole)
    assert code == 0 and "joined 3 parts" in message
    assert whole.read_bytes() == archive.read_bytes()
    assert not list(state.glob("part-*"))  # one copy on the machine's disk: the whole file
    assert parts.join(state, whole)[0] == 0  # a later call finds it whole


def test_a_damaged_part_is_refused_by_name_and_the_good_ones_kept(tmp_path: Path, archive: Path) -> None:
    parts.split(archive, tmp_path / "out", part_mib=1)
    call = _carry(tmp_path / "out", ["part-01", "part-02"], tmp_path / "c1")
    damaged = bytearray((call / "part-02").read_bytes())
    damaged[1000] ^= 0xFF
    (call / "part-02").write_bytes(bytes(damaged))
    kept, rejected = parts.collect(call, tmp_path / "state")
    assert (kept, rejected) == (["part-01"], ["part-02"])
    assert not (tmp_path / "state" / "part-02").exists() and not (call / "part-02").exists()
    assert parts.join(tmp_path / "state", tmp_path / "joined.zip")[1].endswith("missing part-02, part-03")


def test_parts_of_another_file_replace_the_old_ones_instead_of_mixing(tmp_path: Path, archive: Path) -> None:
    parts.split(archive, tmp_path / "old", part_mib=1)
    state = tmp_path / "state"
    parts.collect(_carry(tmp_path / "old", ["part-01", "part-02"], tmp_path / "c1"), state)
    archive.write_bytes(archive.read_bytes()[::-1])  # a rebuilt archive: other bytes, same size
    parts.split(archive, tmp_path / "new", part_mib=1)
    parts.collect(_carry(tmp_path / "new", ["part-03"], tmp_path / "c2"), state)
    assert sorted(p.name for p in state.glob("part-*")) == ["part-03"]
    assert json.loads((state / parts.MANIFEST).read_text())["md5"] == hashlib.md5(archive.read_bytes()).hexdigest()


def test_a_joined_file_that_does_not_match_is_not_kept(tmp_path: Path, archive: Path) -> None:
    parts.split(archive, tmp_path / "out", part_mib=1)
    state = tmp_path / "state"
    parts.collect(_carry(tmp_path / "out", ["part-01", "part-02", "part-03"], tmp_path / "c1"), state)
    manifest = json.loads((state / parts.MANIFEST).read_text())
    manifest["md5"] = "0" * 32  # the parts check out, the whole does not
    (state / parts.MANIFEST).write_text(json.dumps(manifest))
    code, message = parts.join(state, tmp_path / "joined.zip")
    assert code == 1 and "expected 000" in message and not (tmp_path / "joined.zip").exists()


def test_each_call_carries_at_most_the_limit_and_the_wheels_go_with_the_last_part(
    tmp_path: Path, archive: Path
) -> None:
    folder = tmp_path / "device" / "full"
    parts.split(archive, folder, part_mib=0.75)  # 4 parts: 0.75, 0.75, 0.75, 0.25 MiB
    wheels = tmp_path / "device" / "wheels"
    wheels.mkdir()
    (wheels / "a.whl").write_bytes(b"x" * (MiB // 2))
    calls = parts.plan(folder, [wheels], limit_mib=1.7, base_bytes=MiB // 10)
    names = [[Path(p).name for p in call] for call in calls]
    assert names == [
        ["part-01", "part-02", parts.MANIFEST],
        ["part-03", "part-04", parts.MANIFEST, "wheels"],
    ]
    for call in calls:
        size = sum(sum(f.stat().st_size for f in Path(p).rglob("*")) or Path(p).stat().st_size for p in call)
        assert size + MiB // 10 <= 1.7 * MiB
    # Wheels that do not fit beside the last part get a call of their own.
    (wheels / "b.whl").write_bytes(b"x" * (MiB // 2))
    assert [Path(p).name for p in parts.plan(folder, [wheels], limit_mib=1.7, base_bytes=MiB // 10)[-1]] == [
        parts.MANIFEST,
        "wheels",
    ]


def test_the_device_install_brings_wheels_only_and_leaves_dlops_to_the_checkout(tmp_path: Path) -> None:
    """An installed copy of dlops in the site folder would shadow the checkout that the GPU
    run is meant to test (and once lacked a subpackage): the install stage puts none there."""
    import subprocess

    wheels, target = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "device_helpers.py"), "install", "--wheels", str(wheels),
         "--target", str(target)],
        capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 wheels brought along" in done.stdout
    assert sorted(p.name for p in target.iterdir()) == []
