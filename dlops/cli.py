"""The ``dlops`` command line. Each command parses, calls one library function and
prints a summary; errors a user can cause end in one line and a non-zero exit."""

from __future__ import annotations

import functools
import json
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from dlops import console as out
from dlops.console import err_console, say
from dlops.errors import DlopsError
from dlops.storage import mask_url
from dlops.text import plural

# Click's error classes, reached through the one Typer exports (Typer vendors Click).
UsageError: type[Exception] = typer.BadParameter.__mro__[1]
ClickException: type[Exception] = UsageError.__mro__[1]


class OneLineErrors(TyperGroup):
    """A usage error (a bad option value, an unknown option) is one line on stderr and exit 2,
    like every other dlops error, instead of Click's usage block."""

    ORDER = ("study", "data", "final", "report", "dashboard")  # in `dlops --help`: in the order of use

    def list_commands(self, ctx: Any) -> list[str]:
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: self.ORDER.index(n) if n in self.ORDER else len(self.ORDER))

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        take_sigint()
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        except UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # `dlops study` alone: its help
                exc.show()  # type: ignore[attr-defined]
            else:
                ctx = getattr(exc, "ctx", None)
                hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
                out.error(exc.format_message().replace("Value error, ", "") + hint)  # type: ignore[attr-defined]
            sys.exit(exc.exit_code)  # type: ignore[attr-defined]
        except ClickException as exc:
            exc.show()  # type: ignore[attr-defined]
            sys.exit(exc.exit_code)  # type: ignore[attr-defined]
        except typer.Abort:
            out.error("aborted")
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


def take_sigint() -> None:
    """SIGINT stops every command as Ctrl-C does, even where the process started with it
    ignored: a shell script's background job (``dlops final ... &``) inherits SIGINT as
    SIG_IGN, so Python installs no KeyboardInterrupt for it and ``kill -INT`` did nothing
    (``dlops study run`` installs its own handler, the other commands did not)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


# Plain (click-style) help: Typer's rich help shows a flag as "<bool>", reads "[default: ...]"
# in a help text as markup (and drops it) and cuts a long default with "…" at 80 columns.
app = typer.Typer(
    help="Optuna studies for deep-learning experiments, and reference runs with reports.",
    cls=OneLineErrors,
    context_settings={"help_option_names": ["-h", "--help"]},  # every command's: subcommands inherit it
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    if value:
        from dlops.versions import version_line

        typer.echo(version_line())
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print the versions of dlops (and its commit), Python and the packages it runs on, and exit.",
        ),
    ] = False,
) -> None:
    """Optuna studies for deep-learning experiments, and reference runs with reports."""


study_app = typer.Typer(help="Run and inspect hyperparameter studies.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(study_app, name="study")
data_app = typer.Typer(
    help="Fetch, prepare and inspect datasets (Tiny ImageNet, STL-10; digits ships with scikit-learn).",
    short_help="Fetch, prepare and inspect datasets.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(data_app, name="data")


class Loss(StrEnum):
    """The losses of the ResNet18 specs: ``--loss L`` names the spec resnet18-L."""

    CE = "ce"
    TRIPLET = "triplet"
    CENTER = "center"


DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def parse_device(value: str) -> str:
    """``--device``: auto, cpu, cuda or cuda:K (whether this machine has it is checked by the run)."""
    if not DEVICE.fullmatch(value):
        raise typer.BadParameter(f"unknown device {value!r} (auto, cpu, cuda, cuda:K)")
    return value


DeviceOpt = Annotated[
    str,
    typer.Option(
        parser=parse_device,
        metavar="[auto|cpu|cuda|cuda:K]",
        help="Where to train: auto (CUDA if there is one), cpu, cuda, cuda:K",
    ),
]
LossOpt = Annotated[Loss | None, typer.Option(help="The spec resnet18-LOSS (instead of SPEC)")]


def quiet_optuna() -> None:
    """dlops prints its own progress lines; Optuna's per-trial INFO logs would repeat them."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def fail(message: str, code: int = 2) -> None:
    out.error(message)
    raise typer.Exit(code)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a :class:`DlopsError` into one line on stderr and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DlopsError as exc:
            fail(str(exc), exc.exit_code)
        except OSError as exc:  # a file no dlops writer checked: a full disk, $DLOPS_HOME on a file, no permission
            from dlops.io import DiskFull, write_error

            if not exc.filename:
                raise
            error = write_error(exc, Path(exc.filename))
            if isinstance(error, DiskFull):
                fail(str(error), error.exit_code)
            fail(f"cannot use {exc.filename}: {exc.strerror or exc}")

    return wrapper


def _spec_name(spec: str | None, loss: Loss | None) -> str:
    if loss is not None:
        if spec is not None and spec != f"resnet18-{loss.value}":
            raise DlopsError(f"give either SPEC or --loss, not both ({spec} vs --loss {loss.value})")
        return f"resnet18-{loss.value}"
    if spec is None:
        raise DlopsError("name a spec (e.g. resnet18-ce, autoencoder, or a .toml path) or give --loss")
    return spec


StorageOpt = Annotated[
    str | None,
    typer.Option("--storage", help="Optuna storage URL [default: $DLOPS_STORAGE, else sqlite:///$DLOPS_HOME/dlops.db]"),
]


@study_app.command("run", short_help="Run (or continue) the Optuna study of a spec.")
@user_errors
def study_run(
    spec: Annotated[
        str | None, typer.Argument(metavar="SPEC", help="Built-in spec name or path to a .toml spec")
    ] = None,
    loss: LossOpt = None,
    dataset: Annotated[
        str | None, typer.Option(help="Dataset to run on (e.g. digits, tiny-imagenet) [default: the spec's]")
    ] = None,
    n_trials: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Finished trials this run adds, counted from when it "
            "joins; other runs' trials do not count [default: the spec's n_trials]",
        ),
    ] = None,
    total_trials: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Instead of --n-trials: work until the study has N "
            "finished trials in all, whichever run or machine ran them",
        ),
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(min=0, help="Stop starting trials after S seconds [default: no limit]")
    ] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Epochs per trial [default: the spec's]")] = None,
    storage: StorageOpt = None,
    study_name: Annotated[
        str | None,
        typer.Option(
            help="Study name [default: the spec's name; SPEC-DATASET "
            "with a --dataset other than the spec's own, e.g. "
            "resnet18-ce-digits]"
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=2**32 - 1,
            help="Sampler seed (0 to 2**32-1); trial k trains with seed+k [default: the spec's sampler seed, else 0]",
        ),
    ] = None,
    device: DeviceOpt = "auto",
    subset_classes: Annotated[
        int | None, typer.Option(min=1, help="Use only the first N classes [default: all]")
    ] = None,
    subset_per_class: Annotated[
        int | None, typer.Option(min=1, help="...and the first M training images of each [default: all]")
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            min=1,
            help="Worker processes on this machine (each its own GPU where there are several); "
            "more than 1 needs a journal, PostgreSQL or Redis --storage, not SQLite",
        ),
    ] = 1,
    heartbeat_interval: Annotated[
        int | None,
        typer.Option(min=1, help="PostgreSQL only: seconds between trial heartbeats [default: 60]"),
    ] = None,
    grace_period: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="PostgreSQL only: a trial silent this long is failed and retried; at least the heartbeat "
            "interval [default: 2x heartbeat]",
        ),
    ] = None,
) -> None:
    """Run (or continue) the Optuna study of a spec. Ctrl-C stops at the next epoch end."""
    from dlops.notes import finish_study_run
    from dlops.objective import RunOptions
    from dlops.runner import check_run, objective_note, run_target, run_workers
    from dlops.spec import load_spec
    from dlops.stopping import exit_code, stopped_message
    from dlops.studies import summarize

    quiet_optuna()
    asked = load_spec(_spec_name(spec, loss)).for_dataset(dataset)
    overrides = {k: v for k, v in {"subset_classes": subset_classes, "subset_per_class": subset_per_class}.items() if v}
    options = RunOptions(
        dataset=dataset,
        n_trials=n_trials,
        timeout=timeout,
        epochs=epochs,
        storage=storage,
        study_name=study_name,
        seed=seed,
        device=device,
        train_overrides=overrides,
        heartbeat_interval=heartbeat_interval,
        grace_period=grace_period,
        total_trials=total_trials,
    )
    run_target(asked, options)
    the_spec = check_run(asked, options, workers)  # storage URL, device, data: one line before anything
    metric = the_spec.metric

    def on_epoch(trial: int, epoch: int, m: dict[str, float]) -> None:
        say(out.epoch_line(out.trial_label(trial), epoch, m, metric))

    on = dataset or the_spec.train.get("dataset")
    say(
        f"study {options.study_name_for(the_spec)} ({the_spec.description or the_spec.name})"
        + (f" on {on}" if on else "")
    )
    note = objective_note(asked, the_spec)
    if note:
        say(note)
    result = run_workers(the_spec, options, workers, on_epoch=on_epoch, say=say)
    finish_study_run(the_spec, options, result.study, plots=not result.interrupted, say=say)
    out.print_study_summary(summarize(result.study))
    if result.interrupted:
        say(stopped_message(result, ["dlops", *sys.argv[1:]]))
        raise typer.Exit(exit_code(result.interrupted))


@study_app.command("list")
@user_errors
def study_list(
    storage: StorageOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """List the studies in the storage."""
    from dlops.paths import default_storage_url
    from dlops.storage import mask_url
    from dlops.studies import study_listing

    url = storage or default_storage_url()
    rows, absent = study_listing(url)
    if as_json:
        from dlops.io import json_safe

        listing = {"storage": mask_url(url), "studies": rows, "no_storage": absent}
        sys.stdout.write(json.dumps(json_safe(listing), indent=2) + "\n")  # strict: no NaN, Infinity
        return
    out.print_study_list(rows, url, absent)


@study_app.command("show", short_help="Show a study: states, best trial, every trial.")
@user_errors
def study_show(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Study name")],
    storage: StorageOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Show a study: trial states, best trial, every trial's value and params."""
    from dlops.paths import default_storage_url
    from dlops.studies import describe_study

    info = describe_study(name, storage or default_storage_url())
    if as_json:
        from dlops.io import json_safe

        sys.stdout.write(json.dumps(json_safe(info), indent=2, default=str) + "\n")  # strict: no NaN, Infinity
        return
    out.print_study_trials(info)


@study_app.command("replay", short_help="What each pruner would save on a study's curves.")
@user_errors
def study_replay(
    name: Annotated[
        str,
        typer.Argument(metavar="NAME|CURVES.json", help="Study name, or a JSON file of curves (format dlops-curves)"),
    ],
    pruner: Annotated[
        list[str] | None,
        typer.Option(
            "--pruner",
            metavar="TYPE[:KEY=VALUE,...]",
            help="A pruner and its settings as in a spec's [pruner] (none, median, percentile, successive_halving, "
            "hyperband); repeat for more [default: each type at the usual settings, and the spec's own]",
        ),
    ] = None,
    complete_only: Annotated[
        bool,
        typer.Option("--complete-only", help="Replay only the trials that trained every epoch (a study that pruned)"),
    ] = False,
    tolerance: Annotated[
        float,
        typer.Option(
            min=0, help="How far below the unpruned best still counts as keeping it (0.005: half a point of accuracy)"
        ),
    ] = 0.005,
    storage: StorageOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Replay pruners on a study's unpruned learning curves: epochs each would train, and whether it keeps the best."""
    from dlops.replay import DEFAULT_CANDIDATES, choose, format_table, load_curves, pruner_label, replay
    from dlops.spec import load_spec

    quiet_optuna()
    curves = load_curves(name, storage)
    if not pruner:  # the usual candidates, and the pruner of the spec that made the curves
        pruner = list(DEFAULT_CANDIDATES)
        try:
            own = pruner_label(dict(load_spec(curves.spec).pruner)) if curves.spec else None
        except (DlopsError, OSError, ValueError):  # a spec the curves name that cannot be read: no own pruner
            own = None
        if own and own not in pruner:
            pruner.append(own)
    results = replay(curves, pruner, complete_only=complete_only, tolerance=tolerance)
    chosen = choose(results)
    if as_json:
        from dlops.io import json_safe

        sys.stdout.write(
            json.dumps(
                json_safe(  # strict JSON: a non-finite value (a plain Optuna study's inf) is null
                    {
                        "source": curves.source,
                        "spec": curves.spec,
                        "dataset": curves.dataset,
                        "metric": curves.metric,
                        "direction": curves.direction,
                        "settings": curves.settings,
                        "trials": len(curves.trials),
                        "complete_only": complete_only,
                        "tolerance": tolerance,
                        "chosen": chosen.pruner if chosen else None,
                        "results": [r.to_dict() for r in results],
                    }
                ),
                indent=2,
            )
            + "\n"
        )
        return
    used = [t for t in curves.trials if t.end != "pruned"] if complete_only else curves.trials
    r0 = results[0]
    say(
        f"replay of {curves.source}: {len(used)} trials, {r0.total_epochs} epochs unpruned; "
        f"unpruned best {curves.metric or 'value'} {r0.unpruned_best:.4f} (trial {r0.unpruned_best_trial}), "
        f"top 3: trials {', '.join(map(str, r0.top3))}"
    )
    sys.stdout.write(format_table(results) + "\n")
    if chosen is None:
        say(f"no pruner kept the unpruned best within {100 * tolerance:g} points")
    else:
        say(
            f"fewest epochs keeping the best within {100 * tolerance:g} points: {chosen.pruner} "
            f"({100 * chosen.share:.0f}% of the epochs)"
        )


@study_app.command("delete", short_help="Delete a study, its trial checkpoints and its dashboard files.")
@user_errors
def study_delete(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Study name")],
    storage: StorageOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask (needed where stdin is not a terminal)")] = False,
    force: Annotated[
        bool,
        typer.Option(help="Delete even with trials RUNNING whose workers are not on this machine (or not known)"),
    ] = False,
) -> None:
    """Delete a study from the storage, with its trials' checkpoints and the files it showed on
    the dashboard. Refused while one of its workers runs here. Reference runs made from it
    keep their final.json."""
    from dlops.paths import default_storage_url
    from dlops.removal import check_deletable, delete_study, open_for_deletion, plan_deletion

    quiet_optuna()
    the_storage = open_for_deletion(storage or default_storage_url())
    plan = plan_deletion(the_storage, name)
    check_deletable(plan, force=force)
    if not yes:
        if not sys.stdin.isatty():
            raise DlopsError(f"would delete {plan.summary()}: add --yes to delete it without a terminal to ask on")
        typer.confirm(f"delete {plan.summary()}?", abort=True)
    done = delete_study(the_storage, name, force=force)
    say(f"deleted {done.summary()}")


@app.command("dashboard", short_help="Serve optuna-dashboard on the study storage.")
@user_errors
def dashboard(
    storage: StorageOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port")] = 8080,
) -> None:
    """Serve optuna-dashboard on the study storage (and the artifact store)."""
    from dlops.dashboard import serve_dashboard
    from dlops.paths import default_storage_url

    serve_dashboard(storage or default_storage_url(), host, port, ready=say)


def sigterm_like_ctrl_c(fn: Callable[..., Any]) -> Callable[..., Any]:
    """SIGTERM stops the command as Ctrl-C does (every ``finally`` runs: partial downloads and
    scratch folders are removed) and exits 143 instead of dying where it stands."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from dlops.io import Terminated, sigterm_interrupts

        try:
            with sigterm_interrupts():
                return fn(*args, **kwargs)
        except Terminated:
            err_console.print("stopped by SIGTERM", highlight=False, markup=False)
            raise typer.Exit(128 + Terminated.signum) from None

    return wrapper


RootOpt = Annotated[str | None, typer.Option("--root", help="Data root [default: $DLOPS_DATA, else $DLOPS_HOME/data]")]
WorkersOpt = Annotated[int | None, typer.Option(min=1, help="Decoding processes [default: the CPU count, at most 8]")]
ValFractionOpt = Annotated[
    float | None,
    typer.Option(help="Hold-out of each training class for validation [default: the present cache's, else 0.1]"),
]
HoldoutSeedOpt = Annotated[
    int | None,
    typer.Option(min=0, max=2**32 - 1, help="Seed of the validation hold-out [default: the present cache's, else 0]"),
]


def _progress_on() -> bool:
    return err_console.is_terminal


@data_app.command("fetch", short_help="Download or take the archive, check it, build the cache.")
@sigterm_like_ctrl_c
@user_errors
def data_fetch(
    name: Annotated[str, typer.Argument(metavar="NAME", help="tiny-imagenet | stl10")],
    root: RootOpt = None,
    source: Annotated[
        str | None, typer.Option(help="Local archive or URL (mirror) instead of the official URL")
    ] = None,
    md5: Annotated[str | None, typer.Option(help="Expected md5 of --source [default: the official archive's]")] = None,
    force: Annotated[bool, typer.Option("--force", help="Fetch and rebuild even if a cache exists")] = False,
    keep_archive: Annotated[
        bool, typer.Option("--keep-archive", help="Keep a downloaded archive after extraction")
    ] = False,
    val_fraction: ValFractionOpt = None,
    seed: HoldoutSeedOpt = None,
    workers: WorkersOpt = None,
) -> None:
    """Download (or take) the archive, verify its md5, extract it safely and build the cache."""
    from dlops.data.manage import fetch_dataset

    manifest = fetch_dataset(
        name,
        root,
        source,
        md5,
        force=force,
        keep_archive=keep_archive,
        val_fraction=val_fraction,
        seed=seed,
        workers=workers,
        progress=_progress_on(),
        say=say,
    )
    out.print_prepared(manifest)


@data_app.command("prepare")
@sigterm_like_ctrl_c
@user_errors
def data_prepare(
    name: Annotated[str, typer.Argument(metavar="NAME", help="tiny-imagenet | stl10")],
    root: RootOpt = None,
    raw: Annotated[str | None, typer.Option(help="Extracted tree [default: ROOT/NAME/raw]")] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if a cache exists")] = False,
    val_fraction: ValFractionOpt = None,
    seed: HoldoutSeedOpt = None,
    workers: WorkersOpt = None,
) -> None:
    """Build the uint8 cache (and manifest) from an extracted tree."""
    from dlops.data.manage import prepare_dataset

    manifest = prepare_dataset(
        name,
        root,
        raw=raw,
        force=force,
        val_fraction=val_fraction,
        seed=seed,
        workers=workers,
        progress=_progress_on(),
        say=say,
    )
    out.print_prepared(manifest)


@data_app.command("info")
@user_errors
def data_info(
    name: Annotated[str, typer.Argument(metavar="NAME", help="tiny-imagenet | stl10 | digits")],
    root: RootOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Counts per split, classes, image shape, cache size and place."""
    from dlops.data.manage import dataset_info

    info = dataset_info(name, root)
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return
    out.print_dataset_info(name, info)


@data_app.command("show", short_help="Write a PNG of sample images and class counts.")
@user_errors
def data_show(
    name: Annotated[str, typer.Argument(metavar="NAME", help="tiny-imagenet | stl10 | digits")],
    root: RootOpt = None,
    out: Annotated[str | None, typer.Option(help="PNG path [default: $DLOPS_HOME/reports/data/NAME.png]")] = None,
    count: Annotated[int, typer.Option(min=1, max=256, help="Sample images in the grid")] = 32,
) -> None:
    """Write a PNG grid of sample images with class names and a per-class count histogram."""
    from dlops.data.manage import show_dataset

    path = show_dataset(name, root, out, count=count)
    say(f"wrote {path}")


@app.command("final", short_help="Reference run: train, test once per seed, write a report.")
@user_errors
def final(
    spec: Annotated[
        str | None,
        typer.Argument(metavar="SPEC", help="Built-in spec name (e.g. autoencoder) or path to a .toml spec"),
    ] = None,
    loss: LossOpt = None,
    params: Annotated[str, typer.Option(help="best (the study's best trial) | baseline | FILE.json")] = "best",
    epochs: Annotated[int | None, typer.Option(min=1, help="Epochs [default: the spec's [final] epochs]")] = None,
    seeds: Annotated[int | None, typer.Option(min=1, help="Seeds 0..N-1 [default: the spec's [final] seeds]")] = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset [default: the study's, else the spec's]")] = None,
    device: DeviceOpt = "auto",
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the checkpoints of an interrupted run")
    ] = False,
    storage: StorageOpt = None,
    study_name: Annotated[
        str | None,
        typer.Option(
            help="Study to take --params best from [default: the spec's "
            "name; SPEC-DATASET with a --dataset other than the spec's "
            "own]"
        ),
    ] = None,
    subset_classes: Annotated[
        int | None, typer.Option(min=1, help="Use only the first N classes [default: all]")
    ] = None,
    subset_per_class: Annotated[
        int | None, typer.Option(min=1, help="...and the first M training images of each [default: all]")
    ] = None,
) -> None:
    """Reference run: train the chosen settings, test once per seed, write reports/<spec>/."""
    from dlops.final import FinalOptions, Interrupted, resume_command, run_final

    quiet_optuna()
    overrides = {k: v for k, v in {"subset_classes": subset_classes, "subset_per_class": subset_per_class}.items() if v}
    options = FinalOptions(
        params=params,
        dataset=dataset,
        epochs=epochs,
        seeds=seeds,
        device=device,
        resume=resume,
        storage=storage,
        study_name=study_name,
        train_overrides=overrides,
    )

    def on_epoch(seed: int, epoch: int, m: dict[str, float], restored: bool) -> None:
        say(out.epoch_line(f"seed {seed}", epoch, m, restored=restored))

    def progress(seed: int, line: str) -> None:
        say(f"seed {seed}  {line}")

    try:
        result = run_final(_spec_name(spec, loss), options, on_epoch=on_epoch, progress=progress, say=say)
    except Interrupted as exc:  # Ctrl-C or SIGTERM: say how to continue
        tail = f":\n  {resume_command(['dlops', *sys.argv[1:]])}" if exc.resumable else ""
        err_console.print(mask_url(str(exc)) + tail, highlight=False, soft_wrap=True, markup=False)
        raise typer.Exit(exc.exit_code) from None
    f = result.final
    out.print_final(f)
    say(
        f"wrote {result.report_dir}/ ({plural(len(result.files), 'file')})"
        + (f"; {plural(len(result.artifacts), 'artifact')} attached to {_attached_to(f)}" if result.artifacts else "")
    )


def _attached_to(final: dict[str, Any]) -> str:
    """Where ``dlops final`` put its artifacts: the trial its settings came from, else the study."""
    source, study = final.get("params_source") or {}, (final.get("study") or {}).get("name")
    if source.get("kind") == "trial" and source.get("trial") is not None:
        return f"trial {source['trial']} of study {study}"
    return f"study {study}"


@app.command("report", short_help="Write reports/index.md over every spec.")
@user_errors
def report(storage: StorageOpt = None) -> None:
    """Write $DLOPS_HOME/reports/index.md: the losses side by side, then the autoencoder."""
    from dlops.dashboard import attach_study_plots
    from dlops.report import build_report

    quiet_optuna()
    result = build_report(storage, attach_study_plots=attach_study_plots)
    if result.no_storage:
        say(f"note: {result.no_storage}; the report has reference runs only")
    if result.not_attached:
        say(f"note: {result.not_attached}; the report has every study's plots, the dashboard those it had")
    for name, why in result.skipped.items():
        say(f"left out study {name}: {why}")
    for folder, spec in result.copies.items():
        say(f"left reports/{folder}/ as it is: a copy of a reference run of {spec}, not {folder}'s own")
    for folder, why in result.removed.items():
        say(f"removed reports/{folder}/, which an earlier report wrote: {why}")
    for folder, (why, left) in result.kept.items():
        say(f"took the report files out of reports/{folder}/ ({why}); it stays for {', '.join(left)}, not dlops's")
    specs = sum(e.spec is not None for e in result.entries)
    parts = [plural(specs, "spec"), plural(len(result.entries) - specs, "study")]
    counted = ", ".join(p for p in parts if not p.startswith("0 ")) or "0 specs"
    say(f"wrote {result.index} ({counted}, {plural(len(result.files), 'file')})")


if __name__ == "__main__":
    app()
