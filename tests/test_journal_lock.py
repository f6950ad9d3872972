"""The journal file's append lock (``dlops/journal_lock.py``): a lock left by a dlops writer
killed while holding it goes at once; every other lock keeps Optuna's grace period, and
plain Optuna (optuna-dashboard, a script) and dlops exclude each other."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages.journal import JournalFileSymlinkLock

from dlops.io import process_identity
from dlops.journal_lock import OwnedJournalLock, read_owner
from dlops.storage import connect, journal_url

REPO = str(Path(__file__).resolve().parents[1])

HOLD = """
import sys, time
from dlops.storage import connect
storage = connect(sys.argv[1])
storage.optuna._backend._lock.acquire()  # the lock every append of this storage takes
print("held", flush=True)
time.sleep(600)
"""


def _journal(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "study.log"
    url = journal_url(path)
    optuna.create_study(study_name="s", storage=connect(url).optuna)
    return path, url


def _killed_holder(url: str) -> int:
    """A dlops process that takes the journal's append lock and is SIGKILLed holding it;
    its pid (reaped: gone)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, url], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    return holder.pid


def test_a_lock_left_by_a_killed_dlops_writer_goes_at_once(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """It named no owner: the next append waited Optuna's 30 s grace period, then forced it."""
    path, url = _journal(tmp_path)
    pid = _killed_holder(url)
    lock = Path(f"{path}.lock")
    owner = read_owner(lock)
    assert owner is not None and owner["pid"] == pid  # the killed process's, left behind
    study = optuna.load_study(study_name="s", storage=connect(url, create=False).optuna)
    started = time.monotonic()
    study.set_user_attr("after", "the kill")  # one append
    assert time.monotonic() - started < 5
    assert not lock.exists()
    assert optuna.load_study(study_name="s", storage=connect(url).optuna).user_attrs == {"after": "the kill"}
    err = capfd.readouterr().err
    assert f"removed its append lock {lock}, left by pid {pid} of this machine, which is gone" in err


def _owner_file(lock: Path, owner: dict) -> None:
    lock.write_text(json.dumps({**owner, "token": "an-earlier-hold"}))


def _acquired_after(lock: OwnedJournalLock | JournalFileSymlinkLock, seconds: float) -> tuple[bool, threading.Thread]:
    """Acquire ``lock`` in a thread; whether it had done so ``seconds`` later."""
    done = threading.Event()
    thread = threading.Thread(target=lambda: (lock.acquire(), done.set()), daemon=True)
    thread.start()
    return done.wait(seconds), thread


@pytest.mark.parametrize(
    "left",
    ["plain optuna", "another machine", "alive here", "being written"],
)
def test_every_other_lock_keeps_optunas_grace_period(tmp_path: Path, left: str) -> None:
    """Only a dead owner of this machine is broken at once: plain Optuna's lock (a link to the
    journal, no owner), a dlops lock of another machine (its pid means nothing here), one of
    a process that runs, one whose owner is not written yet: each is forced only once
    unchanged for the grace period, as Optuna does."""
    path, url = _journal(tmp_path)
    lock = Path(f"{path}.lock")
    dead = _killed_holder(url)
    lock.unlink()  # (left by the killed holder: this test puts its own lock there)
    if left == "plain optuna":
        os.symlink(path, lock)  # what JournalFileSymlinkLock leaves
    elif left == "another machine":
        _owner_file(lock, {**process_identity(), "host": "another-machine", "pid": dead})
    elif left == "alive here":
        _owner_file(lock, process_identity())
    else:
        lock.write_text("")
    grace = 3
    acquired, thread = _acquired_after(OwnedJournalLock(path, grace_period=grace), 1.5)
    assert not acquired and os.path.lexists(lock)
    started = time.monotonic()
    thread.join(timeout=30)
    assert not thread.is_alive() and time.monotonic() - started + 1.5 >= grace
    assert read_owner(lock) is not None and read_owner(lock)["pid"] == os.getpid()  # its own lock now


def test_plain_optuna_and_dlops_exclude_each_other(tmp_path: Path) -> None:
    """Same path, exclusive creation both ways: Optuna's default link lock waits for a dlops
    lock file and takes it once released, and the other way round; Optuna forces a dead
    dlops writer's lock after its grace period as it forces its own."""
    path, url = _journal(tmp_path)
    ours = OwnedJournalLock(path)
    ours.acquire()
    acquired, thread = _acquired_after(JournalFileSymlinkLock(str(path)), 1.0)
    assert not acquired
    ours.release()
    thread.join(timeout=10)
    assert not thread.is_alive() and Path(f"{path}.lock").is_symlink()  # plain Optuna's now

    second = OwnedJournalLock(path)
    acquired, thread = _acquired_after(second, 1.0)
    assert not acquired  # a link without an owner: not broken
    JournalFileSymlinkLock(str(path)).release()
    thread.join(timeout=10)
    assert not thread.is_alive() and read_owner(Path(f"{path}.lock")) is not None
    second.release()
    assert not os.path.lexists(f"{path}.lock")

    _killed_holder(url)
    started = time.monotonic()
    JournalFileSymlinkLock(str(path), grace_period=3).acquire()
    assert 3 <= time.monotonic() - started < 15
