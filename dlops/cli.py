"""The ``dlops`` command line. Each command parses, calls one library function and
prints a summary; errors a user can cause end in one line and a non-zero exit."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dlops.errors import DlopsError
from dlops.storage import mask_url
from dlops.text import plural

# Plain (click-style) help: Typer's rich help shows a flag as "<bool>", reads "[default: ...]"
# in a help text as markup (and drops it) and cuts a long default with "…" at 80 columns.
app = typer.Typer(help="Optuna studies for deep-learning experiments, and reference runs with reports.",
                  no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None)
study_app = typer.Typer(help="Run and inspect hyperparameter studies.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(study_app, name="study")
data_app = typer.Typer(help="Fetch, prepare and inspect datasets (Tiny ImageNet, STL-10).", no_args_is_help=True,
                       rich_markup_mode=None)
app.add_typer(data_app, name="data")

console = Console()
err_console = Console(stderr=True)

LOSS_CHOICES = ("ce", "triplet", "center")


def quiet_optuna() -> None:
    """dlops prints its own progress lines; Optuna's per-trial INFO logs would repeat them."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def fail(message: str, code: int = 2) -> None:
    # escape: a message naming a spec table ("[search.lr]: ...") is text, not rich markup
    err_console.print(f"[bold red]error:[/] {escape(mask_url(message))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a :class:`DlopsError` into one line on stderr and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DlopsError as exc:
            fail(str(exc), exc.exit_code)
        except OSError as exc:  # a full disk where no dlops writer saw it (a library's own file)
            from dlops.io import DiskFull, write_error

            error = write_error(exc, Path(exc.filename)) if exc.filename else None
            if not isinstance(error, DiskFull):
                raise
            fail(str(error), error.exit_code)

    return wrapper


def _spec_name(spec: Optional[str], loss: Optional[str]) -> str:
    if loss is not None:
        if loss not in LOSS_CHOICES:
            raise DlopsError(f"unknown loss {loss!r} (choose from {', '.join(LOSS_CHOICES)})")
        if spec is not None and spec != f"resnet18-{loss}":
            raise DlopsError(f"give either SPEC or --loss, not both ({spec} vs --loss {loss})")
        return f"resnet18-{loss}"
    if spec is None:
        raise DlopsError("name a spec (e.g. resnet18-ce, autoencoder, or a .toml path) or give --loss")
    return spec


StorageOpt = Annotated[Optional[str], typer.Option("--storage", help="Optuna storage URL (default: $DLOPS_STORAGE, else sqlite:///$DLOPS_HOME/dlops.db)")]


@study_app.command("run", short_help="Run (or continue) the Optuna study of a spec.")
@user_errors
def study_run(
    spec: Annotated[Optional[str], typer.Argument(help="Built-in spec name or path to a .toml spec")] = None,
    loss: Annotated[Optional[str], typer.Option(help="ce | triplet | center: the spec resnet18-LOSS")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="Dataset to run on (e.g. digits, tiny-imagenet)")] = None,
    n_trials: Annotated[Optional[int], typer.Option(min=1, help="Finished trials this run adds, counted from when it "
                                                    "joins; other runs' trials do not count (default: the spec's)")] = None,
    total_trials: Annotated[Optional[int], typer.Option(min=1, help="Instead of --n-trials: work until the study has N "
                                                        "finished trials in all, whichever run or machine ran them")] = None,
    timeout: Annotated[Optional[float], typer.Option(min=0, help="Stop starting trials after S seconds")] = None,
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Epochs per trial [default: the spec's]")] = None,
    storage: StorageOpt = None,
    study_name: Annotated[Optional[str], typer.Option(help="Study name (default: the spec's name; SPEC-DATASET "
                                                      "with a --dataset other than the spec's own, e.g. "
                                                      "resnet18-ce-digits)")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Sampler seed; trial k trains with seed+k")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:K")] = "auto",
    subset_classes: Annotated[Optional[int], typer.Option(min=1, help="Use only the first N classes")] = None,
    subset_per_class: Annotated[Optional[int], typer.Option(min=1, help="...and the first M training images of each")] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Worker processes on this machine (one GPU each); "
                                         "not with SQLite")] = 1,
    heartbeat_interval: Annotated[int, typer.Option(min=1, help="PostgreSQL: seconds between trial heartbeats")] = 60,
    grace_period: Annotated[Optional[int], typer.Option(min=1, help="PostgreSQL: a trial silent this long is failed "
                                                        "and retried [default: 2x heartbeat]")] = None,
) -> None:
    """Run (or continue) the Optuna study of a spec. Ctrl-C stops at the next epoch end."""
    from dlops.notes import finish_study_run
    from dlops.search import RunOptions, check_run, objective_note, run_target, summarize
    from dlops.spec import load_spec
    from dlops.workers import run_workers, stopped_message

    quiet_optuna()
    asked = load_spec(_spec_name(spec, loss)).for_dataset(dataset)
    overrides = {k: v for k, v in {"subset_classes": subset_classes, "subset_per_class": subset_per_class}.items() if v}
    options = RunOptions(dataset=dataset, n_trials=n_trials, timeout=timeout, epochs=epochs, storage=storage,
                         study_name=study_name, seed=seed, device=device, train_overrides=overrides,
                         heartbeat_interval=heartbeat_interval, grace_period=grace_period, total_trials=total_trials)
    run_target(asked, options)
    the_spec = check_run(asked, options)  # device, data, classes: one line before anything is written
    metric = the_spec.metric

    def on_epoch(trial: int, epoch: int, m: dict[str, float]) -> None:
        console.print(
            f"trial {trial:>3}  epoch {epoch + 1:>3}  train_loss {m['train_loss']:.4f}  train_acc {m['train_acc']:.4f}"
            f"  val_top1 {m.get('val_top1', float('nan')):.4f}  val_top5 {m.get('val_top5', float('nan')):.4f}"
            + ("" if metric in ("val_top1", "val_top5") else f"  {metric} {m[metric]:.4f}")
            + f"  ({m['epoch_seconds']:.1f}s)",
            highlight=False, soft_wrap=True,
        )

    on = dataset or the_spec.train.get("dataset")
    console.print(f"study [bold]{escape(options.study_name_for(the_spec))}[/] ({escape(the_spec.description or the_spec.name)})"
                  + (f" on {on}" if on else ""), highlight=False)
    note = objective_note(asked, the_spec)
    if note:
        console.print(note, highlight=False, soft_wrap=True, markup=False)
    say = lambda msg: console.print(mask_url(msg), highlight=False, soft_wrap=True, markup=False)  # noqa: E731
    result = run_workers(the_spec, options, workers, on_epoch=on_epoch, say=say)
    finish_study_run(the_spec, options, result.study, plots=not result.interrupted, say=say)
    _print_summary(summarize(result.study))
    if result.interrupted:
        console.print(stopped_message(result, ["dlops", *sys.argv[1:]]), highlight=False, soft_wrap=True, markup=False)
        raise typer.Exit(128 + result.interrupted)


def _print_summary(summary: dict[str, Any]) -> None:
    table = Table(title=f"study {summary['name']}", show_header=False)
    best = summary["best"]
    if best:
        table.add_row(f"best {summary['metric'] or 'value'}", f"{best['value']:.4f} (trial {best['number']})")
        for k, v in best["params"].items():
            table.add_row(f"  {k}", f"{v:.4g}" if isinstance(v, float) else str(v))
    else:
        table.add_row("best", "no complete trial yet")
    for state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING"):
        table.add_row(state.lower(), str(summary["states"].get(state, 0)))
    console.print(table)


@study_app.command("list")
@user_errors
def study_list(storage: StorageOpt = None) -> None:
    """List the studies in the storage."""
    from dlops.paths import default_storage_url
    from dlops.studies import list_studies

    rows = list_studies(storage or default_storage_url())
    if not rows:
        console.print("no studies yet")
        return
    table = Table("study", "trials", "complete", "pruned", "fail", "best")
    for r in rows:
        best = "-" if r["best_value"] is None else f"{r['best_value']:.4f}"
        table.add_row(r["name"], str(r["n_trials"]), str(r["states"].get("COMPLETE", 0)),
                      str(r["states"].get("PRUNED", 0)), str(r["states"].get("FAIL", 0)), best)
    console.print(table)


@study_app.command("show", short_help="Show a study: states, best trial, every trial.")
@user_errors
def study_show(
    name: Annotated[str, typer.Argument(help="Study name")],
    storage: StorageOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Show a study: trial states, best trial, every trial's value and params."""
    from dlops.paths import default_storage_url
    from dlops.studies import describe_study

    info = describe_study(name, storage or default_storage_url())
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2, default=str) + "\n")
        return
    _print_summary(info)
    table = Table("#", "state", "value", "epochs", "params")
    for t in info["trials"]:
        value = "-" if t["value"] is None else f"{t['value']:.4f}"
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["params"].items())
        table.add_row(str(t["number"]), t["state"], value, str(t["epochs"]), params)
    console.print(table)
    ep = info.get("epochs")
    if ep:
        stops = ep["pruned_stop_epochs"]
        console.print(f"epochs trained: {ep['trained']} of the {ep['unpruned']} the same trials would train unpruned "
                      f"({100 * ep['share']:.0f}%)" + (
                          "; pruned trials stopped after epoch " + ", ".join(f"{e} (#{n})" for n, e in stops.items())
                          if stops else "; no trial pruned"), highlight=False, soft_wrap=True, markup=False)


@study_app.command("replay", short_help="What each pruner would save on a study's curves.")
@user_errors
def study_replay(
    name: Annotated[str, typer.Argument(help="Study name, or a JSON file of curves (format dlops-curves)")],
    pruner: Annotated[Optional[list[str]], typer.Option(
        "--pruner", help="TYPE[:key=value,...] as a spec's [pruner] (none, median, percentile, successive_halving, "
                         "hyperband); repeat for more [default: each type at the usual settings]")] = None,
    complete_only: Annotated[bool, typer.Option("--complete-only", help="Replay only the trials that trained every "
                                                "epoch (a study that pruned)")] = False,
    tolerance: Annotated[float, typer.Option(min=0, help="How far below the unpruned best still counts as keeping "
                                             "it (0.005: half a point of accuracy)")] = 0.005,
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
        except DlopsError:
            own = None
        if own and own not in pruner:
            pruner.append(own)
    results = replay(curves, pruner, complete_only=complete_only, tolerance=tolerance)
    chosen = choose(results)
    if as_json:
        sys.stdout.write(json.dumps({
            "source": curves.source, "spec": curves.spec, "dataset": curves.dataset, "metric": curves.metric,
            "direction": curves.direction, "settings": curves.settings, "trials": len(curves.trials),
            "complete_only": complete_only, "tolerance": tolerance,
            "chosen": chosen.pruner if chosen else None, "results": [r.to_dict() for r in results],
        }, indent=2) + "\n")
        return
    used = [t for t in curves.trials if t.end != "pruned"] if complete_only else curves.trials
    r0 = results[0]
    console.print(f"replay of {curves.source}: {len(used)} trials, {r0.total_epochs} epochs unpruned; "
                  f"unpruned best {curves.metric or 'value'} {r0.unpruned_best:.4f} (trial {r0.unpruned_best_trial}), "
                  f"top 3: trials {', '.join(map(str, r0.top3))}", highlight=False, soft_wrap=True, markup=False)
    sys.stdout.write(format_table(results) + "\n")
    if chosen is None:
        console.print(f"no pruner kept the unpruned best within {100 * tolerance:g} points", highlight=False)
    else:
        console.print(f"fewest epochs keeping the best within {100 * tolerance:g} points: {chosen.pruner} "
                      f"({100 * chosen.share:.0f}% of the epochs)", highlight=False, soft_wrap=True, markup=False)


@app.command("dashboard", short_help="Serve optuna-dashboard on the study storage.")
@user_errors
def dashboard(
    storage: StorageOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port")] = 8080,
) -> None:
    """Serve optuna-dashboard on the study storage (and the artifact store)."""
    from dlops.paths import default_storage_url
    from dlops.studies import serve_dashboard

    url = storage or default_storage_url()
    console.print(f"optuna-dashboard for {mask_url(url)} on http://{host}:{port}/ (Ctrl-C stops)")
    serve_dashboard(url, host, port)


RootOpt = Annotated[Optional[str], typer.Option("--root", help="Data root (default: $DLOPS_HOME/data)")]
WorkersOpt = Annotated[Optional[int], typer.Option(min=1, help="Decoding processes (default: the CPU count, at most 8)")]


def _progress_on() -> bool:
    return err_console.is_terminal


def _print_prepared(manifest: dict[str, Any]) -> None:
    build = manifest.get("build") or {}
    splits = ", ".join(f"{k} {v:,}" for k, v in manifest["splits"].items())
    console.print(f"{manifest['dataset']}: {plural(manifest['classes'], 'class')}, {splits}; "
                  f"image shape {manifest['image_shape']}",
                  highlight=False, soft_wrap=True)
    if build and not manifest.get("reused"):
        console.print(f"cached {build['images']:,} images in {build['seconds']:.1f}s "
                      f"({build['images_per_second']:,.0f} images/s, {plural(build['workers'], 'decoding process')})",
                      highlight=False)


@data_app.command("fetch", short_help="Download or take the archive, check it, build the cache.")
@user_errors
def data_fetch(
    name: Annotated[str, typer.Argument(help="tiny-imagenet | stl10")],
    root: RootOpt = None,
    source: Annotated[Optional[str], typer.Option(help="Local archive or URL (mirror) instead of the official URL")] = None,
    md5: Annotated[Optional[str], typer.Option(help="Expected md5 of --source (default: the official archive's)")] = None,
    force: Annotated[bool, typer.Option("--force", help="Fetch and rebuild even if a cache exists")] = False,
    keep_archive: Annotated[bool, typer.Option("--keep-archive", help="Keep a downloaded archive after extraction")] = False,
    workers: WorkersOpt = None,
) -> None:
    """Download (or take) the archive, verify its md5, extract it safely and build the cache."""
    from dlops.data.manage import fetch_dataset

    manifest = fetch_dataset(name, root, source, md5, force=force, keep_archive=keep_archive, workers=workers,
                             progress=_progress_on(), log=lambda m: console.print(m, highlight=False, soft_wrap=True))
    _print_prepared(manifest)


@data_app.command("prepare")
@user_errors
def data_prepare(
    name: Annotated[str, typer.Argument(help="tiny-imagenet | stl10")],
    root: RootOpt = None,
    raw: Annotated[Optional[str], typer.Option(help="Extracted tree (default: ROOT/NAME/raw)")] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if a cache exists")] = False,
    val_fraction: Annotated[float, typer.Option(help="Hold-out of each training class for validation")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the validation hold-out")] = 0,
    workers: WorkersOpt = None,
) -> None:
    """Build the uint8 cache (and manifest) from an extracted tree."""
    from dlops.data.manage import prepare_dataset

    manifest = prepare_dataset(name, root, raw=raw, force=force, val_fraction=val_fraction, seed=seed, workers=workers,
                               progress=_progress_on(), log=lambda m: console.print(m, highlight=False, soft_wrap=True))
    _print_prepared(manifest)


@data_app.command("info")
@user_errors
def data_info(
    name: Annotated[str, typer.Argument(help="tiny-imagenet | stl10 | digits")],
    root: RootOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Counts per split, classes, image shape, cache size and place."""
    from dlops.data.manage import dataset_info

    info = dataset_info(name, root)
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return
    table = Table(title=f"dataset {name}", show_header=False)
    table.add_row("classes", str(info["classes"]))
    for split, count in info["splits"].items():
        table.add_row(f"  {split}", f"{count:,}")
    table.add_row("image shape", " x ".join(map(str, info["image_shape"])))
    table.add_row("cache", f"{info['cache_dir']} ({info['cache_bytes'] / 2**20:,.1f} MiB)" if info["cache_dir"] else "in memory")
    if info.get("holdout"):
        h = info["holdout"]
        table.add_row("validation", f"{h['count']:,} held out of {h['from']} ({h['fraction']:.0%} of each class, seed {h['seed']})")
    if info.get("source"):
        s = info["source"]
        table.add_row("source", f"{s['archive']} md5 {s['md5']}" + ("" if s.get("official") else " (not the official archive)"))
    console.print(table)


@data_app.command("show", short_help="Write a PNG of sample images and class counts.")
@user_errors
def data_show(
    name: Annotated[str, typer.Argument(help="tiny-imagenet | stl10 | digits")],
    root: RootOpt = None,
    out: Annotated[Optional[str], typer.Option(help="PNG path (default: $DLOPS_HOME/reports/data/NAME.png)")] = None,
    count: Annotated[int, typer.Option(min=1, max=256, help="Sample images in the grid")] = 32,
) -> None:
    """Write a PNG grid of sample images with class names and a per-class count histogram."""
    from dlops.data.manage import show_dataset

    path = show_dataset(name, root, out, count=count)
    console.print(f"wrote {path}", highlight=False, soft_wrap=True)


@app.command("final", short_help="Reference run: train, test once per seed, write a report.")
@user_errors
def final(
    spec: Annotated[Optional[str], typer.Argument(help="Built-in spec name (e.g. autoencoder) or path to a .toml spec")] = None,
    loss: Annotated[Optional[str], typer.Option(help="ce | triplet | center: the spec resnet18-LOSS")] = None,
    params: Annotated[str, typer.Option(help="best (the study's best trial) | baseline | FILE.json")] = "best",
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Epochs [default: the spec's [final] epochs]")] = None,
    seeds: Annotated[Optional[int], typer.Option(min=1, help="Seeds 0..N-1 [default: the spec's [final] seeds]")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="Dataset [default: the study's, else the spec's]")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the checkpoints of an interrupted run")] = False,
    storage: StorageOpt = None,
    study_name: Annotated[Optional[str], typer.Option(help="Study to take --params best from (default: the spec's "
                                                      "name; SPEC-DATASET with a --dataset other than the spec's "
                                                      "own)")] = None,
    subset_classes: Annotated[Optional[int], typer.Option(min=1, help="Use only the first N classes")] = None,
    subset_per_class: Annotated[Optional[int], typer.Option(min=1, help="...and the first M training images of each")] = None,
) -> None:
    """Reference run: train the chosen settings, test once per seed, write reports/<spec>/."""
    from dlops.final import FinalOptions, Interrupted, resume_command, run_final

    quiet_optuna()
    overrides = {k: v for k, v in {"subset_classes": subset_classes, "subset_per_class": subset_per_class}.items() if v}
    options = FinalOptions(params=params, dataset=dataset, epochs=epochs, seeds=seeds, device=device, resume=resume,
                           storage=storage, study_name=study_name, train_overrides=overrides)

    def on_epoch(seed: int, epoch: int, m: dict[str, float], restored: bool) -> None:
        console.print(
            f"seed {seed}  epoch {epoch + 1:>3}  train_loss {m['train_loss']:.4f}  train_acc {m['train_acc']:.4f}"
            f"  val_top1 {m.get('val_top1', float('nan')):.4f}  val_top5 {m.get('val_top5', float('nan')):.4f}"
            + ("  (from checkpoint)" if restored else f"  ({m['epoch_seconds']:.1f}s)"),
            highlight=False, soft_wrap=True,
        )

    def progress(seed: int, line: str) -> None:
        console.print(f"seed {seed}  {line}", highlight=False, soft_wrap=True)

    try:
        result = run_final(_spec_name(spec, loss), options, on_epoch=on_epoch, progress=progress,
                           notify=lambda msg: console.print(msg, highlight=False, soft_wrap=True))
    except Interrupted as exc:  # Ctrl-C or SIGTERM: say how to continue
        tail = f":\n  {resume_command(['dlops', *sys.argv[1:]])}" if exc.resumable else ""
        err_console.print(mask_url(str(exc)) + tail, highlight=False, soft_wrap=True, markup=False)
        raise typer.Exit(exc.exit_code) from None
    f = result.final
    table = Table(title=f"final {f['spec']} on {f['dataset']['name']} "
                        f"({plural(len(f['seeds']), 'seed')} x {plural(f['epochs'], 'epoch')})",
                  show_header=False)
    for key, mean in f["mean"].items():
        if mean is not None:
            table.add_row(key, f"{mean:.4f} ± {f['std'][key]:.4f}" if len(f["seeds"]) > 1 else f"{mean:.4f}")
    table.add_row("wall time", f"{f['wall_seconds']:.1f}s on {f['device']}")
    console.print(table)
    console.print(f"wrote {result.report_dir}/ ({plural(len(result.files), 'file')})"
                  + (f"; {plural(len(result.artifacts), 'artifact')} attached to {_attached_to(f)}"
                     if result.artifacts else ""),
                  highlight=False, soft_wrap=True)


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
    from dlops.notes import attach_study_plots
    from dlops.report import build_report

    quiet_optuna()
    result = build_report(storage, attach_study_plots=attach_study_plots)
    console.print(f"wrote {result.index} ({plural(len(result.entries), 'spec')}, {plural(len(result.files), 'file')})",
                  highlight=False)


if __name__ == "__main__":
    app()
