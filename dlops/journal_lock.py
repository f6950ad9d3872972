"""The append lock of a journal file storage: Optuna's ``<journal>.lock``, which names its
owner when a dlops process holds it, so that a lock left by a killed one goes at once.

Optuna appends to a journal file under a lock made by creating ``<journal>.lock``
exclusively (its default, :class:`~optuna.storages.journal.JournalFileSymlinkLock`, makes a
symbolic link there; :class:`~optuna.storages.journal.JournalFileOpenLock` a file with
``O_CREAT | O_EXCL``) and released by renaming it away and removing it. Such a lock records
no owner: one left by a process killed while appending (SIGKILL, a power cut) blocks every
writer until its 30 s grace period has passed with the lock unchanged, and is then forced.

:class:`OwnedJournalLock` takes the same path the same way (``O_CREAT | O_EXCL``: a link
made by plain Optuna or optuna-dashboard and this file exclude each other) and writes its
owner into it: host, boot id, pid and the pid's start time (:func:`dlops.io.process_identity`)
and a token of this hold. A writer that finds the lock held by a process of this machine
that is provably gone removes it at once and says so on stderr. Every other lock (plain
Optuna's, a dlops lock of another machine, one whose owner is still being written or runs)
keeps Optuna's grace period, and plain Optuna treats a dlops lock as its own.

Removing a dead owner's lock is done under ``flock`` on the journal file, so that two
dlops writers never both break it (the second would take the first one's new lock for the
dead one): the one that comes second reads the lock again and finds its new owner alive.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from optuna.logging import get_logger
from optuna.storages.journal import JournalFileOpenLock

from dlops.io import identity_gone, process_identity

GRACE_PERIOD_S = 30  # Optuna's default: an ownerless lock unchanged this long is forced
OWNER_BYTES = 4096  # an owner record is far shorter; a longer file is not one

_logger = get_logger("optuna.storages.journal._file")  # Optuna's own warnings, in its words


def read_owner(path: Path) -> dict[str, Any] | None:
    """The owner a dlops writer recorded in the lock file ``path``; None for a lock without
    one (plain Optuna's link, which is not followed: it points at the journal; a file still
    being written; no lock at all)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        data = os.read(fd, OWNER_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        owner = json.loads(data) if 0 < len(data) <= OWNER_BYTES else None
    except ValueError:
        return None
    if not isinstance(owner, dict) or not isinstance(owner.get("pid"), int) or not owner.get("token"):
        return None
    return owner


class OwnedJournalLock(JournalFileOpenLock):
    """Optuna's ``O_EXCL`` journal append lock at ``<journal>.lock`` (its path, its grace
    period), holding its owner (module doc)."""

    def __init__(self, journal: str | Path, grace_period: int = GRACE_PERIOD_S) -> None:
        super().__init__(str(journal), grace_period)
        self._journal = Path(journal)
        self._lock_path = Path(self._lock_file)
        self._token: str | None = None

    def acquire(self) -> bool:
        """Create the lock, waiting while another process holds it: a dead dlops owner of
        this machine is removed at once, any other lock forced once unchanged for the grace
        period (as Optuna does)."""
        sleep_s, warning_interval = 0.001, 10.0
        last_change = last_warning = time.monotonic()
        mtime: float | None = None
        while True:
            if self._create():
                return True
            if self._break_dead_owner():
                sleep_s = 0.001
                continue
            now = time.monotonic()
            if now - last_warning > warning_interval:
                _logger.warning(
                    f"It is taking longer than {warning_interval} seconds to acquire the lock file: "
                    f"{self._lock_file} Retrying..."
                )
                last_warning = now
            try:
                current = os.stat(self._lock_path).st_mtime  # plain Optuna's link: the journal's
            except OSError:
                continue  # released meanwhile: try again at once
            if current != mtime:
                mtime, last_change = current, now
            if self.grace_period is not None and now - last_change > self.grace_period:
                _logger.warning(
                    "The existing lock file has not been released for an extended period. "
                    "Forcibly releasing the lock file."
                )
                last_warning = now
                with contextlib.suppress(FileNotFoundError):
                    self._remove(self._lock_path)
                sleep_s = 0.001
                continue
            time.sleep(sleep_s)
            sleep_s = min(sleep_s * 2, 1.0)

    def _create(self) -> bool:
        """Create the lock file exclusively with this hold's owner in it; False where it exists."""
        token = uuid.uuid4().hex
        try:
            fd = os.open(self._lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, json.dumps({**process_identity(), "token": token}).encode())
        except BaseException:
            # not held after all (a full disk, a signal): the lock must not stay behind
            os.close(fd)
            self._remove(self._lock_path)
            raise
        os.close(fd)
        self._token = token
        return True

    def _break_dead_owner(self) -> bool:
        """Remove the lock if its owner is a process of this machine that is gone; True if
        it did (or the lock went meanwhile)."""
        owner = read_owner(self._lock_path)
        if owner is None or identity_gone(owner) is not True:
            return False
        try:
            fd = os.open(self._journal, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            os.close(fd)
            return False  # no flock here (some network file systems): the grace period then
        try:
            again = read_owner(self._lock_path)
            if again is None or again.get("token") != owner["token"]:
                return again is None and not os.path.lexists(self._lock_path)
            moved = self._move_aside(self._lock_path)
            if moved is None:
                return True
            if read_owner(moved) != owner:
                # Replaced between the two reads (plain Optuna forced the dead one after its
                # grace period and took it): put it back, unless a lock is there again.
                with contextlib.suppress(OSError):
                    os.link(moved, self._lock_path)
                os.unlink(moved)
                return False
            os.unlink(moved)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        sys.stderr.write(
            f"journal {self._journal}: removed its append lock {self._lock_file}, left by pid {owner['pid']} "
            "of this machine, which is gone (killed while appending)\n"
        )
        sys.stderr.flush()
        return True

    def release(self) -> None:
        """Remove the lock, as Optuna does (renamed away, then removed), unless it is no
        longer this hold's (forced by another process after the grace period)."""
        token, self._token = self._token, None
        if token is not None and (read_owner(self._lock_path) or {}).get("token") != token:
            return  # gone, or another process's lock now (plain Optuna's link too): leave it
        try:
            self._remove(self._lock_path)
        except FileNotFoundError:
            raise RuntimeError("Error: did not possess lock") from None  # as Optuna says

    @staticmethod
    def _move_aside(path: Path) -> Path | None:
        """Rename ``path`` to a name of its own (so no other process's remove can take it);
        None where it is gone."""
        aside = path.with_name(f"{path.name}{uuid.uuid4()}.rename")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return None
        return aside

    @classmethod
    def _remove(cls, path: Path) -> None:
        aside = cls._move_aside(path)
        if aside is None:
            raise FileNotFoundError(errno.ENOENT, "no lock", str(path))
        os.unlink(aside)
