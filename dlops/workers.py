"""Many workers, one study: worker processes, dead-worker recovery and graceful stops.

``run_workers(spec, options, n)`` runs one study with ``n`` worker processes on this
machine (``n == 1`` runs in this process). Every worker is an ordinary
:func:`dlops.search.run_study` that shares the run's trial count; the same command on
another machine with the same PostgreSQL or Redis URL joins the same study.

A worker records who runs each trial (host, boot id, pid and the pid's start time) in the
trial's system attrs. A RUNNING trial whose worker ran on this machine and is gone (no such
pid, a different process now holds the pid, a zombie, or the machine has rebooted since) is
proven dead: it is marked FAIL and re-queued, and the retry resumes from the trial's last
checkpoint. Trials of workers on other machines are recovered by Optuna's heartbeats on
PostgreSQL; the journal storages have none, so there a dead worker on another machine leaves
its trial RUNNING (shown by ``dlops study show``; it does not block other workers).
"""

from __future__ import annotations

import math
import os
import pickle
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from dlops.errors import DlopsError, StorageError
from dlops.storage import RETRY_LIMIT, StudyStorage, connect, journal_url, mask_url, sqlite_path, storage_kind
from dlops.text import plural

OWNER_KEY = "dlops:worker"  # trial system attr: who runs it
SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}

Say = Callable[[str], None]


# --- who runs a trial, and proving that worker dead ------------------------------------


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state letter, start time in clock ticks since boot) of ``pid``, or None where unknown."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], fields[19]


def worker_identity() -> dict[str, Any]:
    stat = _proc_stat(os.getpid())
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": os.getpid(), "started": stat[1] if stat else None}


def is_dead(owner: dict[str, Any]) -> bool | None:
    """True when the worker ``owner`` is provably gone, False when it runs, None when it
    ran on another machine (nothing here can tell)."""
    if owner.get("host") != socket.gethostname():
        return None
    boot = _boot_id()
    if owner.get("boot") and boot and owner["boot"] != boot:
        return True  # this machine rebooted since: every process of then is gone
    pid = int(owner["pid"])
    stat = _proc_stat(pid)
    if stat is None:
        if Path("/proc/self/stat").exists():
            return True  # /proc works and has no such pid
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    state, started = stat
    if state in ("Z", "X"):
        return True  # killed, not yet reaped by its parent
    return bool(owner.get("started")) and started != owner["started"]  # pid reused by another process


def retry_trial(study: optuna.Study, trial: FrozenTrial, max_retry: int | None = RETRY_LIMIT) -> None:
    """Queue a WAITING copy of a failed ``trial`` (same params) the way Optuna's heartbeat
    retry does, so ``RetryHeartbeatStaleTrialCallback.retried_trial_number`` names the original."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)(study, trial)


def recover_dead_trials(study: optuna.Study, storage: StudyStorage, say: Say | None = None,
                        trials: Sequence[FrozenTrial] | None = None) -> list[int]:
    """Fail and re-queue the RUNNING trials whose workers are provably dead; with heartbeats
    on, also those whose heartbeat went stale (Optuna's ``fail_stale_trials``, whose
    ``RetryHeartbeatStaleTrialCallback`` re-queues them). Returns the numbers of the trials
    failed here (heartbeat-failed ones included). ``trials``: the study's trials, if at hand."""
    recovered = []
    if trials is None:
        trials = study.get_trials(deepcopy=False)
    running = [t for t in trials if t.state == TrialState.RUNNING]
    if storage.heartbeat and running:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        now = [storage.optuna.get_trial(t._trial_id) for t in running]
        stale = [t.number for t in now if t.state == TrialState.FAIL]
        recovered += stale
        running = [t for t in now if t.state == TrialState.RUNNING]
        if say and stale:
            say(f"{'trial' if len(stale) == 1 else 'trials'} {', '.join(map(str, stale))}: no heartbeat for the "
                "grace period; marked FAIL and queued again")
    for t in running:
        owner = t.system_attrs.get(OWNER_KEY)
        if not owner or is_dead(owner) is not True:
            continue
        reason = f"worker pid {owner['pid']} on {owner['host']} died during the trial; re-queued"
        try:
            storage.optuna.set_trial_user_attr(t._trial_id, "stopped_reason", reason)
            if not storage.optuna.set_trial_state_values(t._trial_id, TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
        retry_trial(study, storage.optuna.get_trial(t._trial_id))
        recovered.append(t.number)
        if say:
            say(f"trial {t.number}: its worker (pid {owner['pid']}) is gone; marked FAIL and queued again")
    return recovered


def worth_waiting_for(trial: FrozenTrial, storage: StudyStorage) -> bool:
    """A RUNNING trial that will end by itself: its worker lives here, or heartbeats will
    fail it if its worker on another machine dies."""
    owner = trial.system_attrs.get(OWNER_KEY)
    if not owner:
        return False
    alive = is_dead(owner)
    return alive is False or (alive is None and storage.heartbeat)


# --- graceful stop ----------------------------------------------------------------------


class GracefulStop:
    """SIGINT/SIGTERM: the first asks the current trial to stop at its next epoch end (its
    checkpoint stays, the trial is recorded FAIL and queued again to resume); a second one
    stops at once (KeyboardInterrupt, which Optuna also records as FAIL)."""

    def __init__(self, label: str = "") -> None:
        self.signum: int | None = None
        self.label = label
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "GracefulStop":
        import threading

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
            raise KeyboardInterrupt
        self.signum = signum
        # os.write: print() is not safe inside a signal handler.
        os.write(2, f"{self.label}{SIGNAL_NAMES.get(signum, signum)}: stopping after this epoch "
                    "(the trial is kept to resume); send it again to stop now\n".encode())


def exit_code(signum: int) -> int:
    return 128 + signum


def stopped_message(result: Any, argv: Sequence[str]) -> str:
    """What a stopped run says: where the study stands and the command that continues it."""
    name = signal.Signals(result.interrupted).name if result.interrupted else "a signal"
    running = result.counts.get("RUNNING", 0)
    left = f"{plural(running, 'trial')} RUNNING in other workers" if running else "no trial left RUNNING"
    if getattr(result, "n_trials", None) is None:  # --total-trials: the same command goes on to the same total
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
    return head + queued + ". To continue:\n  " + continue_command(
        argv, remaining if getattr(result, "n_trials", None) is not None else None)


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


# --- worker processes ----------------------------------------------------------------------


def plan_workers(n: int, device: str, gpus: Sequence[str] | None = None, cpus: int | None = None) -> list[dict[str, str]]:
    """The environment of each of ``n`` workers: one GPU each (round robin over the visible
    ones, when the device may be CUDA) and an equal share of the CPU threads."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if gpus is None:  # an explicit cuda:K pins every worker to that GPU: leave it alone
        gpus = visible_gpus() if device in ("auto", "cuda") else []
    share = max(1, cpus // n)
    asked = os.environ.get("OMP_NUM_THREADS", "")
    threads = str(min(share, int(asked)) if asked.isdigit() and int(asked) > 0 else share)
    plans = []
    for i in range(n):
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "DLOPS_TORCH_THREADS": threads}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        plans.append(env)
    return plans


def visible_gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed:
        return [g.strip() for g in listed.split(",") if g.strip()][: torch.cuda.device_count()]
    return [str(i) for i in range(torch.cuda.device_count())]


@dataclass
class _Payload:
    spec: Any
    options: Any
    run: Any  # dlops.search.RunSlot, shared by the run's workers
    worker: int
    workers: int


def run_workers(
    spec: Any,
    options: Any,
    workers: int = 1,
    *,
    on_epoch: Callable[[int, int, dict[str, float]], None] | None = None,
    say: Say | None = None,
) -> Any:
    """Run ``options.n_trials`` (or the spec's) more finished trials of ``spec``'s study
    with ``workers`` processes (or, with ``options.total_trials``, work until the study has
    that many). Returns :class:`dlops.search.StudyResult`."""

    from dlops.paths import default_storage_url
    from dlops.search import (FINISHED, RunSlot, StudyResult, check_run, join_run, last_failure, objective_note,
                              open_study, run_study, run_target, run_trials_finished, state_counts, summarize,
                              study_counts_line)

    say = say or (lambda msg: None)
    if workers < 1:
        raise DlopsError(f"--workers must be at least 1, got {workers}")
    if workers == 1:
        return run_study(spec, options, on_epoch, say=say)

    n_trials, total = run_target(spec, options)
    asked = spec.for_dataset(options.dataset)
    spec = check_run(spec, options)  # device, data, classes: before any storage or file is touched
    url = options.storage or default_storage_url()
    if storage_kind(url) == "sqlite":
        journal = (sqlite_path(url) or Path("dlops.db")).with_suffix(".log").absolute()
        raise StorageError(
            f"SQLite ({mask_url(url)}) takes one worker at a time (parallel writers get \"database is locked\"); "
            f"for {workers} workers use --storage {journal_url(journal)} (this machine) "
            "or postgresql+psycopg2://user@host/db (many machines)"
        )
    note = objective_note(asked, spec)
    if note:
        say(note)
    storage = connect(url, heartbeat_interval=options.heartbeat_interval, grace_period=options.grace_period)
    name = options.study_name_for(spec)
    counts = study_counts(storage, name, spec, options)
    finished = sum(counts.get(s.name, 0) for s in FINISHED)
    target = total if total is not None else finished + n_trials
    with storage.lock(name):  # one index per run, its workers share it
        run = RunSlot(uuid.uuid4().hex, join_run(open_study(spec, options, storage), storage))
    say(study_counts_line(name, storage, counts, n_trials, target, workers, total=total))

    plans = plan_workers(workers, options.device or "auto")
    if "CUDA_VISIBLE_DEVICES" in plans[0]:
        say("GPUs: " + ", ".join(f"w{i} -> {p['CUDA_VISIBLE_DEVICES']}" for i, p in enumerate(plans))
            + f"; {plural(int(plans[0]['OMP_NUM_THREADS']), 'CPU thread')} each")
    else:
        say(f"{workers} workers, {plural(int(plans[0]['OMP_NUM_THREADS']), 'CPU thread')} each")

    procs: list[subprocess.Popen] = []
    received: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        for p in procs:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signum)
                except ProcessLookupError:
                    pass

    previous = {sig: signal.signal(sig, forward) for sig in SIGNAL_NAMES}
    # Workers inherit SIGINT/SIGTERM blocked and unblock them once their handler is in
    # place: a stop sent while a worker imports torch is not a traceback.
    signal.pthread_sigmask(signal.SIG_BLOCK, set(SIGNAL_NAMES))
    try:
        for i, plan in enumerate(plans):
            env = {**os.environ, **plan}
            # Own session: a Ctrl-C in the terminal reaches this process only, which passes
            # it on once (a second Ctrl-C is passed on again: stop now).
            p = subprocess.Popen([sys.executable, "-m", "dlops.workers"], stdin=subprocess.PIPE, env=env,
                                 start_new_session=True)
            procs.append(p)
            # The payload (with the storage URL) goes through a pipe: not argv, not a file.
            assert p.stdin is not None
            p.stdin.write(pickle.dumps(_Payload(spec, options, run, i, workers)))
            p.stdin.close()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, set(SIGNAL_NAMES))
        reported: set[int] = set()
        while any(p.poll() is None for p in procs) or len(reported) < len(procs):
            for i, p in enumerate(procs):
                code = p.poll()
                if code is None or i in reported:
                    continue
                reported.add(i)
                if code < 0:
                    sig = signal.Signals(-code).name
                    say(f"worker w{i} (pid {p.pid}) was killed by {sig}; the others re-queue the trial it was running")
                elif code not in (0, 130, 143):
                    say(f"worker w{i} (pid {p.pid}) exited with code {code}")
            time.sleep(0.1)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, set(SIGNAL_NAMES))
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    study = optuna.load_study(study_name=name, storage=storage.optuna)
    codes = [p.returncode for p in procs]
    interrupted = received[0] if received else None
    if interrupted is None:
        stopped = [c for c in codes if c in (130, 143)]
        interrupted = stopped[0] - 128 if stopped else None
    counts_now = state_counts(study)
    added = run_trials_finished(study, run.run_id)
    done = sum(counts_now[s.name] for s in FINISHED)
    stand = (f"the study has {done} of {target} finished trials" if total is not None
             else f"this run added {added} of its {n_trials} finished trials")
    reason = last_failure(study, run.run_id)
    stand += f"; the last failed trial: {reason}" if reason else ""
    if interrupted is None and all(c != 0 for c in codes):
        raise DlopsError(f"all {workers} workers failed (exit codes {codes}, see their error lines above); {stand}")
    gave_up = [f"w{i}" for i, c in enumerate(codes) if c > 0 and c not in (130, 143)]
    if interrupted is None and gave_up:
        raise DlopsError(f"worker(s) {', '.join(gave_up)} failed (exit codes {codes}, see their error lines above); "
                         f"{stand}")
    return StudyResult(study=study, counts=counts_now, best=summarize(study)["best"], interrupted=interrupted,
                       target=target, n_trials=n_trials, added=added)


def study_counts(storage: StudyStorage, name: str, spec: Any = None, options: Any = None) -> dict[str, int]:
    """Trial counts by state of study ``name`` ({} when it does not exist yet); with
    ``spec`` and ``options``, first checks that this run may join it."""
    try:
        study = optuna.load_study(study_name=name, storage=storage.optuna)
    except KeyError:
        return {}
    from dlops.search import check_same_objective, state_counts

    if spec is not None and study.get_trials(deepcopy=False):
        check_same_objective(study, spec, options)
    return state_counts(study)


def worker_main() -> int:
    """Entry of a worker process: the payload arrives on stdin."""
    payload: _Payload = pickle.loads(sys.stdin.buffer.read())
    prefix = f"[w{payload.worker}] "
    threads = int(os.environ.get("DLOPS_TORCH_THREADS", "0"))
    import torch

    if threads:
        torch.set_num_threads(threads)

    from dlops.search import run_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # dlops prints its own progress
    metric = payload.spec.metric

    def say(msg: str) -> None:
        print(prefix + mask_url(msg), flush=True)

    def on_epoch(trial: int, epoch: int, m: dict[str, float]) -> None:
        say(f"trial {trial:>3}  epoch {epoch + 1:>3}  train_loss {m.get('train_loss', float('nan')):.4f}  "
            f"{metric} {m[metric]:.4f}  ({m.get('epoch_seconds', float('nan')):.1f}s)")

    options = replace(payload.options)
    try:
        result = run_study(payload.spec, options, on_epoch, say=say, run=payload.run,
                           worker=payload.worker, workers=payload.workers, announce=False, label=prefix)
    except DlopsError as exc:
        say(f"error: {exc}")
        return exc.exit_code
    except Exception:  # noqa: BLE001 - a bug or a storage outage: show it, without passwords
        import traceback

        sys.stderr.write(mask_url(traceback.format_exc()))
        return 1
    if result.interrupted:
        return exit_code(result.interrupted)
    return 0


def failure_budget(n_trials: int, workers: int) -> int:
    """Failed trials one worker tolerates before it gives up (a broken setup must not loop)."""
    return max(2, math.ceil(n_trials / max(workers, 1)))


if __name__ == "__main__":
    code = worker_main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # everything is stored; skip the slow interpreter teardown (torch, sklearn)
