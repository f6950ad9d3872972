"""The one atomic writer and the checksummed checkpoints (dlops/io.py): a full disk is one
line naming the path and leaves the previous file whole and no temporary file; a
checkpoint truncated or garbled in place is caught before it is used."""

from __future__ import annotations

import builtins
import errno
import shutil
from types import SimpleNamespace

import pytest
import torch

from dlops import io as dlops_io
from dlops.io import CorruptCheckpoint, DiskFull, WriteFailed, load_checkpoint, save_checkpoint, write_text_atomic
from dlops.trainers.resnet import TrainConfig, fit

UNEXPECTED_POS = "[enforce fail at inline_container.cc:672] . unexpected pos 4704 vs 598"


class _FailingFile:
    """A file that raises ``error`` once ``limit`` bytes are written (a full disk, or a
    signal arriving in the middle of a write)."""

    def __init__(self, f, limit: int, error: BaseException) -> None:
        self.f, self.limit, self.error, self.written = f, limit, error, 0

    def write(self, data: bytes) -> int:
        if self.written + len(data) > self.limit:
            raise self.error
        self.written += len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


def failing_after(monkeypatch: pytest.MonkeyPatch, limit: int, error: BaseException) -> None:
    """Every file dlops.io writes fails after ``limit`` bytes."""

    def failing_open(path: str, mode: str) -> _FailingFile:
        return _FailingFile(builtins.open(path, mode), limit, error)

    monkeypatch.setattr(dlops_io, "open", failing_open, raising=False)


def state(value: float) -> dict:
    return {"epoch": 3, "weights": torch.full((1000,), value)}


def test_a_full_disk_mid_checkpoint_is_one_line_and_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt" / "trial-0.pt"
    save_checkpoint(state(1.0), path)
    before = path.read_bytes()
    failing_after(monkeypatch, 2000, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(DiskFull) as info:
        save_checkpoint(state(2.0), path)
    assert str(info.value) == f"no space left on device while writing {path}"
    assert sorted(p.name for p in path.parent.iterdir()) == ["trial-0.pt"]  # no .tmp left
    assert path.read_bytes() == before
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["weights"], torch.full((1000,), 1.0))


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        RuntimeError(UNEXPECTED_POS),  # torch's own words for a short write, on a disk with no space left
    ],
)
def test_torch_save_failing_on_a_full_disk_is_disk_full(tmp_path, monkeypatch, error):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(state(1.0), path)

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half of a zip")
        raise error

    monkeypatch.setattr(torch, "save", failing_save)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=10**9, used=10**9 - 4096, free=4096))
    with pytest.raises(DiskFull, match=f"^no space left on device while writing {path}$"):
        save_checkpoint(state(2.0), path)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["weights"], torch.full((1000,), 1.0))


def test_a_signal_in_the_middle_of_a_checkpoint_stops_and_is_no_write_error(tmp_path, monkeypatch):
    """torch.save reports any exception of the file it writes as "unexpected pos": a
    Ctrl-C (or SIGTERM, raised the same way by dlops final) must stay a stop."""
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(state(1.0), path)
    failing_after(monkeypatch, 2000, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(state(2.0), path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    assert torch.equal(load_checkpoint(path)["weights"], torch.full((1000,), 1.0))


def test_a_torch_write_failure_with_space_left_names_the_path(tmp_path, monkeypatch):
    def failing_save(obj, f, *args, **kwargs):
        raise RuntimeError(UNEXPECTED_POS)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(WriteFailed, match=r"could not write .*checkpoint\.pt: .*unexpected pos"):
        save_checkpoint(state(1.0), tmp_path / "checkpoint.pt")
    assert not list(tmp_path.iterdir())


def test_text_writes_are_atomic_too(tmp_path, monkeypatch):
    """A full disk often shows only when the data is flushed to it (delayed allocation)."""
    path = tmp_path / "final.json"
    write_text_atomic(path, '{"a": 1}\n')

    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dlops_io.os, "fsync", fsync)
    with pytest.raises(DiskFull, match=f"^no space left on device while writing {path}$"):
        write_text_atomic(path, '{"a": 2}\n')
    monkeypatch.undo()
    assert path.read_text() == '{"a": 1}\n' and [p.name for p in tmp_path.iterdir()] == ["final.json"]


def test_a_truncated_or_garbled_checkpoint_is_caught(tmp_path):
    path = tmp_path / "trial-0.pt"
    save_checkpoint({"weights": torch.arange(20000, dtype=torch.float32)}, path)
    good = path.read_bytes()
    assert load_checkpoint(path)["weights"][-1] == 19999

    path.write_bytes(good[:5000])  # truncate -s 5000
    with pytest.raises(CorruptCheckpoint, match="truncated"):
        load_checkpoint(path)
    garbled = bytearray(good)
    garbled[len(good) // 2] ^= 0xFF  # one byte of the tensor data, same size: torch.load alone would load it
    path.write_bytes(bytes(garbled))
    with pytest.raises(CorruptCheckpoint, match="fails its checksum"):
        load_checkpoint(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CorruptCheckpoint, match="not a checkpoint"):
        load_checkpoint(path)


def test_a_checkpoint_of_an_earlier_version_still_loads(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"epoch": 1}, path)  # a bare torch.save zip, as dlops wrote before checksums
    assert load_checkpoint(path) == {"epoch": 1}


def test_fit_refuses_a_damaged_checkpoint_in_one_line(tmp_path, dlops_home):
    config = TrainConfig(dataset="digits", width=8, subset_per_class=5, epochs=1, batch_size=32, device="cpu")
    ckpt = tmp_path / "c.pt"
    fit(config, checkpoint_path=ckpt)
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match="fails its checksum"):
        fit(config.replace(epochs=2), checkpoint_path=ckpt)


def test_a_run_lock_is_not_kept_by_a_forked_child_that_outlives_its_holder(tmp_path) -> None:
    """A process forked while a run lock is held (the decoding pool of `dlops data fetch`)
    must not keep the lock once its holder is killed hard (SIGKILL, no cleanup): the next
    fetch would be refused in the name of the dead holder for as long as the child lives."""
    import multiprocessing
    import os
    import signal
    import time

    from dlops.io import run_lock

    path = tmp_path / ".x.lock"
    read_end, write_end = os.pipe()

    def holder() -> None:
        with run_lock(path, "another x", remove=True):
            child = os.fork()
            if child == 0:  # a pool worker: lives on after its parent
                time.sleep(120)
                os._exit(0)
            os.write(write_end, f"{child}\n".encode())
            os.kill(os.getpid(), signal.SIGKILL)

    process = multiprocessing.get_context("fork").Process(target=holder)
    process.start()
    process.join(60)
    child = int(os.read(read_end, 100))
    try:
        assert process.exitcode == -signal.SIGKILL
        os.kill(child, 0)  # the child outlived its parent: it still runs
        with run_lock(path, "another x", remove=True):
            pass
    finally:
        os.kill(child, signal.SIGKILL)
        os.close(read_end)
        os.close(write_end)


def test_a_removable_run_lock_goes_with_its_holder_and_refuses_a_second_holder(tmp_path, monkeypatch) -> None:
    import fcntl
    import os

    from dlops.io import Busy, run_lock

    path = tmp_path / "d" / ".x.lock"
    with run_lock(path, "another x", remove=True):
        assert f"pid {os.getpid()}" in path.read_text()
        busy = r"another x is already running \(pid \d+ on .*; lock .*\.x\.lock\)"
        with pytest.raises(Busy, match=busy), run_lock(path, "another x", remove=True):
            pass
        assert path.exists()  # a refused second holder does not remove the first one's lock
    assert not path.exists()

    # A process that opened the file just before its holder ended and removed it, and locks
    # it only then, holds a file no longer at ``path``: it must take the file at ``path``
    # instead, or a third process could lock a new file there beside it.
    real_flock, calls = fcntl.flock, []

    def flock_after_the_holder_removed_it(fd: int, operation: int) -> None:
        if not calls:
            path.unlink()  # the holder ends between this process's open and its flock
        calls.append(fd)
        real_flock(fd, operation)

    path.write_text("pid 1 on elsewhere\n")
    monkeypatch.setattr(fcntl, "flock", flock_after_the_holder_removed_it)
    with run_lock(path, "another x", remove=True):
        monkeypatch.setattr(fcntl, "flock", real_flock)
        assert len(calls) == 2 and f"pid {os.getpid()}" in path.read_text()
        with pytest.raises(Busy), run_lock(path, "another x", remove=True):
            pass
    assert not path.exists()
