"""Files that are never half-written: the one atomic writer (text, figures, checkpoints),
checkpoints that carry a checksum, a per-folder lock for runs that must not overlap, and
:func:`json_safe` (what is stored as JSON: final.json, a trial's user attrs).

An atomic write goes to ``NAME.tmp`` in the same folder, is flushed to disk and renamed
over ``NAME``; on any failure (a full disk, Ctrl-C) the temporary file is removed and
``NAME`` keeps its previous contents. A full disk or quota ends in one line,
:class:`DiskFull`: "no space left on device while writing PATH".

A checkpoint is a fixed-size header (magic, the sha256 and length of the payload) followed
by ``torch.save``'s payload. :func:`load_checkpoint` checks both before unpickling, so a
file truncated or garbled in place is a :class:`CorruptCheckpoint`, never silently
different numbers. Files of earlier dlops versions (a bare ``torch.save`` zip) still load,
unchecked.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import math
import os
import re
import shutil
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from dlops.errors import DlopsError

CHECKPOINT_MAGIC = b"DLOPS-CHECKPOINT 1"
HEADER_SIZE = 128
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_TORCH_WRITE_FAILURE = re.compile(r"unexpected pos|failed writing|file write failed", re.IGNORECASE)
_LOW_SPACE = 16 * 2**20  # bytes: a torch write failure on a disk this full is the disk


class DiskFull(DlopsError):
    """The disk (or quota) ran out while writing a file; nothing half-written is left."""


class WriteFailed(DlopsError):
    """A file could not be written (other than a full disk); the previous one is intact."""


class CorruptCheckpoint(DlopsError):
    """A checkpoint that does not load: truncated, garbled in place, or not a checkpoint."""


class Busy(DlopsError):
    """Another process holds the lock of the run this one would start."""


# --------------------------------------------------------------------------- JSON


def json_safe(obj: Any) -> Any:
    """NaN/inf -> null, numpy scalars -> Python, tuples -> lists, keys -> str, recursively:
    strict JSON (neither final.json nor the dashboard can parse NaN)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# --------------------------------------------------------------------------- atomic writes


def _errors(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or during (torch wraps a failed
    write of a Python file object in a RuntimeError whose context is the OSError)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def write_error(exc: BaseException, path: Path) -> DlopsError | None:
    """The one-line error for a failed write of ``path``, or None when ``exc`` is not a
    write failure (a bug, Ctrl-C: those propagate as they are)."""
    chain = list(_errors(exc))
    if any(isinstance(e, OSError) and e.errno in _NO_SPACE for e in chain):
        return DiskFull(f"no space left on device while writing {path}")
    if isinstance(exc, RuntimeError) and _TORCH_WRITE_FAILURE.search(str(exc)):
        try:
            low = shutil.disk_usage(path.parent).free < _LOW_SPACE
        except OSError:
            low = False
        if low:
            return DiskFull(f"no space left on device while writing {path}")
        return WriteFailed(f"could not write {path}: {str(exc).strip().splitlines()[-1]}")
    oserror = next((e for e in chain if isinstance(e, OSError)), None)
    if oserror is not None:
        return WriteFailed(f"could not write {path}: {oserror.strerror or oserror}")
    return None


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not every file system syncs a directory
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write ``path`` through ``write(file)`` atomically: the old file stays until the new
    one is complete and on disk. Raises :class:`DiskFull` / :class:`WriteFailed`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        stop = next((e for e in _errors(exc) if not isinstance(e, Exception)), None)
        if stop is not None and stop is not exc:
            raise stop from None  # Ctrl-C or SIGTERM inside a library that wrapped it: a stop, not a write error
        error = write_error(exc, path) if isinstance(exc, Exception) else None
        if error is None:
            raise
        raise error from None
    _fsync_dir(path.parent)
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    return write_atomic(path, lambda f: f.write(text.encode()))


# --------------------------------------------------------------------------- checkpoints


class _HashingWriter:
    """What ``torch.save`` writes to: the file, hashing and counting as it goes."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.error: BaseException | None = None  # what a write raised (torch reports it as "unexpected pos")

    def write(self, data: bytes) -> int:
        try:
            written = self.file.write(data)
        except BaseException as exc:
            self.error = exc
            raise
        self.sha256.update(data)
        self.size += len(data)
        return written

    def flush(self) -> None:
        self.file.flush()


def _header(digest: str, size: int) -> bytes:
    line = CHECKPOINT_MAGIC + f" sha256={digest} size={size}\n".encode()
    return line.ljust(HEADER_SIZE, b" ")


def save_checkpoint(obj: Any, path: Path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically, behind a header with its sha256."""
    import torch

    def write(f: BinaryIO) -> None:
        f.write(b" " * HEADER_SIZE)
        payload = _HashingWriter(f)
        try:
            torch.save(obj, payload)  # type: ignore[arg-type]  # any object with write() and flush() will do
        except Exception:
            if payload.error is not None:  # the real cause: a full disk, Ctrl-C, SIGTERM
                raise payload.error from None
            raise
        f.seek(0)
        f.write(_header(payload.sha256.hexdigest(), payload.size))

    return write_atomic(path, write)


def _check_payload(f: BinaryIO, path: Path) -> None:
    """Check the header's sha256 and length against the payload that follows it."""
    head = f.read(HEADER_SIZE)
    match = re.match(rb"DLOPS-CHECKPOINT 1 sha256=([0-9a-f]{64}) size=(\d+)\n", head)
    if match is None or len(head) < HEADER_SIZE:
        raise CorruptCheckpoint(f"checkpoint {path} has a damaged header")
    digest, size = match.group(1).decode(), int(match.group(2))
    actual = os.fstat(f.fileno()).st_size - HEADER_SIZE
    if actual != size:
        raise CorruptCheckpoint(
            f"checkpoint {path} is {'truncated' if actual < size else 'too long'} ({actual} of {size} bytes)"
        )
    sha256 = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        sha256.update(chunk)
    if sha256.hexdigest() != digest:
        raise CorruptCheckpoint(f"checkpoint {path} fails its checksum (changed or damaged on disk)")


def load_checkpoint(path: Path, map_location: Any = "cpu") -> Any:
    """The object saved by :func:`save_checkpoint` at ``path``, after checking its
    checksum. Raises :class:`CorruptCheckpoint` for anything that does not load."""
    import torch

    path = Path(path)
    try:
        with open(path, "rb") as f:
            start = f.read(len(CHECKPOINT_MAGIC))
            f.seek(0)
            if start == CHECKPOINT_MAGIC:
                _check_payload(f, path)
                f.seek(HEADER_SIZE)
            elif not start.startswith(b"PK\x03\x04"):  # an earlier version's bare torch.save zip
                raise CorruptCheckpoint(f"{path} is not a checkpoint")
            return torch.load(f, map_location=map_location, weights_only=False)
    except CorruptCheckpoint:
        raise
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated zip, bad pickle, I/O error: all "does not load"
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        raise CorruptCheckpoint(f"checkpoint {path} does not load ({reason})") from None


# --------------------------------------------------------------------------- run lock

# The descriptors of the run locks this process holds. A flock belongs to the open file,
# which a forked child shares: a child that outlived its parent (the decoding pool of a
# `data fetch` killed with SIGKILL) would keep the lock, and every later run would be
# refused in the name of the dead parent. A forked child closes its copies at once.
_held_locks: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _held_locks:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_locks.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


@contextmanager
def run_lock(path: Path, what: str, *, remove: bool = False) -> Iterator[Path]:
    """Hold an exclusive lock on ``path`` (created if need be) for the ``with`` block, or
    raise :class:`Busy` naming the process that holds it. The kernel drops the lock when
    its process ends, however it ends: a lock left by a dead process never blocks.

    With ``remove`` the file goes when the block ends (nothing is left beside the folders
    it guards). A process that opened it just before it went finds, once it holds the
    lock, that its file is no longer the one at ``path``, and takes the new one."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 400, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise Busy(f"{what} is already running ({holder}; lock {path}): wait for it to end") from None
        except OSError:
            break  # a file system without flock: run unlocked rather than not at all
        if not remove or _same_file(fd, path):
            os.ftruncate(fd, 0)
            started = datetime.now(UTC).isoformat(timespec="seconds")
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n".encode(), 0)
            break
        os.close(fd)  # its holder ended and removed it: lock the file at ``path`` now
    _held_locks.add(fd)
    owner = os.getpid()
    try:
        yield path
    finally:
        if os.getpid() == owner:  # a forked child leaving the block holds nothing (closed at the fork)
            if remove:
                with contextlib.suppress(OSError):
                    path.unlink()  # still held: whoever opens the old file sees it is gone
            _held_locks.discard(fd)
            os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


@contextmanager
def signals_held() -> Iterator[list[int]]:
    """SIGINT and SIGTERM wait until the block is done (a swap of folders that must not stop
    half-way): the list it gives holds the signals that came meanwhile, once the previous
    handlers are back, for the caller to deliver as its own stop."""
    pending: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield pending
        return
    previous = {
        sig: signal.signal(sig, lambda signum, frame: pending.append(signum)) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield pending
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is (as Ctrl-C raises KeyboardInterrupt)."""

    signum = signal.SIGTERM


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM stops the block the way Ctrl-C does (:class:`Terminated`, a KeyboardInterrupt:
    every ``finally`` and ``with`` cleans up) instead of killing the process without a word."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


_RENAME_EXCHANGE = 2  # renameat2(2) flag: swap two paths in one step (Linux)


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap the folders ``a`` and ``b`` in one step (``renameat2`` with ``RENAME_EXCHANGE``);
    False where the system cannot, and nothing has moved."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    return bool(renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0)


def process_stat(pid: int) -> tuple[str, str] | None:
    """(state letter, start time in clock ticks since boot) of ``pid`` from ``/proc``; None
    where it cannot tell (no such process, no /proc). The start time tells a process from a
    later one that reuses its pid."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], fields[19]


def process_gone(pid: int, started: str | None) -> bool:
    """Whether the process ``pid`` of this machine, started at ``started`` (clock ticks since
    boot, :func:`process_stat`; None: unknown), is provably gone: no such process, a zombie,
    or its pid now taken by a later process. False while it may run."""
    stat = process_stat(pid)
    if stat is None:
        if Path("/proc/self/stat").exists():
            return True  # /proc works and has no such pid
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False
    state, now = stat
    if state in ("Z", "X"):
        return True  # killed, not yet reaped by its parent
    return bool(started) and now != started  # the pid now belongs to another process


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def process_identity() -> dict[str, Any]:
    """This process, as another process of any machine can later tell whether it still runs
    (:func:`identity_gone`): host, boot id, pid and the pid's start time."""
    stat = process_stat(os.getpid())
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": os.getpid(), "started": stat[1] if stat else None}


def identity_gone(owner: dict[str, Any]) -> bool | None:
    """True when the process ``owner`` (:func:`process_identity`) is provably gone, False
    while it may run, None when it ran on another machine (nothing here can tell)."""
    if owner.get("host") != socket.gethostname():
        return None
    boot = _boot_id()
    if owner.get("boot") and boot and owner["boot"] != boot:
        return True  # this machine rebooted since: every process of then is gone
    return process_gone(int(owner["pid"]), owner.get("started"))
