"""Stopping a run well: SIGINT/SIGTERM end a trial at its next epoch end, the run says how
it stands and prints the command that continues it, and exits 128 + the signal."""

from __future__ import annotations

import os
import shlex
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

from dlops.storage import mask_url
from dlops.studies import StudyResult
from dlops.text import plural

SIGNAL_NAMES: dict[int, str] = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class TrialInterrupted(Exception):
    """SIGINT/SIGTERM reached a trial at an epoch end: it stops there, its checkpoint stays."""


class TrialTakenOver(Exception):
    """This worker's trial was finished by another one while this worker stalled (its
    heartbeat went stale and it was failed and queued again): its retry trains it; this
    worker drops it, without a traceback."""


def taken_over(trial_number: int) -> TrialTakenOver:
    return TrialTakenOver(
        f"trial {trial_number}: failed and queued again while this worker stalled (no heartbeat for the "
        "grace period); its retry trains it, dropped here"
    )


def interrupted(trial_number: int, epoch: int) -> TrialInterrupted:
    """The exception that stops trial ``trial_number`` after ``epoch`` (0-based) on a
    signal; Optuna records it FAIL (``runner.optuna_failures_quiet`` keeps its log quiet)."""
    return TrialInterrupted(f"interrupted after epoch {epoch + 1}")


SAME_STOP_S = 2.0  # a worker takes the same signal again this soon for the same stop


class GracefulStop:
    """SIGINT/SIGTERM: the first asks the current trial to stop at its next epoch end (its
    checkpoint stays, the trial is recorded FAIL and queued again to resume); a second one
    stops at once (KeyboardInterrupt, which Optuna also records as FAIL).

    ``same_stop_within`` (seconds; a worker of a ``--workers`` run): the same signal again
    that soon is the same stop, not a second one. A scheduler that signals every process of
    a job (Slurm, systemd) reaches each worker directly and through ``dlops``, which passes
    its signal on: that is one stop, and the epoch in progress is finished."""

    def __init__(self, label: str = "", same_stop_within: float = 0.0) -> None:
        self.signum: int | None = None
        self.label = label
        self.same_stop_within = same_stop_within
        self._first = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNAL_NAMES:
                self._previous[sig] = signal.signal(sig, self._handle)
            # A worker process starts with these blocked (see run_workers): a signal that came
            # while it was starting up is delivered now, to the handler.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, set(SIGNAL_NAMES))
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            if signum == self.signum and time.monotonic() - self._first < self.same_stop_within:
                return  # the same stop, delivered twice (directly and passed on by dlops)
            raise KeyboardInterrupt
        self.signum, self._first = signum, time.monotonic()
        # A worker takes the same signal within same_stop_within for this one: say when a
        # second one counts.
        later = f" {self.same_stop_within:g} s or more from now" if self.same_stop_within else ""
        # os.write: print() is not safe inside a signal handler.
        os.write(
            2,
            f"{self.label}{SIGNAL_NAMES.get(signum, signum)}: stopping after this epoch "
            f"(the trial is kept to resume); send it again{later} to stop now\n".encode(),
        )


def exit_code(signum: int) -> int:
    return 128 + signum


def stopped_message(result: StudyResult, argv: Sequence[str]) -> str:
    """What a stopped run says: where the study stands and the command that continues it."""
    name = signal.Signals(result.interrupted).name if result.interrupted else "a signal"
    running = result.counts.get("RUNNING", 0)
    left = f"{plural(running, 'trial')} RUNNING in other workers" if running else "no trial left RUNNING"
    if result.n_trials is None:  # --total-trials: the same command goes on to the same total
        remaining: int | None = (result.target or 0) - result.finished
        head = f"stopped by {name}: the study has {result.finished} of {result.target} finished trials, {left}"
        done = "; the study has all the trials this run asked for."
    else:
        remaining = result.n_trials - result.added
        head = f"stopped by {name}: this run finished {result.added} of its {result.n_trials} trials, {left}"
        done = "; this run added all the trials it asked for."
    if remaining is not None and remaining <= 0:
        return head + done
    queued = "; interrupted trials are queued to resume from their checkpoints" if result.counts.get("WAITING") else ""
    return (
        head
        + queued
        + ". To continue:\n  "
        + continue_command(argv, remaining if result.n_trials is not None else None)
    )


def continue_command(argv: Sequence[str], remaining: int | None) -> str:
    """The command line ``argv`` with ``--n-trials`` set to ``remaining`` (None: as it was,
    for ``--total-trials``), passwords masked."""

    if remaining is None:
        return mask_url(" ".join(shlex.quote(a) for a in argv))
    args, i = list(argv), 0
    out: list[str] = []
    while i < len(args):
        a = args[i]
        if a == "--n-trials":
            i += 2
            continue
        if a.startswith("--n-trials="):
            i += 1
            continue
        out.append(a)
        i += 1
    out += ["--n-trials", str(remaining)]
    return mask_url(" ".join(shlex.quote(a) for a in out))
