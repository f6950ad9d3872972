"""``dlops study delete``: the study, its trials' checkpoints and its dashboard files go;
other studies' files stay; never while a worker of it may run."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from data_trees import one_error_line
from dlops.cli import app
from dlops.liveness import LIVE_PREFIX, OWNER_KEY, identity, worker_identity
from dlops.objective import checkpoint_path
from dlops.paths import default_storage_url
from dlops.removal import artifact_ids
from dlops.storage import connect
from specs import tiny_workers_spec

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def dlops(*args: str):
    return runner.invoke(app, list(args))


def names(url: str) -> list[str]:
    return sorted(s.study_name for s in optuna.get_all_study_summaries(url, include_best_trial=False))


def test_delete_takes_the_study_its_checkpoints_and_dashboard_files_and_nothing_else(
    tmp_path: Path, dlops_home: Path
) -> None:
    spec = str(tiny_workers_spec(tmp_path, n_trials=2))
    assert dlops("study", "run", spec, "--device", "cpu").exit_code == 0
    assert dlops("study", "run", spec, "--device", "cpu", "--study-name", "other", "--n-trials", "1").exit_code == 0
    url = default_storage_url()
    gone_ids = artifact_ids(optuna.load_study(study_name="tiny-workers", storage=url))
    kept_ids = artifact_ids(optuna.load_study(study_name="other", storage=url))
    assert gone_ids and kept_ids and not set(gone_ids) & set(kept_ids)
    assert sorted(p.name for p in (dlops_home / "artifacts").iterdir()) == sorted(gone_ids + kept_ids)
    # What a killed run leaves: the checkpoint of a trial that never finished.
    left, other_left = checkpoint_path("tiny-workers", 7, url), checkpoint_path("other", 7, url)
    for path in (left, other_left):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"checkpoint")

    line = one_error_line(dlops("study", "delete", "tiny-workers"))  # no terminal to ask on
    assert line == (
        f"error: would delete study tiny-workers in {url}: 2 trials (2 complete), with {len(gone_ids)} dashboard "
        f"files and the checkpoints in {left.parent}: add --yes to delete it without a terminal to ask on"
    )
    assert names(url) == ["other", "tiny-workers"] and left.exists()

    result = dlops("study", "delete", "tiny-workers", "--yes")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("deleted study tiny-workers in ")
    assert names(url) == ["other"]
    assert not left.parent.exists() and other_left.exists()
    assert sorted(p.name for p in (dlops_home / "artifacts").iterdir()) == sorted(kept_ids)
    assert "no study named 'tiny-workers'" in one_error_line(dlops("study", "show", "tiny-workers"))
    assert "no study named 'tiny-workers'" in one_error_line(dlops("study", "delete", "tiny-workers", "--yes"))
    # The name is free again: a new study of it starts from trial 0.
    assert dlops("study", "run", spec, "--device", "cpu", "--n-trials", "1").exit_code == 0
    assert len(optuna.load_study(study_name="tiny-workers", storage=url).trials) == 1


def test_a_study_with_a_live_worker_is_never_deleted_and_one_elsewhere_only_with_force(dlops_home: Path) -> None:
    url = default_storage_url()
    dlops_home.mkdir()
    study = optuna.create_study(study_name="busy", storage=url, direction="maximize")
    trial = study.ask()
    owner = identity("run-1")  # this process: a worker that runs
    study._storage.set_trial_system_attr(trial._trial_id, OWNER_KEY, owner)
    for extra in ((), ("--force",)):
        line = one_error_line(dlops("study", "delete", "busy", "--yes", *extra))
        assert (
            line
            == "error: study busy has trial 0 running on this machine: stop its workers (Ctrl-C) before deleting it"
        )
    study._storage.set_trial_system_attr(trial._trial_id, OWNER_KEY, {**owner, "host": "elsewhere"})
    line = one_error_line(dlops("study", "delete", "busy", "--yes"))
    assert "trial 0 RUNNING whose workers are not on this machine (or not known)" in line and "--force" in line
    assert names(url) == ["busy"]
    result = dlops("study", "delete", "busy", "--yes", "--force")
    assert result.exit_code == 0, result.output
    assert names(url) == []

    # A worker of this machine that is gone (killed) blocks nothing.
    study = optuna.create_study(study_name="busy", storage=url, direction="maximize")
    trial = study.ask()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    study._storage.set_trial_system_attr(trial._trial_id, OWNER_KEY, {**owner, "pid": dead.pid, "started": 0})
    assert dlops("study", "delete", "busy", "--yes").exit_code == 0
    assert names(url) == []


def test_delete_asks_on_a_terminal_and_keeps_the_study_unless_told_yes(dlops_home: Path) -> None:
    url = default_storage_url()
    dlops_home.mkdir()
    optuna.create_study(study_name="asked", storage=url, direction="maximize").add_trial(
        optuna.trial.create_trial(value=0.5, params={}, distributions={})
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for answer, code, left in ((b"n\n", 1, ["asked"]), (b"y\n", 0, [])):
        leader, follower = pty.openpty()
        process = subprocess.Popen(
            [sys.executable, "-m", "dlops.cli", "study", "delete", "asked"],
            stdin=follower,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        os.close(follower)
        os.write(leader, answer)
        stdout, stderr = process.communicate(timeout=120)
        os.close(leader)
        assert process.returncode == code, stderr
        assert stdout.decode().startswith(
            f"delete study asked in {url}: 1 trial (1 complete), with 0 dashboard files? "
        )
        assert names(url) == left


def test_a_study_run_between_two_trials_keeps_its_study(
    tmp_path: Path, dlops_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No trial is RUNNING between two trials (nor while workers start): the run itself,
    recorded in the study while it is in it, is what makes the delete wait."""
    from dlops import runner as run_module

    spec = str(tiny_workers_spec(tmp_path, n_trials=2))
    url = default_storage_url()
    ended = run_module._trial_ended
    refusals: list[str] = []

    def delete_after_trial_0(study, storage, trial, *args) -> None:
        ended(study, storage, trial, *args)
        if trial.number == 0:
            refusals.append(one_error_line(dlops("study", "delete", "tiny-workers", "--yes", "--force")))

    monkeypatch.setattr(run_module, "_trial_ended", delete_after_trial_0)
    result = dlops("study", "run", spec, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert refusals == [
        f"error: study tiny-workers is in use by a dlops study run on this machine (pid {os.getpid()}), "
        "between two trials or starting: stop it (Ctrl-C) before deleting it"
    ]
    study = optuna.load_study(study_name="tiny-workers", storage=url)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    # Once the run is over, nothing holds the study.
    monkeypatch.setattr(run_module, "_trial_ended", ended)
    assert dlops("study", "delete", "tiny-workers", "--yes").exit_code == 0
    assert names(url) == []


def test_a_record_left_by_a_killed_run_does_not_block_delete(dlops_home: Path) -> None:
    url = default_storage_url()
    dlops_home.mkdir()
    study = optuna.create_study(study_name="left", storage=url, direction="maximize")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    key = f"{LIVE_PREFIX}run-1:parent"
    study._storage.set_study_system_attr(study._study_id, key, {**worker_identity(), "pid": dead.pid, "started": 0})
    study._storage.set_study_system_attr(study._study_id, f"{LIVE_PREFIX}run-2:w0", {**worker_identity(), "host": "x"})
    assert dlops("study", "delete", "left", "--yes").exit_code == 0
    assert names(url) == []


def test_a_run_whose_study_is_deleted_elsewhere_stops_in_one_line_and_never_recreates_it(
    tmp_path: Path, dlops_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deleted from another machine (whose delete cannot see this run) between two trials,
    or before a worker of a --workers run opens it: the run stops, the study stays gone."""
    from dlops import runner as run_module
    from dlops.objective import RunOptions
    from dlops.runner import RunSlot, StudyDeleted, run_study
    from dlops.spec import load_spec

    spec = tiny_workers_spec(tmp_path, n_trials=3)
    journal = str(tmp_path / "j.log")
    ended = run_module._trial_ended

    def deleted_after_trial_0(study, storage, trial, *args) -> None:
        ended(study, storage, trial, *args)
        if trial.number == 0:
            optuna.delete_study(study_name=study.study_name, storage=connect(journal).optuna)

    monkeypatch.setattr(run_module, "_trial_ended", deleted_after_trial_0)
    line = one_error_line(dlops("study", "run", str(spec), "--device", "cpu", "--storage", journal))
    assert line == (
        f"error: study tiny-workers was deleted from {journal} while this run was in it (dlops study delete): "
        "stopped, without starting it anew"
    )
    assert optuna.get_all_study_names(connect(journal).optuna) == []

    # A worker process of a --workers run opens the study its parent opened; gone, it stops.
    monkeypatch.setattr(run_module, "_trial_ended", ended)
    options = RunOptions(device="cpu", storage=journal, n_trials=1)
    with pytest.raises(StudyDeleted):
        run_study(load_spec(str(spec)), options, run=RunSlot("parent-run", 1), worker=1, workers=2)
    assert optuna.get_all_study_names(connect(journal).optuna) == []


def test_delete_in_a_journal_with_a_torn_last_record_deletes_and_keeps_the_journal_readable(
    tmp_path: Path, dlops_home: Path
) -> None:
    """The deletion record was glued to the torn one: `study delete` said "deleted", the
    study was still listed (the glued line is skipped while last), and the next append made
    the journal unreadable."""
    spec = str(tiny_workers_spec(tmp_path, n_trials=1))
    journal = tmp_path / "j.log"
    for name in ("tiny-workers", "kept"):
        args = ["study", "run", spec, "--device", "cpu", "--storage", str(journal), "--study-name", name]
        assert dlops(*args).exit_code == 0
    torn = b'{"op_code":6,"worker_id":"w1","trial_id":0,"user_attr":{"hist'
    with journal.open("ab") as f:  # a worker killed mid-append
        f.write(torn)

    result = dlops("study", "delete", "tiny-workers", "--yes", "--storage", str(journal))
    assert result.exit_code == 0, result.output
    assert f"journal {journal} ended in a record cut off mid-write" in result.stderr
    assert optuna.get_all_study_names(connect(str(journal), create=False).optuna) == ["kept"]
    (aside,) = tmp_path.glob("j.log.torn-*")
    assert aside.read_bytes() == torn
    # and the journal takes more records: the kept study goes on
    args = ["study", "run", spec, "--device", "cpu", "--storage", str(journal), "--study-name", "kept"]
    assert dlops(*args, "--n-trials", "1").exit_code == 0
    assert len(optuna.load_study(study_name="kept", storage=connect(str(journal)).optuna).trials) == 2
