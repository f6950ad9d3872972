"""What dlops prints: progress lines and summary tables, in one format wherever they come
from (one worker or many, a study or a final run)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dlops.run_data import short_subset_text, study_data_text
from dlops.storage import mask_url
from dlops.studies import trial_ending
from dlops.text import plural

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

console = Console(emoji=False)  # ":b:" in a study name is text, not an emoji code
err_console = Console(stderr=True, emoji=False)

_SHOWN = ("train_loss", "train_acc", "val_top1", "val_top5")  # every epoch line, where the trainer reports them


def say(message: str) -> None:
    """One plain line on stdout (no markup, passwords masked)."""
    console.print(mask_url(message), highlight=False, soft_wrap=True, markup=False)


def error(message: str) -> None:
    """One error line on stderr (a message naming "[search.lr]" is text, not markup)."""
    err_console.print(f"[bold red]error:[/] {escape(mask_url(message))}", highlight=False, soft_wrap=True)


def epoch_line(who: str, epoch: int, m: dict[str, float], metric: str | None = None, restored: bool = False) -> str:
    """The progress line of one epoch of ``who`` (``trial   3``, ``seed 0``): the losses and
    accuracies the trainer reported, the study's metric if it is another, the seconds."""
    parts = [f"{who}  epoch {epoch + 1:>3}"]
    parts += [f"{k} {m[k]:.4f}" for k in _SHOWN if k in m]
    if metric is not None and metric not in _SHOWN and metric in m:
        parts.append(f"{metric} {m[metric]:.4f}")
    tail = "(from checkpoint)" if restored else f"({m.get('epoch_seconds', float('nan')):.1f}s)"
    return "  ".join(parts) + "  " + tail


def trial_label(number: int) -> str:
    return f"trial {number:>3}"


def trial_end_line(trial: FrozenTrial, metric: str | None, best: tuple[int, float] | None = None) -> str:
    """How one trial ended, after its epoch lines: complete with its value against the
    study's best, pruned after which epoch, diverged, interrupted, or failed with the reason
    the trial keeps (its dashboard note says the same, from :func:`dlops.studies.trial_ending`)."""
    end = trial_ending(trial)
    label = trial_label(trial.number)
    name = metric or "value"
    if end.kind == "complete":
        line = f"{label}  complete  {name} {trial.value:.4f}"
        if best is not None:
            line += "  best so far" if best[0] == trial.number else f"  (best: trial {best[0]}, {best[1]:.4f})"
        return line
    if end.kind == "diverged":
        return f"{label}  diverged: {end.reason}; pruned"
    if end.kind == "pruned":
        if end.last is None:
            return f"{label}  pruned"
        of = f" of {end.planned}" if end.planned else ""
        return f"{label}  pruned after epoch {end.epochs}{of}  ({name} {end.last:.4f})"
    if end.kind == "interrupted":
        return f"{label}  {end.reason}"
    if end.kind == "failed":
        return f"{label}  failed: {end.reason or 'no reason recorded'}"
    return f"{label}  {end.kind}"


NOT_RECORDED = "not recorded (a study of plain Optuna or of an older dlops)"


def trains_on_rows(on: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The summary's rows of what a study trains on (:func:`dlops.studies.trains_on`): the
    dataset with its subset, classes and chance level, and the epochs a trial trains."""
    if on is None:
        return [("data", NOT_RECORDED)]
    if on["dataset"] is None:
        data = "not recorded"
    elif on["epochs_per_trial"] is None:  # no config recorded: the subset is not known either
        data = f"{on['dataset']} (subset not recorded)"
    else:
        data = study_data_text(on["dataset"], on, on["classes"])
    return [("data", data), ("epochs per trial", str(on["epochs_per_trial"] or "not recorded"))]


def print_study_summary(summary: dict[str, Any]) -> None:
    table = Table(title=f"study {escape(summary['name'])}", show_header=False)
    for label, text in trains_on_rows(summary.get("trains_on")):
        table.add_row(label, escape(text))
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


def print_study_list(rows: list[dict[str, Any]], url: str, absent: str | None = None) -> None:
    """The studies of ``url`` as a table; ``absent``: why there are none (no storage there yet)."""
    if not rows:
        why = f": {absent}" if absent else ""
        console.print(f"no studies yet in {mask_url(url)}{why}", markup=False, highlight=False, soft_wrap=True)
        return
    table = Table("study", "data", "epochs/trial", "trials", "complete", "pruned", "fail", "best")
    table.columns[0].no_wrap = True  # a narrow terminal wraps the data, not the study's name
    cells = [trains_on_cells(r.get("trains_on")) for r in rows]
    for r, (data, epochs) in zip(rows, cells, strict=True):
        best = "n/a" if r.get("note") else "-" if r["best_value"] is None else f"{r['best_value']:.4f}"
        table.add_row(
            escape(r["name"]),
            escape(data),
            epochs,
            str(r["n_trials"]),
            str(r["states"].get("COMPLETE", 0)),
            str(r["states"].get("PRUNED", 0)),
            str(r["states"].get("FAIL", 0)),
            best,
        )
    console.print(table)
    if any("?" in data + epochs for data, epochs in cells):
        say(f"?: {NOT_RECORDED}")
    for r in rows:
        if r.get("note"):
            say(f"{r['name']}: {r['note']}")


def trains_on_cells(on: dict[str, Any] | None) -> tuple[str, str]:
    """``dlops study list``'s data cell (the dataset, with its subset where there is one:
    ``tiny-imagenet, 10 classes x 20``) and epochs cell; ``?`` for what is not recorded."""
    if on is None:
        return "?", "?"
    epochs = on["epochs_per_trial"]
    subset = "subset ?" if epochs is None else short_subset_text(on)  # no config recorded: no subset known
    return ", ".join(c for c in (on["dataset"] or "?", subset) if c), str(epochs or "?")


def print_study_trials(info: dict[str, Any]) -> None:
    """``dlops study show``: the summary, every trial, the epochs pruning saved."""
    print_study_summary(info)
    table = Table("#", "state", "value", "epochs", "params")
    for t in info["trials"]:
        value = "-" if t["value"] is None else f"{t['value']:.4f}"
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["params"].items())
        table.add_row(str(t["number"]), t["state"], value, str(t["epochs"]), escape(params))
    console.print(table)
    ep = info.get("epochs")
    if ep and ep["share"] is not None:  # None: no trial reported an epoch (not a dlops trainer's study)
        stops = ep["pruned_stop_epochs"]
        say(
            f"epochs trained: {ep['trained']} of the {ep['unpruned']} the same trials would train unpruned "
            f"({100 * ep['share']:.0f}%)"
            + (
                "; pruned trials stopped after epoch " + ", ".join(f"{e} (#{n})" for n, e in stops.items())
                if stops
                else "; no trial pruned"
            )
        )


def print_prepared(manifest: dict[str, Any]) -> None:
    build = manifest.get("build") or {}
    splits = ", ".join(f"{k} {v:,}" for k, v in manifest["splits"].items())
    say(
        f"{manifest['dataset']}: {plural(manifest['classes'], 'class')}, {splits}; "
        f"image shape {manifest['image_shape']}"
    )
    if build and not manifest.get("reused"):
        say(
            f"cached {build['images']:,} images in {build['seconds']:.1f}s "
            f"({build['images_per_second']:,.0f} images/s, {plural(build['workers'], 'decoding process')})"
        )


def print_dataset_info(name: str, info: dict[str, Any]) -> None:
    table = Table(title=f"dataset {name}", show_header=False)
    table.add_row("classes", str(info["classes"]))
    for split, count in info["splits"].items():
        table.add_row(f"  {split}", f"{count:,}")
    table.add_row("image shape", " x ".join(map(str, info["image_shape"])))
    table.add_row(
        "cache", f"{info['cache_dir']} ({info['cache_bytes'] / 2**20:,.1f} MiB)" if info["cache_dir"] else "in memory"
    )
    if info.get("holdout"):
        h = info["holdout"]
        table.add_row(
            "validation",
            f"{h['count']:,} held out of {h['from']} ({h['fraction'] * 100:.3g}% of each class, at least 1; "
            f"seed {h['seed']})",
        )
    if info.get("source"):
        s = info["source"]
        table.add_row(
            "source", f"{s['archive']} md5 {s['md5']}" + ("" if s.get("official") else " (not the official archive)")
        )
    console.print(table)


def print_final(final: dict[str, Any]) -> None:
    """The figures of a final run: each test and validation figure (mean ± std over seeds)."""
    table = Table(
        title=f"final {final['spec']} on {final['dataset']['name']} "
        f"({plural(len(final['seeds']), 'seed')} x {plural(final['epochs'], 'epoch')})",
        show_header=False,
    )
    for key, mean in final["mean"].items():
        if mean is not None:
            table.add_row(key, f"{mean:.4f} ± {final['std'][key]:.4f}" if len(final["seeds"]) > 1 else f"{mean:.4f}")
    table.add_row("wall time", f"{final['wall_seconds']:.1f}s on {final['device']}")
    console.print(table)
