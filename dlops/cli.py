"""The ``dlops`` command line. Each command parses, calls one library function and
prints a summary; errors a user can cause end in one line and a non-zero exit."""

from __future__ import annotations

import functools
import json
import sys
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from dlops.errors import DlopsError
from dlops.storage import mask_url

app = typer.Typer(help="Optuna studies for deep-learning experiments, and reference runs with reports.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
study_app = typer.Typer(help="Run and inspect hyperparameter studies.", no_args_is_help=True)
app.add_typer(study_app, name="study")

console = Console()
err_console = Console(stderr=True)

LOSS_CHOICES = ("ce", "triplet", "center")


def quiet_optuna() -> None:
    """dlops prints its own progress lines; Optuna's per-trial INFO logs would repeat them."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {mask_url(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a :class:`DlopsError` into one line on stderr and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DlopsError as exc:
            fail(str(exc), exc.exit_code)

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


StorageOpt = Annotated[Optional[str], typer.Option("--storage", help="Optuna storage URL [default: $DLOPS_STORAGE or sqlite:///$DLOPS_HOME/dlops.db]")]


@study_app.command("run")
@user_errors
def study_run(
    spec: Annotated[Optional[str], typer.Argument(help="Built-in spec name or path to a .toml spec")] = None,
    loss: Annotated[Optional[str], typer.Option(help="ce | triplet | center: the spec resnet18-LOSS")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="Dataset to run on (e.g. digits, tiny-imagenet)")] = None,
    n_trials: Annotated[Optional[int], typer.Option(min=1, help="Finished trials to add [default: the spec's]")] = None,
    timeout: Annotated[Optional[float], typer.Option(min=0, help="Stop starting trials after S seconds")] = None,
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Epochs per trial [default: the spec's]")] = None,
    storage: StorageOpt = None,
    study_name: Annotated[Optional[str], typer.Option(help="Study name [default: the spec's name]")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Sampler seed; trial k trains with seed+k")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    subset_classes: Annotated[Optional[int], typer.Option(min=1, help="Use only the first N classes")] = None,
    subset_per_class: Annotated[Optional[int], typer.Option(min=1, help="...and the first M training images of each")] = None,
) -> None:
    """Run (or continue) the Optuna study of a spec."""
    from dlops.search import RunOptions, run_study, summarize
    from dlops.spec import load_spec

    quiet_optuna()
    the_spec = load_spec(_spec_name(spec, loss))
    overrides = {k: v for k, v in {"subset_classes": subset_classes, "subset_per_class": subset_per_class}.items() if v}
    options = RunOptions(dataset=dataset, n_trials=n_trials, timeout=timeout, epochs=epochs, storage=storage,
                         study_name=study_name, seed=seed, device=device, train_overrides=overrides)
    metric = the_spec.metric

    def on_epoch(trial: int, epoch: int, m: dict[str, float]) -> None:
        console.print(
            f"trial {trial:>3}  epoch {epoch + 1:>3}  train_loss {m['train_loss']:.4f}  train_acc {m['train_acc']:.4f}"
            f"  val_top1 {m.get('val_top1', float('nan')):.4f}  {metric} {m[metric]:.4f}  ({m['epoch_seconds']:.1f}s)",
            highlight=False, soft_wrap=True,
        )

    console.print(f"study [bold]{options.study_name or the_spec.name}[/] ({the_spec.description or the_spec.name})")
    result = run_study(the_spec, options, on_epoch=on_epoch)
    _print_summary(summarize(result.study))


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


@study_app.command("show")
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


@app.command("dashboard")
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


if __name__ == "__main__":
    app()
