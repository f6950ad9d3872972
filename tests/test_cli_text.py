"""What the command line says: counts in the right number, `--help` of every command
readable at 80 columns (plain flags, whole defaults)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from dlops.cli import app
from dlops.text import plural


def test_plural() -> None:
    assert plural(1, "seed") == "1 seed" and plural(2, "seed") == "2 seeds" and plural(0, "trial") == "0 trials"
    assert plural(1, "finished trial") == "1 finished trial" and plural(4, "finished trial") == "4 finished trials"
    assert plural(2, "decoding process") == "2 decoding processes" and plural(3, "class") == "3 classes"
    assert plural(2, "study") == "2 studies" and plural(2, "day") == "2 days"
    assert plural(12000, "image") == "12,000 images" and plural(2, "mouse", "mice") == "2 mice"
    assert plural(2, "epoch") == "2 epochs" and plural(3, "batch") == "3 batches"


def _commands(command, path=()):
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _commands(sub, (*path, name))


COMMANDS = [path for path, _ in _commands(typer.main.get_command(app))]


@pytest.mark.parametrize("path", COMMANDS, ids=[" ".join(p) or "dlops" for p in COMMANDS])
def test_help_reads_at_80_columns(path: tuple[str, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    result = CliRunner().invoke(app, [*path, "--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    text = result.output
    lines = text.splitlines()
    assert max(map(len, lines)) <= 80, text
    assert "<bool>" not in text and "…" not in text, text
    assert not [line for line in lines if line.rstrip().endswith("...") and "[ARGS]" not in line], (
        text
    )  # nothing cut off
    command = dict(_commands(typer.main.get_command(app)))[path]
    flat = re.sub(r"(\w)- (\w)", r"\1-\2", " ".join(text.split()))  # help wraps at hyphens
    for param in getattr(command, "params", []):
        if getattr(param, "hidden", False) or not getattr(param, "opts", None) or not param.opts[0].startswith("--"):
            continue
        assert param.opts[0] in text, (param.opts[0], text)
        for default in re.findall(r"[\[(]default: [^\])]*[\])]", param.help or ""):
            assert " ".join(default.split()) in flat, (default, text)  # a default in the help text is shown whole
    if any(getattr(p, "name", None) == "storage" for p in getattr(command, "params", [])):
        assert "sqlite:///$DLOPS_HOME/dlops.db]" in text
    # Every default reads "[default: ...]", as Typer prints its own; an option without one
    # says so, or says what it stands instead of (--loss: SPEC).
    assert "(default:" not in text, text
    for param in getattr(command, "params", []):
        if getattr(param, "param_type_name", "") != "option" or param.is_flag or param.opts[0] == "--help":
            continue
        help_text = " ".join((param.help or "").split())
        stated = "[default: " in help_text or param.default is not None or "instead" in help_text.lower()
        assert stated, (param.opts[0], help_text)


def test_help_lists_the_commands_in_the_order_of_use_and_names_arguments_as_the_readme() -> None:
    text = CliRunner().invoke(app, ["--help"], terminal_width=80).output
    listed = re.findall(r"^  (\w+)  ", text.split("Commands:")[1], re.MULTILINE)
    assert listed == ["study", "data", "final", "report", "dashboard"], text
    usages = {
        ("study", "run"): "dlops study run [OPTIONS] [SPEC]",
        ("study", "show"): "dlops study show [OPTIONS] {NAME}",
        ("study", "replay"): "dlops study replay [OPTIONS] {NAME|CURVES.json}",
        ("study", "delete"): "dlops study delete [OPTIONS] {NAME}",
        ("data", "fetch"): "dlops data fetch [OPTIONS] {NAME}",
        ("data", "info"): "dlops data info [OPTIONS] {NAME}",
        ("final",): "dlops final [OPTIONS] [SPEC]",
    }
    for path, usage in usages.items():
        assert CliRunner().invoke(app, [*path, "--help"], prog_name="dlops").output.startswith(f"Usage: {usage}\n"), (
            path
        )
    replay = CliRunner().invoke(app, ["study", "replay", "--help"], terminal_width=100).output
    assert "--pruner TYPE[:KEY=VALUE,...]" in replay and "list[str]" not in replay, replay
    missing = CliRunner().invoke(app, ["study", "show"], prog_name="dlops")
    assert missing.exit_code == 2
    assert missing.output == "error: Missing argument 'NAME'. (see `dlops study show --help`)\n"


def test_dash_h_is_help_for_every_command() -> None:
    for path in COMMANDS:
        long = CliRunner().invoke(app, [*path, "--help"], prog_name="dlops")
        short = CliRunner().invoke(app, [*path, "-h"], prog_name="dlops")
        assert short.exit_code == long.exit_code == 0 and short.output == long.output, (path, short.output)
        assert "-h, --help" in short.output, path


@pytest.mark.parametrize("args", [[], ["study"], ["data"]], ids=["dlops", "study", "data"])
def test_a_command_line_without_a_command_prints_its_help_on_stderr_and_exits_2(args: list[str]) -> None:
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "dlops", *args], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and done.stdout == "", (done.returncode, done.stdout)
    usage = " ".join(["dlops", *args, "[OPTIONS] COMMAND [ARGS]..."])
    assert done.stderr.startswith(f"Usage: {usage}\n") and "Commands:" in done.stderr, done.stderr


def test_counts_of_one_read_in_the_singular_and_artifacts_name_their_trial(tmp_path: Path, dlops_home: Path) -> None:
    spec = tmp_path / "wording.toml"
    spec.write_text(
        textwrap.dedent("""\
        name = "wording"
        trainer = "resnet18"
        n_trials = 1
        [train]
        loss = "ce"
        dataset = "digits"
        epochs = 1
        width = 8
        subset_per_class = 10
        batch_size = 40
        [final]
        epochs = 1
        seeds = 1
        [baseline]
        lr = 0.01
        [search.lr]
        type = "float"
        low = 0.001
        high = 0.1
        log = true
        """)
    )
    runner = CliRunner()
    result = runner.invoke(
        app, ["study", "run", str(spec), "--study-name", "wording-study", "--n-trials", "1", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    assert "this run adds 1 finished trial of its own" in result.output
    result = runner.invoke(app, ["final", str(spec), "--study-name", "wording-study", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert "(1 seed x 1 epoch)" in flat
    assert re.search(r"\(\d+ files\); \d+ artifacts attached to trial 0 of study wording-study", flat), flat


@pytest.mark.parametrize("command", [["study", "run"], ["final"]])
def test_loss_and_device_choices_are_listed_and_checked_in_one_line(command: list[str]) -> None:
    help_text = CliRunner().invoke(app, [*command, "--help"], terminal_width=120).output
    assert "<ce|triplet|center>" in help_text and "[auto|cpu|cuda|cuda:K]" in help_text
    assert "[default: auto]" in help_text  # the same --device default in every command
    for args, message in (
        (["--loss", "hinge"], "'hinge' is not one of 'ce', 'triplet', 'center'"),
        (["--loss", "ce", "--device", "gpu"], "unknown device 'gpu' (auto, cpu, cuda, cuda:K)"),
        (["--loss", "ce", "--n-trial", "3"], "No such option: --n-trial"),
    ):
        result = CliRunner().invoke(app, [*command, *args])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1, result.output
        assert lines[0].startswith("error: ") and message in lines[0], lines
        assert "Value error" not in lines[0] and "--help" in lines[0]


def test_a_dlops_home_on_a_file_or_an_unreadable_file_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    monkeypatch.setenv("DLOPS_HOME", str(a_file))
    monkeypatch.delenv("DLOPS_STORAGE", raising=False)
    for command, path in ((["report"], "reports"), (["data", "show", "digits"], "reports/data")):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2, result.output
        assert result.output.strip().splitlines() == [f"error: cannot use {a_file / path}: Not a directory"]

    home = tmp_path / "home"
    final_json = home / "reports" / "x" / "final.json"
    final_json.parent.mkdir(parents=True)
    final_json.write_text("{}")
    monkeypatch.setenv("DLOPS_HOME", str(home))
    real = Path.read_text

    def read_text(self: Path, *args, **kwargs) -> str:
        if self.name == "final.json":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    result = CliRunner().invoke(app, ["report"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [f"error: cannot use {final_json}: Permission denied"]


def test_a_full_disk_keeps_its_own_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    monkeypatch.setenv("DLOPS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DLOPS_STORAGE", raising=False)

    def mkdir(self: Path, *args, **kwargs) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "mkdir", mkdir)
    result = CliRunner().invoke(app, ["report"])
    assert result.exit_code == 2, result.output
    reports = tmp_path / "home" / "reports"
    assert result.output.strip().splitlines() == [f"error: no space left on device while writing {reports}"]


def test_a_study_name_with_colons_or_brackets_prints_as_typed(capsys) -> None:
    """Rich read ':b:' in "study a:b: new" as an emoji code and printed "a🅱"."""
    from dlops.console import error, say

    say("study a:b: new, in sqlite:///x.db; [bold]kept[/bold] :smile:")
    error("study 'a:b:' trains with epochs = 2")
    captured = capsys.readouterr()
    assert captured.out.strip() == "study a:b: new, in sqlite:///x.db; [bold]kept[/bold] :smile:"
    assert captured.err.strip() == "error: study 'a:b:' trains with epochs = 2"

    from dlops.console import print_study_list, print_study_summary

    name = "[red]a:b:[/red]"
    row = {"name": name, "n_trials": 1, "states": {"COMPLETE": 1}, "best_value": 0.5}
    print_study_list([row], "sqlite:///x.db")
    print_study_summary({"name": name, "best": None, "metric": "val_top1", "states": {"COMPLETE": 1}})
    out = capsys.readouterr().out
    assert out.count(name) == 2, out


def test_version_names_dlops_its_commit_and_the_packages_it_runs_on() -> None:
    from importlib import metadata

    import optuna

    import dlops

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    (line,) = result.output.splitlines()
    assert re.fullmatch(rf"dlops {re.escape(dlops.__version__)}, commit [0-9a-f]{{12}}(\+dirty)? \(python .*\)", line)
    assert f"torch {metadata.version('torch')}," in line and f"optuna {optuna.__version__}," in line
    # Eager: it prints and exits before the command after it would run.
    assert CliRunner().invoke(app, ["--version", "study", "list"]).output == result.output


def test_version_names_no_commit_of_another_projects_repository(tmp_path: Path) -> None:
    """dlops installed inside another project's git tree (a .venv it ignores) is not that
    project's checkout: --version (and final.json) named the project's commit as dlops's."""
    import os
    import shutil
    import subprocess
    import sys

    project = tmp_path / "project"
    site = project / ".venv" / "site"
    git = ["git", "-c", "user.name=u", "-c", "user.email=u@example.org"]
    subprocess.run([*git, "init", "-q", str(project)], check=True)
    (project / ".gitignore").write_text(".venv/\n")
    subprocess.run([*git, "add", ".gitignore"], cwd=project, check=True)
    subprocess.run([*git, "commit", "-qm", "the project"], cwd=project, check=True)
    theirs = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    shutil.copytree(Path(__file__).resolve().parents[1] / "dlops", site / "dlops")
    env = {k: v for k, v in os.environ.items() if k not in ("DLOPS_GIT_COMMIT", "PYTHONPATH")}

    def version(**extra: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "dlops", "--version"],
            capture_output=True,
            text=True,
            env={**env, "PYTHONPATH": str(site), **extra},
            cwd=project,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    line = version()
    assert line.startswith("dlops ") and theirs[:12] not in line and "commit" not in line, line
    assert ", commit abc1234 (" in version(DLOPS_GIT_COMMIT="abc1234")


def test_python_dash_m_dlops_is_the_dlops_command() -> None:
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-m", "dlops", "study", "--bogus"], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 2 and done.stderr == "error: No such option: --bogus (see `dlops study --help`)\n"
    done = subprocess.run(
        [sys.executable, "-m", "dlops", "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0 and done.stdout.startswith("Usage: dlops [OPTIONS] COMMAND [ARGS]...")


def test_every_trial_ends_with_a_line_saying_how(tmp_path: Path, dlops_home: Path) -> None:
    """After its epoch lines each trial gets one line: complete with its value against the
    best, or pruned after the epoch it stopped at, as the storage records it."""
    import optuna

    from dlops.paths import default_storage_url
    from tests.specs import tiny_workers_spec, toml_text

    spec = tiny_workers_spec(tmp_path, n_trials=5, epochs=2)
    text = spec.read_text().replace(
        '[pruner]\ntype = "none"',
        "[pruner]\n"
        + toml_text(
            {"type": "successive_halving", "min_resource": 1, "reduction_factor": 100, "min_early_stopping_rate": 0}
        ).strip(),
    )
    spec.write_text(text)
    result = CliRunner().invoke(app, ["study", "run", str(spec), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="tiny-workers", storage=default_storage_url())
    lines = result.output.splitlines()
    best = max((t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    pruned = 0
    for t in study.trials:
        label = f"trial {t.number:>3}  "
        epochs = [line for line in lines if line.startswith(label + "epoch")]
        ends = [line for line in lines if line.startswith(label) and line not in epochs]
        assert len(ends) == 1, (t.number, ends)
        if t.state.name == "COMPLETE":
            assert ends[0].startswith(f"{label}complete  val_top5 {t.value:.4f}")
            if t.number == best.number:
                assert ends[0].endswith("best so far"), ends[0]
        else:
            assert t.state.name == "PRUNED"
            pruned += 1
            value = t.intermediate_values[len(epochs) - 1]
            assert ends[0] == f"{label}pruned after epoch {len(epochs)} of 2  (val_top5 {value:.4f})"
    assert pruned >= 1  # only a trial best so far at epoch 1 goes on


def test_a_trial_that_did_not_finish_says_why() -> None:
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    from dlops.console import trial_end_line

    def trial(state: TrialState, reason: str | None, values: dict[int, float]):
        made = create_trial(
            state=state,
            params={"lr": 0.01},
            distributions={"lr": FloatDistribution(1e-3, 1e-1, log=True)},
            intermediate_values=values,
            user_attrs={"stopped_reason": reason, "config": {"epochs": 5}} if reason else {"config": {"epochs": 5}},
        )
        made.number = 7
        return made

    failed = trial(TrialState.FAIL, "failed: CUDA out of memory", {0: 0.5})
    assert trial_end_line(failed, "val_top5") == "trial   7  failed: CUDA out of memory"
    stopped = trial(TrialState.FAIL, "interrupted after epoch 2; queued again to resume from its checkpoint", {})
    assert trial_end_line(stopped, "val_top5") == (
        "trial   7  interrupted after epoch 2; queued again to resume from its checkpoint"
    )
    diverged = trial(TrialState.PRUNED, "non-finite train loss (nan) at epoch 3", {0: 0.4, 1: 0.5})
    assert trial_end_line(diverged, "val_top5").startswith("trial   7  diverged: non-finite train loss")
    pruned = trial(TrialState.PRUNED, "pruned after epoch 3 (val_top5=0.6100)", {0: 0.4, 1: 0.5, 2: 0.61})
    assert trial_end_line(pruned, "val_top5") == "trial   7  pruned after epoch 3 of 5  (val_top5 0.6100)"
    assert trial_end_line(trial(TrialState.FAIL, None, {}), "val_top5") == "trial   7  failed: no reason recorded"
