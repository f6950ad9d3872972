"""The trainer registry, the protocol every trainer meets, the one checkpoint rule, and
the import rules of the run side (what trainers and their building blocks may import)."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

import dlops
from dlops.errors import SpecError
from dlops.trainers import TRAINER_MODULES, get_trainer
from dlops.trainers.base import RESUMABLE_DIFFERENCES, Trainer, config_matches

PACKAGE = Path(dlops.__file__).parent


def test_importing_the_registry_loads_no_trainer_and_no_torch() -> None:
    code = ("import sys, dlops.trainers\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('dlops.trainers.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", sorted(TRAINER_MODULES))
def test_every_registered_trainer_meets_the_protocol(name: str) -> None:
    trainer = get_trainer(name)
    assert isinstance(trainer, Trainer) and trainer.name == name
    assert dataclasses.is_dataclass(trainer.config_class)
    config = trainer.config_class()
    trainer.validate(config)
    for key in ("to_dict", "replace"):
        assert callable(getattr(config, key))
    assert {"train_loss", "val_top1", "val_top5"} <= set(trainer.metrics)


def test_an_unknown_trainer_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="unknown trainer 'gpt'.*autoencoder, resnet18"):
        get_trainer("gpt")


def test_a_checkpoint_matches_a_config_that_differs_only_in_where_and_how_fast_it_runs() -> None:
    saved = {"lr": 0.1, "epochs": 3, "device": "cuda", "eval_batch_size": 512, "data_root": "/a",
             "compile": True, "cudnn_benchmark": True}
    assert RESUMABLE_DIFFERENCES == {"device", "eval_batch_size", "data_root", "compile", "cudnn_benchmark"}
    moved = {**saved, "device": "cpu", "eval_batch_size": 64, "data_root": None, "compile": False,
             "cudnn_benchmark": False}
    assert config_matches(saved, moved)
    assert not config_matches(saved, {**saved, "lr": 0.2})
    assert not config_matches(saved, {**saved, "seed": 1})  # a key only one side has


# --------------------------------------------------------------------------- import rules


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function (``from a import b``
    counts as ``a`` and, where it is a module, ``a.b``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES}
    return out


def _dlops_imports(name: str) -> set[str]:
    found = set()
    for imported in _imports(MODULES[name]):
        while imported and imported not in MODULES:
            imported = imported.rpartition(".")[0]
        if imported and imported != name:
            found.add(imported)
    return found


RUN_SIDE = sorted(m for m in MODULES if m.startswith(("dlops.trainers", "dlops.data"))
                  or m in ("dlops.models", "dlops.losses", "dlops.metrics"))
# The progress bars of dataset preparation (``dlops data fetch | prepare``) import rich
# inside the functions that draw them: reading prepared data never calls them.
LAZY_RICH = {"dlops.data.fetch"}
FORBIDDEN = ("optuna", "typer", "rich", "dlops.cli", "dlops.search", "dlops.objective", "dlops.runner",
             "dlops.final", "dlops.report")


@pytest.mark.parametrize("name", RUN_SIDE)
def test_trainers_and_their_building_blocks_never_import_the_study_or_cli_side(name: str) -> None:
    """Directly or through any dlops module they import, at the top or in a function."""
    seen, todo = set(), [name]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        allowed = ("rich",) if module in LAZY_RICH else ()
        bad = sorted(i for i in _imports(MODULES[module]) if i.split(".")[0] not in allowed
                     and any(i == f or i.startswith(f + ".") for f in FORBIDDEN))
        assert not bad, f"{name} imports {bad} (through {module})"
        todo += _dlops_imports(module)


def test_training_loads_none_of_the_study_or_cli_side() -> None:
    """What a trainer and its data really load (the dataset registry imports the STL-10
    and Tiny ImageNet loaders on first use). rich aside: scikit-learn's digits loader
    imports it on its own."""
    code = ("import sys\n"
            "import dlops.trainers.resnet, dlops.trainers.autoencoder, dlops.data.stl10, dlops.data.tinyimagenet\n"
            "from dlops.data import get_dataset\n"
            "get_dataset('digits')\n"
            f"forbidden = {tuple(f for f in FORBIDDEN if f != 'rich')!r}\n"
            "print(sorted(m for m in sys.modules if any(m == f or m.startswith(f + '.') for f in forbidden)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


RUN_MODULES = ("dlops.trainers", "dlops.trainers.base", "dlops.trainers.resnet", "dlops.trainers.autoencoder",
               "dlops.final", "dlops.params", "dlops.provenance", "dlops.report", "dlops.plots", "dlops.io",
               "dlops.artifacts", "dlops.metrics", "dlops.models", "dlops.losses")


@pytest.mark.parametrize("name", RUN_MODULES)
def test_no_import_cycle_runs_through_the_run_side(name: str) -> None:
    """No chain of imports (at the top or in functions) leads from ``name`` back to it."""
    todo, seen = list(_dlops_imports(name)), set()
    while todo:
        module = todo.pop()
        assert module != name, f"{name} imports itself through a cycle"
        if module not in seen:
            seen.add(module)
            todo += _dlops_imports(module)
