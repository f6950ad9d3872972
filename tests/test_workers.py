"""Many workers, one study: shared storages, dead workers, graceful stops.

The storage tests run against the real PostgreSQL (127.0.0.1:5432, trust auth) and Redis
(127.0.0.1:6379) that .ci/run starts; each test uses its own study name / key prefix and
removes it afterwards. Worker runs are real ``dlops study run`` processes on tiny trials
(ResNet18 width 8 on 10-30 digits per class).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from dlops.liveness import OWNER_KEY, is_dead, recover_dead_trials, worker_identity, worth_waiting_for
from dlops.objective import RunOptions, checkpoint_path
from dlops.runner import open_study, plan_workers, prepare_study, run_study
from dlops.spec import load_spec
from dlops.storage import StudyStorage, connect
from specs import tiny_workers_spec

PG = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
PG_PASSWORD = "postgresql+psycopg2://postgres:s3cret@127.0.0.1:5432/test"  # trust auth ignores the password
REDIS = "redis://127.0.0.1:6379/0"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def _pg_missing() -> str | None:
    try:
        import psycopg2

        psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="test", connect_timeout=3).close()
    except Exception as exc:  # noqa: BLE001
        return f"PostgreSQL is not reachable on 127.0.0.1:5432 ({str(exc).strip().splitlines()[0]}); .ci/run starts it"
    return None


def _redis_missing() -> str | None:
    try:
        import redis

        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=3).ping()
    except Exception as exc:  # noqa: BLE001
        return f"Redis is not reachable on 127.0.0.1:6379 ({exc}); .ci/run starts it"
    return None


PG_MISSING, REDIS_MISSING = _pg_missing(), _redis_missing()
requires_pg = pytest.mark.skipif(PG_MISSING is not None, reason=PG_MISSING or "")
requires_redis = pytest.mark.skipif(REDIS_MISSING is not None, reason=REDIS_MISSING or "")


class Backend:
    """One storage under test, with its own namespace and cleanup."""

    def __init__(self, kind: str, tmp_path: Path, password: bool = False):
        self.kind, self.tag = kind, uuid.uuid4().hex[:10]
        self.study_name = f"w-{self.tag}"
        if kind == "postgresql":
            self.url = PG_PASSWORD if password else PG
        elif kind == "redis":
            self.url = (
                f"redis://:s3cret@127.0.0.1:6379/0?prefix=dlops-test-{self.tag}"
                if password
                else f"{REDIS}?prefix=dlops-test-{self.tag}"
            )
        else:
            self.url = f"journal://{tmp_path / 'journal' / 'study.log'}"

    def storage(self, **kwargs) -> StudyStorage:
        return connect(self.url, **kwargs)

    def study(self) -> optuna.Study:
        return optuna.load_study(study_name=self.study_name, storage=self.storage().optuna)

    def cleanup(self) -> None:
        if self.kind == "postgresql":
            try:
                optuna.delete_study(study_name=self.study_name, storage=self.storage().optuna)
            except KeyError:
                pass
        elif self.kind == "redis":
            import redis

            client = redis.Redis(host="127.0.0.1", port=6379)
            for key in client.scan_iter(f"dlops-test-{self.tag}*"):
                client.delete(key)


BACKENDS = [
    pytest.param("postgresql", marks=requires_pg),
    "journal",
    pytest.param("redis", marks=requires_redis),
]


@pytest.fixture
def backend(request: pytest.FixtureRequest, tmp_path: Path):
    b = Backend(request.param, tmp_path, password=True)
    yield b
    b.cleanup()


def wait_until(predicate, timeout: float = 120, every: float = 0.02):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out waiting")


# --- pure parts ----------------------------------------------------------------------------


def test_each_worker_gets_its_gpu_and_a_share_of_the_cpu_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    plans = plan_workers(4, "auto", gpus=["2", "5"], cpus=16)
    assert [p["CUDA_VISIBLE_DEVICES"] for p in plans] == ["2", "5", "2", "5"]
    assert {p["OMP_NUM_THREADS"] for p in plans} == {"4"}
    cpu_only = plan_workers(3, "cpu", cpus=2)
    assert all("CUDA_VISIBLE_DEVICES" not in p for p in cpu_only) and {p["OMP_NUM_THREADS"] for p in cpu_only} == {"1"}
    assert all("CUDA_VISIBLE_DEVICES" not in p for p in plan_workers(2, "cuda:1", cpus=8))  # pinned by the user
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # a lower limit set by the user stays
    assert {p["OMP_NUM_THREADS"] for p in plan_workers(2, "cpu", cpus=16)} == {"2"}


def test_a_worker_is_proven_dead_only_on_this_machine() -> None:
    me = worker_identity()
    assert is_dead(me) is False
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    gone = {**me, "pid": child.pid, "started": None}
    assert is_dead(gone) is True
    assert is_dead({**me, "started": "1"}) is True  # our pid, but another process's start time: reused pid
    assert is_dead({**me, "boot": "an-earlier-boot"}) is True  # the machine rebooted since
    assert is_dead({**me, "host": "another-machine"}) is None


def test_sqlite_is_refused_for_several_workers(tmp_path: Path, dlops_home: Path) -> None:
    from typer.testing import CliRunner

    from dlops.cli import app

    result = CliRunner().invoke(
        app, ["study", "run", str(tiny_workers_spec(tmp_path)), "--workers", "3", "--device", "cpu"]
    )
    assert result.exit_code == 2, result.output
    assert "SQLite" in result.output and "database is locked" in result.output and "journal://" in result.output
    assert len(result.output.strip().splitlines()) == 1  # one line: the run's header does not come first
    assert (
        not (dlops_home / "dlops.db").exists()
        or optuna.get_all_study_names(f"sqlite:///{dlops_home / 'dlops.db'}") == []
    )


# --- the shared-storage machinery, without training -------------------------------------------


@pytest.mark.filterwarnings(
    "ignore::optuna.exceptions.ExperimentalWarning"
)  # catch_warnings is per process, not thread
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_workers_starting_at_once_enqueue_one_baseline(backend: Backend, tmp_path: Path, dlops_home: Path) -> None:
    spec = load_spec(str(tiny_workers_spec(tmp_path)))
    options = RunOptions(storage=backend.url, study_name=backend.study_name)
    barrier, errors = threading.Barrier(4), []

    def join(worker: int) -> None:
        try:
            storage = backend.storage()
            study = open_study(spec, options, storage, worker)
            barrier.wait(timeout=120)
            with storage.lock(study.study_name):
                prepare_study(study, spec, options)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
            barrier.abort()  # the others stop waiting for this one

    # One connection first, in this thread: SQLAlchemy imports parts of itself on first use, and
    # four threads doing that at once can see a module half imported (dlops's workers are processes).
    backend.storage()
    threads = [threading.Thread(target=join, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not [e for e in errors if not isinstance(e, threading.BrokenBarrierError)], errors
    assert not errors
    trials = backend.study().get_trials()
    assert len(trials) == 1 and trials[0].state == TrialState.WAITING and trials[0].user_attrs["baseline"] is True


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_runs_starting_a_new_study_at_once_with_other_settings_one_is_refused(
    backend: Backend, tmp_path: Path, dlops_home: Path
) -> None:
    """Two runs start one new study at once, with other epochs and subsets: whichever takes
    the study lock second finds only the WAITING baseline (no trial config to compare with)
    and once joined, so the study alternated trials of both settings. Now it is refused."""
    from dlops.errors import DlopsError

    spec = load_spec(str(tiny_workers_spec(tmp_path)))
    runs = [
        RunOptions(storage=backend.url, study_name=backend.study_name, epochs=1),
        RunOptions(
            storage=backend.url, study_name=backend.study_name, epochs=3, train_overrides={"subset_per_class": 20}
        ),
    ]
    barrier, joined, refused = threading.Barrier(2), [], []

    def start(options: RunOptions) -> None:
        storage = backend.storage()
        study = open_study(spec, options, storage)
        barrier.wait()
        try:
            with storage.lock(study.study_name):
                prepare_study(study, spec, options)
            joined.append(options.epochs)
        except DlopsError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=start, args=(options,)) for options in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(joined) == 1 and len(refused) == 1, (joined, refused)
    assert "recorded when the study was prepared" in refused[0]
    settings = backend.study().user_attrs["settings"]
    assert settings["epochs"] == joined[0] and settings["subset_per_class"] == (10 if joined[0] == 1 else 20)
    assert len(backend.study().get_trials()) == 1


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_runs_joining_at_once_get_their_own_sampler_seeds(backend: Backend, tmp_path: Path, dlops_home: Path) -> None:
    """Two machines starting one new study at once both see it empty; under the study lock
    each run still gets its own index, so only the first replays the spec's seed and the
    others sample elsewhere (before, both proposed the same lr)."""
    from dlops.runner import join_run
    from dlops.sampling import make_sampler, sampler_seed

    spec = load_spec(str(tiny_workers_spec(tmp_path)))
    options = RunOptions(storage=backend.url, study_name=backend.study_name)
    barrier, indexes, errors = threading.Barrier(4), [], []

    def join(worker: int) -> None:
        try:
            storage = backend.storage()
            study = open_study(spec, options, storage)
            barrier.wait()
            with storage.lock(study.study_name):
                prepare_study(study, spec, options)
                indexes.append(join_run(study, storage))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=join, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(indexes) == [0, 1, 2, 3]
    assert sampler_seed(0, 0, 0) == 0 and sampler_seed(0, 1, 0) == 1  # the run that starts a study: seed + worker
    seeds = {sampler_seed(0, w, i) for w in range(3) for i in indexes}
    assert len(seeds) == 12
    space = {"lr": optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True)}
    firsts = set()
    for i in indexes:  # what each run's sampler proposes first on a fresh study
        probe = optuna.create_study(sampler=make_sampler(spec.sampler, sampler_seed(0, 0, i)))
        firsts.add(probe.ask(space).params["lr"])
    assert len(firsts) == 4


@requires_pg
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::optuna.exceptions.ExperimentalWarning")
def test_heartbeats_fail_and_requeue_the_trial_of_a_silent_worker_elsewhere(tmp_path: Path) -> None:
    b = Backend("postgresql", tmp_path)
    try:
        storage = b.storage(heartbeat_interval=1, grace_period=1)
        assert storage.heartbeat
        study = optuna.create_study(study_name=b.study_name, storage=storage.optuna)
        trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True)})
        elsewhere = {**worker_identity(), "host": "another-machine"}
        storage.optuna.set_trial_system_attr(trial._trial_id, OWNER_KEY, elsewhere)
        storage.optuna.record_heartbeat(trial._trial_id)
        frozen = study.get_trials()[0]
        assert worth_waiting_for(frozen, storage)  # heartbeats will settle it either way
        assert recover_dead_trials(study, storage) == {} and study.get_trials()[0].state == TrialState.RUNNING
        time.sleep(2.5)  # no heartbeat for longer than the grace period
        recover_dead_trials(study, storage)
        failed, retry = study.get_trials()
        assert failed.state == TrialState.FAIL
        assert retry.state == TrialState.WAITING and retry.params == failed.params
        assert optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == failed.number
    finally:
        b.cleanup()


def test_journal_leaves_a_running_trial_of_another_machine_alone(tmp_path: Path) -> None:
    storage = connect(f"journal:{tmp_path / 'j.log'}")
    assert not storage.heartbeat
    study = optuna.create_study(study_name="x", storage=storage.optuna)
    elsewhere, here_dead = study.ask(), study.ask()
    storage.optuna.set_trial_system_attr(
        elsewhere._trial_id, OWNER_KEY, {**worker_identity(), "host": "another-machine"}
    )
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    storage.optuna.set_trial_system_attr(here_dead._trial_id, OWNER_KEY, {**worker_identity(), "pid": child.pid})
    assert not worth_waiting_for(study.get_trials()[0], storage)  # cannot tell: do not wait for it
    assert list(recover_dead_trials(study, storage)) == [1]
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.RUNNING, TrialState.FAIL, TrialState.WAITING]
    assert "died" in study.get_trials()[1].user_attrs["stopped_reason"]


# --- real worker processes ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_three_workers_finish_nine_trials_of_one_study(
    backend: Backend, tmp_path: Path, dlops_home: Path, capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from dlops.cli import app

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec = tiny_workers_spec(tmp_path, epochs=1)
    args = [
        "study",
        "run",
        str(spec),
        "--storage",
        backend.url,
        "--study-name",
        backend.study_name,
        "--workers",
        "3",
        "--n-trials",
        "9",
        "--device",
        "cpu",
    ]
    # `dlops study run` in this process; its three worker processes write to the real stdout.
    result = CliRunner().invoke(app, args)
    workers_out = capfd.readouterr()
    output = result.output + workers_out.out + workers_out.err
    assert result.exit_code == 0, output
    trials = backend.study().get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 9  # no more, no fewer, none failed
    assert sorted(t.number for t in trials) == list(range(9))
    assert [t.number for t in trials if t.user_attrs.get("baseline")] == [0]
    assert len({t.system_attrs[OWNER_KEY]["pid"] for t in trials}) >= 2  # really in parallel
    for needle in ("database is locked", "Traceback", "error", "Error"):
        assert needle not in output
    assert "3 workers" in output and "this run adds 9 finished trials" in output
    assert not list((dlops_home / "checkpoints").rglob("*.pt*"))  # removed as trials finish
    # The password of the storage URL appears nowhere: not in the output, not in any file.
    if ":s3cret@" in backend.url:
        assert "s3cret" not in output and ":***@" in output
        for f in dlops_home.rglob("*"):
            assert not f.is_file() or b"s3cret" not in f.read_bytes(), f


def invoke_in_background_of(action, args: list[str]):
    """``dlops ARGS`` in this process (main thread: it installs signal handlers) while
    ``action()`` runs in a thread; returns (CliRunner result, action's value)."""
    from typer.testing import CliRunner

    from dlops.cli import app

    box: dict = {}

    def run_action() -> None:
        try:
            box["value"] = action()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test
            box["error"] = exc

    thread = threading.Thread(target=run_action, daemon=True)
    thread.start()
    result = CliRunner().invoke(app, args)
    thread.join(timeout=60)
    if "error" in box:
        raise box["error"]
    return result, box.get("value")


def running_with_checkpoint(study_of, ckpt_dir: Path, epochs: int):
    """A RUNNING trial that has checkpointed its first epoch and has more than one to go."""

    def find():
        for f in ckpt_dir.glob("trial-*.pt"):
            t = study_of().get_trials()[int(f.stem.split("-")[1])]
            if t.state == TrialState.RUNNING and 1 <= len(t.intermediate_values) < epochs - 1:
                return t
        return None

    return wait_until(find)


class Proxy:
    """A TCP proxy to a local server that can go down (every connection cut, the port closed)
    and come back on the same port: a storage server lost mid-run."""

    def __init__(self, target_port: int) -> None:
        import socket

        self.target, self.conns = target_port, []
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.up()

    def up(self) -> None:
        import socket

        self.server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.server,), daemon=True).start()

    def _accept(self, server) -> None:
        import socket

        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass

    def down(self) -> None:
        import socket

        with contextlib.suppress(OSError):  # wakes the accept(): a closed socket alone keeps listening
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()
        self.conns = []


@requires_redis
def test_a_storage_lost_mid_run_is_one_line_and_the_rerun_resumes_the_trial_from_its_checkpoint(
    tmp_path: Path, dlops_home: Path, capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Redis server gone mid-trial: each worker printed two tracebacks (the driver's, then
    Optuna's UnboundLocalError in failing to record the trial), dlops a third, and the
    trial's checkpoint was deleted, so the trial left RUNNING started over from epoch 0."""
    from typer.testing import CliRunner

    from dlops.cli import app

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    proxy = Proxy(6379)
    tag = uuid.uuid4().hex[:10]
    url = f"redis://127.0.0.1:{proxy.port}/0?prefix=dlops-test-{tag}"
    epochs = 8
    spec = tiny_workers_spec(tmp_path, epochs=epochs, per_class=40)
    args = ["study", "run", str(spec), "--storage", url, "--n-trials", "2", "--device", "cpu"]

    def study(name: str):
        return optuna.load_study(study_name=name, storage=connect(url).optuna)

    def cut_mid_trial(name: str):
        def mid_trial():
            try:
                running = [t for t in study(name).get_trials() if t.state == TrialState.RUNNING]
            except KeyError:
                return None
            return running[0] if running and len(running[0].intermediate_values) >= 2 else None

        trial = wait_until(mid_trial)
        proxy.down()
        return trial

    try:
        # One worker (this process, which lives on: its trial is not provably dead here) and
        # two worker processes.
        for name, workers in (("solo", "1"), ("tiny-workers", "2")):
            run_args = [*args, "--study-name", name, "--workers", workers]
            result, cut = invoke_in_background_of(lambda name=name: cut_mid_trial(name), run_args)
            output = result.output + "".join(capfd.readouterr())
            assert result.exit_code == 2, output
            assert "Traceback" not in output and "UnboundLocalError" not in output, output
            last = [line for line in result.output.splitlines() if line.strip()][-1]
            assert last.startswith(f"error: lost the storage {url} (") and last.endswith(
                "a trial it was running stays RUNNING there with its checkpoint; once the storage answers, run "
                "the same command again and it resumes from that checkpoint"
            ), last
            assert checkpoint_path(name, cut.number, url).exists()
            proxy.up()

        result = CliRunner().invoke(app, run_args)  # the workers of the run cut short are gone
        output = result.output + "".join(capfd.readouterr())
        assert result.exit_code == 0, output
        trials = study("tiny-workers").get_trials()
        (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == cut.number]
        assert retry.state in FINISHED and retry.user_attrs["resumed_from"]["epoch"] >= 2, output
        assert not [t for t in trials if t.state == TrialState.RUNNING]
    finally:
        proxy.down()
        import redis

        client = redis.Redis(host="127.0.0.1", port=6379)
        for key in client.scan_iter(f"dlops-test-{tag}*"):
            client.delete(key)


@requires_pg
@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_heartbeat_thread_that_loses_the_storage_says_so_in_one_line(capfd: pytest.CaptureFixture) -> None:
    """Optuna's heartbeat thread dies on a PostgreSQL server gone; Python printed its
    traceback (three chained exceptions ending in "An exception is raised during the commit.
    This typically happens due to invalid data ...")."""
    from optuna.storages._heartbeat import HeartbeatThread

    from dlops.runner import heartbeat_failures_said

    proxy = Proxy(5432)
    name = f"w-{uuid.uuid4().hex[:10]}"
    url = f"postgresql+psycopg2://postgres@127.0.0.1:{proxy.port}/test?connect_timeout=3"
    storage = connect(url, heartbeat_interval=1)
    trial = optuna.create_study(study_name=name, storage=storage.optuna).ask()
    said: list[str] = []
    try:
        proxy.down()
        with heartbeat_failures_said(said.append):
            beat = HeartbeatThread(trial._trial_id, storage.optuna)
            beat.start()
            wait_until(lambda: beat._thread is not None and not beat._thread.is_alive(), timeout=60)
            beat.join()
        assert len(said) == 1 and said[0].startswith("a trial's heartbeat stopped: connection to server at"), said
        assert "Connection refused" in said[0] and "invalid data" not in said[0]
        assert "Traceback" not in "".join(capfd.readouterr())
    finally:
        proxy.up()
        optuna.delete_study(study_name=name, storage=PG)
        proxy.down()


def test_no_more_workers_start_than_there_are_trials_to_run(
    tmp_path: Path, dlops_home: Path, capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--workers 3 for 2 trials started 3 processes (each loading torch), the third only to
    wait: --workers 100 by mistake was 100 of them."""
    from typer.testing import CliRunner

    from dlops.cli import app

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec = tiny_workers_spec(tmp_path, epochs=1, per_class=5)
    url = f"journal://{tmp_path / 'j.log'}"
    args = ["study", "run", str(spec), "--storage", url, "--workers", "3", "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--n-trials", "2"])
    output = result.output + "".join(capfd.readouterr())
    assert result.exit_code == 0, output
    assert "this run adds 2 finished trials of its own (other runs' trials not counted) with 2 workers" in output
    assert "--workers 3, 2 trials to run: starting 2 workers (the others would only wait" in output
    assert "[w1]" in output and "[w2]" not in output
    study = optuna.load_study(study_name="tiny-workers", storage=connect(url).optuna)
    assert sum(t.state in FINISHED for t in study.trials) == 2
    # --total-trials: what the study lacks
    result = CliRunner().invoke(app, [*args, "--total-trials", "3"])
    output = result.output + "".join(capfd.readouterr())
    assert result.exit_code == 0 and "--workers 3, 1 trial to run: starting 1 worker (" in output, output
    assert "[w1]" not in output
    assert len(optuna.load_study(study_name="tiny-workers", storage=connect(url).optuna).trials) == 3


def test_when_every_worker_is_killed_their_trials_are_queued_again_and_the_run_says_how_to_go_on(
    tmp_path: Path, dlops_home: Path, capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No worker is left to re-queue what the killed ones ran (it stayed RUNNING, and dlops
    said "the others re-queue the trial it was running" and "see their error lines above"
    of workers that printed none): dlops itself re-queues those trials, and says so."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    b = Backend("journal", tmp_path)
    epochs = 8
    spec = tiny_workers_spec(tmp_path, epochs=epochs, per_class=20)

    def kill_every_worker_mid_trial():
        def two_running():
            if not Path(b.url[len("journal://") :]).exists():
                return None
            try:
                trials = b.study().get_trials()
            except KeyError:  # the run has not created it yet
                return None
            running = [t for t in trials if t.state == TrialState.RUNNING and t.intermediate_values]
            return running if len(running) == 2 else None

        victims = wait_until(two_running)
        for t in victims:
            os.kill(t.system_attrs[OWNER_KEY]["pid"], signal.SIGKILL)
        return victims

    args = ["study", "run", str(spec), "--storage", b.url, "--study-name", b.study_name, "--workers", "2"]
    result, victims = invoke_in_background_of(kill_every_worker_mid_trial, [*args, "--n-trials", "3"])
    output = result.output + "".join(capfd.readouterr())
    assert result.exit_code == 2, output
    assert "the others re-queue" not in output and "error lines above" not in output
    last = [line for line in result.output.splitlines() if line.strip()][-1]
    assert last.startswith("error: all 2 workers failed (exit codes [-9, -9]); this run added 0 of its 3"), last
    assert last.endswith(
        "killed: w0 by SIGKILL, w1 by SIGKILL; the trials they were running are queued to resume from their "
        "checkpoints: run the same command with --n-trials 3 to add the rest"
    ), last
    trials = b.study().get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    for victim in victims:
        assert trials[victim.number].state == TrialState.FAIL
        (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
        assert retry.state == TrialState.WAITING and retry.params == victim.params


@requires_pg
def test_a_killed_worker_trial_is_retried_and_resumes_from_its_checkpoint(
    tmp_path: Path, dlops_home: Path, capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    b = Backend("postgresql", tmp_path)
    # Enough epochs that a busy machine's poll still catches a trial between two of them.
    epochs = 6
    spec = tiny_workers_spec(tmp_path, epochs=epochs, per_class=20)

    def kill_a_worker_mid_trial():
        victim = running_with_checkpoint(b.study, checkpoint_path(b.study_name, 0, b.url).parent, epochs)
        os.kill(victim.system_attrs[OWNER_KEY]["pid"], signal.SIGKILL)
        return victim

    try:
        result, victim = invoke_in_background_of(
            kill_a_worker_mid_trial,
            [
                "study",
                "run",
                str(spec),
                "--storage",
                b.url,
                "--study-name",
                b.study_name,
                "--workers",
                "2",
                "--n-trials",
                "3",
                "--device",
                "cpu",
                "--heartbeat-interval",
                "1",
                "--grace-period",
                "2",
            ],
        )
        output = result.output + "".join(capfd.readouterr())
        assert result.exit_code == 0, output
        assert victim is not None, "the study finished before a checkpointed trial could be killed"
        trials = b.study().get_trials()
        assert sum(t.state in FINISHED for t in trials) == 3  # the requested count, despite the kill
        assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
        killed = trials[victim.number]
        assert killed.state == TrialState.FAIL
        retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
        assert len(retries) == 1
        retry = retries[0]
        assert retry.state == TrialState.COMPLETE and retry.params == killed.params
        resumed = retry.user_attrs["resumed_from"]["epoch"]
        assert resumed >= len(victim.intermediate_values) >= 1
        # The restored epochs are the killed trial's own (same timings to the last bit), the rest are new.
        before = killed.user_attrs["history"]["epoch_seconds"]
        after = retry.user_attrs["history"]["epoch_seconds"]
        assert len(after) == epochs and sorted(retry.intermediate_values) == list(range(epochs))
        assert after[: len(before)] == before and len(before) <= resumed
        assert (
            "killed by SIGKILL" in output
            and f"resuming from its checkpoint ({resumed} epoch{'' if resumed == 1 else 's'} done)" in output
        )
        assert not list((dlops_home / "checkpoints").rglob("*.pt*"))
    finally:
        b.cleanup()


def test_sigint_stops_cleanly_and_the_printed_command_continues(
    tmp_path: Path, dlops_home: Path, capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from dlops.cli import app

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    epochs = 6  # a wide window between checkpoints, for a busy machine's poll
    spec = tiny_workers_spec(tmp_path, epochs=epochs, per_class=20)
    url = f"journal://{tmp_path / 'study.log'}"
    storage = connect(url)
    args = ["study", "run", str(spec), "--storage", url, "--workers", "2", "--n-trials", "3", "--device", "cpu"]
    monkeypatch.setattr(sys, "argv", ["dlops", *args])  # what the printed command is made from

    def ctrl_c_mid_trial():
        running_with_checkpoint(
            lambda: optuna.load_study(study_name="tiny-workers", storage=storage.optuna),
            checkpoint_path("tiny-workers", 0, url).parent,
            epochs,
        )
        os.kill(os.getpid(), signal.SIGINT)  # as a terminal's Ctrl-C: to `dlops`, which tells its workers

    result, _ = invoke_in_background_of(ctrl_c_mid_trial, args)
    out = result.output + "".join(capfd.readouterr())
    assert result.exit_code == 130, out
    assert "stopped by SIGINT" in out and "Traceback" not in out
    study = optuna.load_study(study_name="tiny-workers", storage=storage.optuna)
    trials = study.get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    stopped = [t for t in trials if t.state == TrialState.FAIL]
    assert stopped and all("interrupted after epoch" in t.user_attrs["stopped_reason"] for t in stopped)
    assert len([t for t in trials if t.state == TrialState.WAITING]) == len(stopped)  # queued to resume

    command = out.split("To continue:")[1].strip().splitlines()[0]
    assert command.startswith("dlops study run") and "--n-trials" in command
    again = CliRunner().invoke(app, shlex.split(command)[1:])
    out = again.output + "".join(capfd.readouterr())
    assert again.exit_code == 0, out
    assert f"{len(stopped)} failed, 0 running, {len(stopped)} waiting" in out  # where it stood on rejoining
    trials = study.get_trials()
    assert sum(t.state in FINISHED for t in trials) == 3
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    for t in stopped:
        retry = next(r for r in trials if r.system_attrs.get("failed_trial") == t.number)
        assert retry.state == TrialState.COMPLETE
        assert retry.user_attrs["resumed_from"]["epoch"] == len(t.intermediate_values)
        assert (
            retry.user_attrs["history"]["epoch_seconds"][: len(t.intermediate_values)]
            == t.user_attrs["history"]["epoch_seconds"]
        )
    assert not list((dlops_home / "checkpoints").rglob("*.pt*"))


def test_sigterm_in_a_single_worker_run(tmp_path: Path, dlops_home: Path) -> None:
    spec = load_spec(str(tiny_workers_spec(tmp_path, epochs=2)))
    sent = []

    def on_epoch(trial: int, epoch: int, metrics: dict) -> None:
        if trial == 1 and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)

    handler = signal.getsignal(signal.SIGTERM)
    result = run_study(spec, RunOptions(n_trials=3, device="cpu"), on_epoch)
    assert result.interrupted == signal.SIGTERM and result.finished == 1 and result.target == 3
    assert signal.getsignal(signal.SIGTERM) == handler  # handlers restored
    states = [t.state for t in result.study.get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert checkpoint_path("tiny-workers", 1).exists()

    again = run_study(spec, RunOptions(n_trials=2, device="cpu"))
    assert again.interrupted is None and again.finished == 3
    retry = again.study.get_trials()[2]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["resumed_from"] == {"trial": 1, "epoch": 1}
    assert retry.user_attrs["config"]["seed"] == result.study.get_trials()[1].user_attrs["config"]["seed"]
    assert not list((dlops_home / "checkpoints").rglob("*.pt*"))


def test_a_second_signal_stops_the_trial_at_once_without_a_traceback(
    tmp_path: Path, dlops_home: Path, capfd: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    """Ctrl-C twice: the trial stops at once (FAIL, queued again) and the log says so in
    dlops' words, without Optuna's KeyboardInterrupt traceback and 'failed with value None'."""
    spec = load_spec(str(tiny_workers_spec(tmp_path, epochs=3)))
    sent = []

    def on_epoch(trial: int, epoch: int, metrics: dict) -> None:
        if trial == 1 and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    result = run_study(spec, RunOptions(n_trials=3, device="cpu"), on_epoch)
    err = capfd.readouterr().err
    assert result.interrupted == signal.SIGINT and result.finished == 1
    assert [t.state for t in result.study.get_trials()][:2] == [TrialState.COMPLETE, TrialState.FAIL]
    assert result.study.get_trials()[1].user_attrs["stopped_reason"] == (
        "interrupted at once by a second signal; queued again to resume from its last checkpoint"
    )
    assert "send it again to stop now" in err
    logged = [(r.getMessage(), r.exc_info) for r in caplog.records if r.name.startswith("optuna")]
    assert not [m for m, exc in logged if exc or "failed" in m], logged


def test_a_worker_that_gets_one_sigterm_twice_still_finishes_its_epoch(tmp_path: Path, dlops_home: Path) -> None:
    """A scheduler (Slurm, systemd) that sends SIGTERM to every process of a --workers run
    reaches each worker twice: directly, and passed on by dlops. That once counted as a
    second signal: the worker stopped at once and lost the epoch in progress. The same
    signal again within a moment is the same stop: the trial ends at its epoch end."""
    spec = load_spec(str(tiny_workers_spec(tmp_path, epochs=3)))
    sent = []

    def on_epoch(trial: int, epoch: int, metrics: dict) -> None:
        if trial == 1 and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)  # from the scheduler
            os.kill(os.getpid(), signal.SIGTERM)  # passed on by dlops

    result = run_study(spec, RunOptions(n_trials=3, device="cpu"), on_epoch, workers=2)  # one worker of two
    assert result.interrupted == signal.SIGTERM and result.finished == 1
    trials = result.study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert trials[1].user_attrs["stopped_reason"].startswith("interrupted after epoch 1;")
    assert checkpoint_path("tiny-workers", 1).exists()


def test_a_worker_whose_trial_was_failed_while_it_stalled_drops_it_and_goes_on(
    tmp_path: Path, dlops_home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker that stalls past its heartbeat's grace period (a laptop asleep, a VM paused)
    finds its trial failed and re-queued by another worker when it wakes: it drops the trial
    at its next epoch, keeps the checkpoint for the retry, and goes on; no traceback, no
    failed run. (The other worker's part is played here by the test, as fail_stale_trials
    and the retry callback would.)"""
    from dlops.liveness import retry_trial

    spec = load_spec(str(tiny_workers_spec(tmp_path, epochs=3)))
    url = f"sqlite:///{dlops_home / 'dlops.db'}"
    taken: list[int] = []

    def on_epoch(trial: int, epoch: int, metrics: dict) -> None:
        if trial == 1 and not taken:
            taken.append(trial)
            study = optuna.load_study(study_name="tiny-workers", storage=url)
            stalled = study.get_trials()[1]
            study._storage.set_trial_state_values(stalled._trial_id, TrialState.FAIL)
            retry_trial(study, study._storage.get_trial(stalled._trial_id))

    lines: list[str] = []
    result = run_study(spec, RunOptions(n_trials=3, device="cpu"), on_epoch, say=lines.append)
    trials = result.study.get_trials()
    assert trials[1].state == TrialState.FAIL
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == 1)
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["resumed_from"] == {"trial": 1, "epoch": 1}
    assert result.finished == 3 and result.interrupted is None
    assert any("trial 1: failed and queued again while this worker stalled" in line for line in lines), lines
    logged = [(r.getMessage(), r.exc_info) for r in caplog.records if r.name.startswith("optuna")]
    assert not [m for m, exc in logged if exc or "failed" in m], logged


def test_a_trial_failed_for_its_dead_worker_has_a_note_that_says_so(tmp_path: Path, dlops_home: Path) -> None:
    """The worker that fails another's trial (its process gone) writes that trial's note:
    the dashboard showed an empty one."""
    from dlops.dashboard import read_note, trial_id

    spec = load_spec(str(tiny_workers_spec(tmp_path, epochs=1)))
    url = f"sqlite:///{dlops_home / 'dlops.db'}"
    run_study(spec, RunOptions(n_trials=1, device="cpu"))
    study = optuna.load_study(study_name="tiny-workers", storage=url)
    orphan = study.ask()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    study._storage.set_trial_system_attr(orphan._trial_id, OWNER_KEY, {**worker_identity(), "pid": child.pid})
    run_study(spec, RunOptions(n_trials=1, device="cpu"))
    dead = study.get_trials()[orphan.number]
    assert dead.state == TrialState.FAIL
    note = read_note(study, trial_id(dead))
    assert note.startswith(f"# Trial {orphan.number}") and f"worker pid {child.pid}" in note and "died" in note


def test_workers_that_give_up_fail_the_run_with_the_last_reason(
    tmp_path: Path, dlops_home: Path, capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every trial fails for real (no checkpoint can be written: `checkpoints` is a file):
    the workers give up, and `dlops` exits non-zero with the last failure's reason."""
    from typer.testing import CliRunner

    from dlops.cli import app

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    dlops_home.mkdir(parents=True)
    (dlops_home / "checkpoints").write_text("not a folder")
    spec = tiny_workers_spec(tmp_path, epochs=1, per_class=5)
    result = CliRunner().invoke(
        app,
        [
            "study",
            "run",
            str(spec),
            "--storage",
            f"journal://{tmp_path / 'j.log'}",
            "--workers",
            "2",
            "--n-trials",
            "2",
            "--device",
            "cpu",
        ],
    )
    output = result.output + "".join(capfd.readouterr())
    assert result.exit_code == 2, output
    last = [line for line in result.output.splitlines() if line.strip()][-1]
    assert "workers failed" in last and "this run added 0 of its 2 finished trials" in last, output
    assert "the last failed trial: " in last and ("NotADirectoryError" in last or "FileExistsError" in last), last
    assert "giving up" in output  # each worker's own line


def test_a_worker_says_when_a_second_signal_counts(capfd: pytest.CaptureFixture) -> None:
    """A worker takes the same signal again within SAME_STOP_S for the same stop (the
    scheduler's copy and dlops' copy of one Ctrl-C): its line says when a second one stops
    it at once; a lone run's line says simply to send it again."""
    from dlops.stopping import SAME_STOP_S, GracefulStop

    with GracefulStop("worker 1: ", SAME_STOP_S) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the same stop: no KeyboardInterrupt
        assert stop.requested
    err = capfd.readouterr().err
    assert err == (
        "worker 1: SIGINT: stopping after this epoch (the trial is kept to resume); "
        f"send it again {SAME_STOP_S:g} s or more from now to stop now\n"
    )
    with pytest.raises(KeyboardInterrupt), GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
    assert capfd.readouterr().err.endswith("; send it again to stop now\n")
