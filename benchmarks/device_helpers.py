"""The Python side of ``benchmarks/device_run.sh`` (and of ``device_prepare.sh``).

    python benchmarks/device_helpers.py wheels-needed               # dists to bring as wheels
    python benchmarks/device_helpers.py install --wheels device/wheels --target /tmp/dlops-site [--dry-run]
    python benchmarks/device_helpers.py versions --out versions.json
    python benchmarks/device_helpers.py spec --loss ce --out spec.toml [--width 8]
    python benchmarks/device_helpers.py curves --storage URL --out-json curves.json --out-png curves.png ...
    python benchmarks/device_helpers.py summary --work DIR --out DIR
    python benchmarks/device_helpers.py full-summary --home DIR --runs ce,... --state DIR --out DIR

``install`` and ``versions`` use the standard library first, so that they run on a
bare machine before anything is installed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as metadata
import json
import math
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LOSSES = ("ce", "triplet", "center")
# Already on the GPU machine with its PyTorch (KINDS.md), and large: never brought along.
HEAVY = {
    "torch",
    "torchvision",
    "numpy",
    "matplotlib",
    "scikit-learn",
    "scipy",
    "pillow",
    "triton",
    "setuptools",
    "pip",
}
# What dlops and its tests import (module -> distribution), checked before and after installing.
IMPORTS = {
    "optuna": "optuna",
    "sqlalchemy": "sqlalchemy",
    "alembic": "alembic",
    "colorlog": "colorlog",
    "mako": "mako",
    "yaml": "pyyaml",
    "tqdm": "tqdm",
    "packaging": "packaging",
    "typer": "typer",
    "rich": "rich",
    "optuna_dashboard": "optuna-dashboard",
    "bottle": "bottle",
    "redis": "redis",
    "psycopg2": "psycopg2-binary",
    "torch": "torch",
    "torchvision": "torchvision",
    "numpy": "numpy",
    "matplotlib": "matplotlib",
    "sklearn": "scikit-learn",
    "PIL": "pillow",
    "pytest": "pytest",
    "pytest_timeout": "pytest-timeout",
}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --------------------------------------------------------------------------- wheels


def wheels_needed() -> list[str]:
    """``name==version`` of every distribution dlops (and its tests) needs beyond the heavy
    ones the GPU machine has, with their dependencies, as installed in this environment."""
    from packaging.requirements import Requirement

    env = {
        "python_version": "3.12",
        "python_full_version": "3.12.3",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "extra": "",
    }
    project = [Requirement(r) for r in metadata.requires("dlops") or []] if _has("dlops") else []
    if not project:  # not installed as a package here: read pyproject.toml
        import tomllib

        data = tomllib.loads((ROOT / "pyproject.toml").read_text())
        project = [
            Requirement(r) for r in data["project"]["dependencies"] + data["project"]["optional-dependencies"]["test"]
        ]
    else:
        project += [Requirement("pytest"), Requirement("pytest-timeout")]
    seen: dict[str, str] = {}
    todo = [r for r in project if norm(r.name) not in HEAVY]
    while todo:
        req = todo.pop()
        name = norm(req.name)
        if name in seen or name in HEAVY:
            continue
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        seen[name] = metadata.version(name)
        for raw in metadata.requires(name) or []:
            sub = Requirement(raw)
            if sub.marker is not None and not sub.marker.evaluate(env):  # extras evaluate False with extra=""
                continue
            todo.append(sub)
    return [f"{n}=={v}" for n, v in sorted(seen.items())]


def _has(dist: str) -> bool:
    try:
        metadata.version(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


def failing_imports() -> dict[str, str]:
    """Modules of :data:`IMPORTS` that do not import (the heavy ones: that are not found)."""
    import importlib.util

    out = {}
    for module, dist in IMPORTS.items():
        try:
            if norm(dist) in HEAVY:  # the machine's own; importing torch & co. here costs seconds
                if importlib.util.find_spec(module) is None:
                    raise ModuleNotFoundError(f"No module named {module!r}")
                continue
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any failure means: bring it
            out[module] = f"{type(exc).__name__}: {exc}"
    return out


def install(args: argparse.Namespace) -> int:
    """Install the brought wheels whose distribution this Python lacks into ``--target``.
    dlops itself is not installed: it runs from the checkout, first on PYTHONPATH (an
    installed copy beside it could shadow the code under test)."""
    before = failing_imports()
    print(f"python {sys.version.split()[0]} at {sys.executable}")
    print("imports failing before:", ", ".join(f"{m} ({e})" for m, e in before.items()) or "none")
    wheels = sorted(Path(args.wheels).glob("*.whl")) if Path(args.wheels).is_dir() else []
    missing = [w for w in wheels if not _has(w.name.split("-")[0])]
    print(
        f"{len(wheels)} wheels brought along; {len(missing)} for distributions missing here: "
        + (", ".join(w.name.split("-")[0] for w in missing) or "none")
    )
    if args.dry_run:
        print("dry run: nothing installed")
        return 0
    target = Path(args.target)
    target.mkdir(parents=True, exist_ok=True)
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--no-deps",
        "--no-compile",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--target",
        str(target),
    ]
    if missing:
        subprocess.run(pip + [str(w) for w in missing], check=True)
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    after = failing_imports()
    print("imports failing after:", ", ".join(f"{m} ({e})" for m, e in after.items()) or "none")
    return 1 if any(m in after for m in ("optuna", "typer", "rich", "torch", "numpy")) else 0


# --------------------------------------------------------------------------- versions


def versions(args: argparse.Namespace) -> int:
    info: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(), "packages": {}}
    for _module, dist in IMPORTS.items():
        try:
            info["packages"][dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info["packages"][dist] = None
    import torch

    import dlops

    info["dlops"] = {"version": dlops.__version__, "from": str(Path(dlops.__file__).resolve().parent)}
    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {
            "name": p.name,
            "memory_gib": round(p.total_memory / 2**30, 1),
            "sms": p.multi_processor_count,
            "capability": f"{p.major}.{p.minor}",
            "count": torch.cuda.device_count(),
            "cudnn": torch.backends.cudnn.version(),
        }
        smi = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
        )
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    from dlops.versions import git_commit

    info["commit"] = git_commit()  # the GPU machine's copy has no .git: $DLOPS_GIT_COMMIT there
    print(json.dumps(info, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(info, indent=1))
    return 0


# --------------------------------------------------------------------------- specs and curves


def write_spec(args: argparse.Namespace) -> int:
    """The built-in ``resnet18-LOSS`` spec, with extra ``[train]`` settings (a CPU rehearsal's width).
    A table after ``[train]`` that sets one of them too (``[datasets.digits]``: ``width = 16``)
    gets the same value, so the setting holds on every dataset."""
    text = (ROOT / "study" / f"resnet18-{args.loss}.toml").read_text()
    head, train = text.split("\n[train]", 1)
    train, sep, rest = train.partition("\n[")  # the [train] table alone
    for key, value in (
        ("width", args.width),
        ("batch_size", args.batch_size),
        ("eval_batch_size", args.eval_batch_size),
    ):
        if value:
            line = f"{key} = {value}"
            pattern = rf"(?m)^{key}\s*=.*$"
            train, found = re.subn(pattern, line, train, count=1)
            if not found:  # a new line right under the [train] header (and its comment)
                first, nl, body = train.partition("\n")
                train = f"{first}{nl}{line}\n{body}"
            rest = re.sub(pattern, line, rest)
    Path(args.out).write_text(head + "\n[train]" + train + sep + rest)
    return 0


def curves(args: argparse.Namespace) -> int:
    """One unpruned run per loss with the best parameters its study found (its spec's
    baseline where the study has no finished trial); every epoch's history is kept."""
    import optuna

    from dlops.plots import plot_validation_curves, use_headless_backend
    from dlops.spec import load_spec
    from dlops.storage import open_storage
    from dlops.trainers import get_trainer

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out: dict[str, Any] = {}
    path = Path(args.out_json)
    for loss in args.losses.split(","):
        spec = load_spec(str(Path(args.spec_dir) / f"resnet18-{loss}.toml") if args.spec_dir else f"resnet18-{loss}")
        params, source = dict(spec.baseline), "baseline"
        try:
            study = optuna.load_study(study_name=f"{args.study_prefix}{loss}", storage=open_storage(args.storage))
            best = study.best_trial
            params, source = dict(best.params), f"best trial {best.number} of {study.study_name}"
        except (KeyError, ValueError) as exc:
            source = f"baseline (no finished study trial: {exc})"
        overrides = {
            k: v
            for k, v in (("subset_classes", args.subset_classes), ("subset_per_class", args.subset_per_class))
            if v is not None
        }
        config = spec.config(args.dataset, params, epochs=args.epochs, device=args.device, seed=0, **overrides)
        t0 = time.perf_counter()
        result = get_trainer(spec.trainer).fit(
            config,
            report=lambda e, m, loss=loss: print(
                f"curves {loss:<8} epoch {e + 1:>2}: train loss {m['train_loss']:.4f}  val top-1 {m['val_top1']:.4f}  "
                f"top-5 {m['val_top5']:.4f}  ({m['epoch_seconds']:.1f} s)",
                flush=True,
            ),
        )
        out[loss] = {
            "params": params,
            "source": source,
            "config": config.to_dict(),
            "history": result.history,
            "seconds": time.perf_counter() - t0,
            "device": result.extra_user_attrs.get("device"),
        }
        path.write_text(json.dumps(out, indent=1, default=str))
    use_headless_backend()
    series = {loss: [r["history"]["val_top5"]] for loss, r in out.items()}
    fig = plot_validation_curves(
        series, title=f"unpruned runs on {args.dataset} ({args.epochs} epochs; best study params)"
    )
    fig.savefig(args.out_png, dpi=110)
    return 0


# --------------------------------------------------------------------------- summary


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summary(args: argparse.Namespace) -> int:
    work, out = Path(args.work), Path(args.out)
    stages = []
    if (work / "stages.tsv").exists():
        for line in (work / "stages.tsv").read_text().splitlines():
            name, status, rc, secs = line.split("\t")
            stages.append({"stage": name, "status": status, "rc": int(rc), "seconds": float(secs)})
    result: dict[str, Any] = {
        "stages": stages,
        "versions": _load(work / "versions.json"),
        "throughput": _load(out / "throughput.json"),
        "curves": _load(out / "curves.json"),
        "studies": {},
        "cuda_tests": None,
    }
    log = work / "logs" / "cuda_tests.log"
    if log.exists():
        tail = [ln for ln in log.read_text().splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", ln)]
        result["cuda_tests"] = tail[-1].strip("= ") if tail else None
    db = out / "studies.db"
    if db.exists():
        try:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            url = f"sqlite:///{db}"
            for s in optuna.get_all_study_summaries(url):
                study = optuna.load_study(study_name=s.study_name, storage=url)
                states: dict[str, int] = {}
                for t in study.trials:
                    states[t.state.name] = states.get(t.state.name, 0) + 1
                entry: dict[str, Any] = {"states": states}
                done = [t for t in study.trials if t.state.name == "COMPLETE"]
                if done:
                    b = study.best_trial
                    h = b.user_attrs.get("history", {})
                    # the fetch failing sends the studies to digits: say which data the figures are of
                    entry["dataset"] = (b.user_attrs.get("config") or {}).get("dataset")
                    entry["best"] = {
                        "number": b.number,
                        "value": b.value,
                        "params": b.params,
                        "val_top1": (h.get("val_top1") or [None])[-1],
                        "val_top5": (h.get("val_top5") or [None])[-1],
                        "epochs": len(h.get("val_top5") or []),
                    }
                    entry["trial_seconds"] = sum(
                        sum(t.user_attrs.get("history", {}).get("epoch_seconds", [])) for t in study.trials
                    )
                result["studies"][s.study_name] = entry
        except Exception as exc:  # noqa: BLE001 - the summary reports, it does not fail
            result["studies_error"] = f"{type(exc).__name__}: {exc}"
    (out / "summary.json").write_text(json.dumps(result, indent=1, default=str))

    def f(x: Any, fmt: str) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)

    lines = [
        "",
        "=" * 78,
        "SUMMARY " + (result["versions"] or {}).get("gpu", {}).get("name", "no GPU")
        if result["versions"]
        else "SUMMARY",
    ]
    lines.append(f"{'stage':<14} {'status':<9} {'rc':>4} {'seconds':>8}")
    for s in stages:
        lines.append(f"{s['stage']:<14} {s['status']:<9} {s['rc']:>4} {s['seconds']:>8.1f}")
    if result["cuda_tests"]:
        lines.append(f"CUDA tests: {result['cuda_tests']}")
    tp = result["throughput"] or {}
    if tp.get("projection"):
        lines.append(
            f"{'throughput':<10} {'loss':>8} {'mode':>9} {'bs':>5} {'img/s':>9} {'vs ce':>6} {'loader':>7} "
            f"{'MiB':>7} {'epoch s':>8}"
        )
        for x in tp["projection"]:
            share = f"{100 * x['loader_share']:.1f}%" if x.get("loader_share") else "-"
            lines.append(
                f"{'':<10} {x['loss']:>8} {x['mode']:>9} {x['best_batch_size']:>5} {x['train_images_per_s']:>9.0f} "
                f"{f(x.get('step_vs_ce'), '.3f'):>6} {share:>7} {f(x.get('peak_mib'), '.0f'):>7} {x['epoch_s']:>8.2f}"
            )
    if result["studies"]:
        lines.append(f"{'study':<22} {'trials':<30} {'best':>5} {'top-1':>6} {'top-5':>6}  data")
        for name, s in result["studies"].items():
            b = s.get("best") or {}
            states = ", ".join(f"{v} {k.lower()}" for k, v in s["states"].items())
            lines.append(
                f"{name:<22} {states:<30} {f(b.get('number'), 'd'):>5} {f(b.get('val_top1'), '.3f'):>6} "
                f"{f(b.get('val_top5'), '.3f'):>6}  {s.get('dataset') or '-'}"
            )
    for loss, c in (result["curves"] or {}).items():
        h = c["history"]
        lines.append(
            f"curve {loss:<8} {c['config'].get('dataset')}, {len(h['val_top5'])} epochs, {c['source']}: "
            f"val top-1 {h['val_top1'][-1]:.3f}, "
            f"top-5 {h['val_top5'][-1]:.3f} ({c['seconds']:.0f} s)"
        )
    print("\n".join(lines))
    return 0


# --------------------------------------------------------------------------- the full-data runs

FULL_RUNS = {
    "ce": "resnet18-ce",
    "triplet": "resnet18-triplet",
    "center": "resnet18-center",
    "original": "resnet18-ce-original",
}


def full_row(run: str, final: dict[str, Any] | None, done: bool) -> dict[str, Any]:
    """One run of ``device_full.sh`` for the README table, from its ``final.json``."""
    row: dict[str, Any] = {"run": run, "spec": FULL_RUNS.get(run, run), "done": done}
    if not final:
        return row
    seed = final["per_seed"][0]
    history = seed["history"]
    epoch_s = history.get("epoch_seconds") or []
    source = final.get("params_source") or {}
    row.update(
        {
            "settings": final["params"],
            "params_source": source.get("path") or source.get("kind"),
            "epochs": len(history.get("val_top5") or []),
            "val_top5": (history.get("val_top5") or [None])[-1],
            "best_val_top5": max(history["val_top5"]) if history.get("val_top5") else None,
            "test_top1": seed.get("test_top1"),
            "test_top5": seed.get("test_top5"),
            "seconds_per_epoch": sorted(epoch_s)[len(epoch_s) // 2] if epoch_s else None,
            "train_minutes": sum(epoch_s) / 60 if epoch_s else None,
            "resumed_from_epoch": seed.get("resumed_from_epoch"),
            "device": final.get("device_name") or final.get("device"),
            "created": final.get("created"),
            "git_commit": final.get("git_commit"),
            "torch": (final.get("versions") or {}).get("torch"),
        }
    )
    return row


def full_summary(args: argparse.Namespace) -> int:
    home, state, out = Path(args.home), Path(args.state), Path(args.out)
    rows = []
    for run in args.runs.split(","):
        final = _load(home / "reports" / FULL_RUNS.get(run, run) / "final.json")
        rows.append(full_row(run, final, (state / "done" / run).exists()))
    parts = _load(state / "parts" / "MANIFEST.json") or {}
    result = {"runs": rows, "archive": {k: parts.get(k) for k in ("name", "size", "md5")}}
    (out / "summary.json").write_text(json.dumps(result, indent=1, default=str))

    def f(x: Any, fmt: str) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)

    def settings(s: dict[str, Any] | None) -> str:
        return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in (s or {}).items()) or "-"

    lines = [
        "| run | spec | settings | epochs | val top-5 | test top-1 | test top-5 | s / epoch | minutes |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']}{'' if r['done'] else ' (not finished)'} | {r['spec']} | {settings(r.get('settings'))} | "
            f"{f(r.get('epochs'), 'd')} | {f(r.get('val_top5'), '.3f')} | {f(r.get('test_top1'), '.3f')} | "
            f"{f(r.get('test_top5'), '.3f')} | {f(r.get('seconds_per_epoch'), '.1f')} | "
            f"{f(r.get('train_minutes'), '.1f')} |"
        )
    done = [r for r in rows if r.get("created")]
    if done:
        r = done[0]
        lines.append("")
        lines.append(f"{r['device']}, torch {r['torch']}, commit {r['git_commit']}, {r['created']}")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("wheels-needed")
    i = sub.add_parser("install")
    i.add_argument("--wheels", required=True)
    i.add_argument("--target", required=True)
    i.add_argument("--dry-run", action="store_true")
    v = sub.add_parser("versions")
    v.add_argument("--out")
    s = sub.add_parser("spec")
    s.add_argument("--loss", required=True, choices=LOSSES)
    s.add_argument("--out", required=True)
    s.add_argument("--width", type=int)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--eval-batch-size", type=int)
    c = sub.add_parser("curves")
    c.add_argument("--storage", required=True)
    c.add_argument("--study-prefix", default="device-")
    c.add_argument("--spec-dir")
    c.add_argument("--losses", default=",".join(LOSSES))
    c.add_argument("--dataset", default="tiny-imagenet")
    c.add_argument("--epochs", type=int, default=6)
    c.add_argument("--device", default="auto")
    c.add_argument("--subset-classes", type=int)
    c.add_argument("--subset-per-class", type=int)
    c.add_argument("--out-json", required=True)
    c.add_argument("--out-png", required=True)
    m = sub.add_parser("summary")
    m.add_argument("--work", required=True)
    m.add_argument("--out", required=True)
    fs = sub.add_parser("full-summary")
    fs.add_argument("--home", required=True)
    fs.add_argument("--runs", default=",".join(FULL_RUNS))
    fs.add_argument("--state", required=True)
    fs.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.command == "wheels-needed":
        print("\n".join(wheels_needed()))
        return 0
    commands = {"install": install, "versions": versions, "spec": write_spec, "curves": curves, "summary": summary}
    return {**commands, "full-summary": full_summary}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
