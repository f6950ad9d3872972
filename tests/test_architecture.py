"""The module graph: imports go one way, the leaves stay free of Optuna and the CLI, and
the read-only commands never load torch."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dlops"

# Modules that train and feed training: they know nothing of studies or the command line.
LEAVES = ("dlops.trainers", "dlops.models", "dlops.losses", "dlops.metrics", "dlops.data")
# Neither directly nor through any dlops module they import, at the top or in a function.
# (rich is allowed: dataset preparation draws progress bars; reading prepared data does not load it.)
FORBIDDEN_IN_LEAVES = (
    "optuna",
    "optuna_dashboard",
    "typer",
    "dlops.cli",
    "dlops.objective",
    "dlops.runner",
    "dlops.notes",
    "dlops.dashboard",
    "dlops.studies",
    "dlops.final",
    "dlops.params",
    "dlops.report",
    "dlops.study_plots",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function: dlops modules by
    their full name, other packages by their top-level name."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.add(alias.name if alias.name.startswith("dlops") else alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if not target.startswith("dlops"):
                out.add(target.split(".")[0])
                continue
            out.add(target)
            for alias in node.names:  # `from dlops import cli` imports the module dlops.cli
                if f"{target}.{alias.name}" in known:
                    out.add(f"{target}.{alias.name}")
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(path, name, known) for name, path in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among the dlops modules, as a path that returns to its start."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in edges or nxt == node:
                continue
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return None


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt in edges and nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_graph_checker_finds_cycles_and_resolves_relative_imports(tmp_path: Path) -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "optuna"}, "b": {"c"}, "c": set()}) is None
    pkg = tmp_path / "dlops" / "sub"
    pkg.mkdir(parents=True)
    mod = pkg / "m.py"
    mod.write_text("from . import x\nfrom ..y import z\nimport optuna.trial\n\ndef f():\n    from dlops import cli\n")
    found = imports_of(mod, "dlops.sub.m", {"dlops.sub.x", "dlops.cli"})
    assert {"dlops.sub", "dlops.sub.x", "dlops.y", "optuna", "dlops", "dlops.cli"} <= found


def test_no_import_cycle_among_dlops_modules_not_even_inside_functions() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("leaf", LEAVES)
def test_training_modules_never_reach_optuna_or_the_cli(leaf: str) -> None:
    edges = graph()
    starts = [m for m in edges if m == leaf or m.startswith(leaf + ".")]
    assert starts, f"no module {leaf}"
    for start in starts:
        for module in reachable(edges, start):
            bad = sorted(i for i in edges[module] if any(i == f or i.startswith(f + ".") for f in FORBIDDEN_IN_LEAVES))
            assert not bad, f"{start} reaches {module}, which imports {', '.join(bad)}"


def test_training_loads_none_of_the_study_or_cli_side() -> None:
    """What a trainer and its data really load (the dataset registry imports the STL-10
    and Tiny ImageNet loaders on first use)."""
    code = (
        "import sys\n"
        "import dlops.trainers.resnet, dlops.trainers.autoencoder, dlops.data.stl10, dlops.data.tinyimagenet\n"
        "from dlops.data import get_dataset\n"
        "get_dataset('digits')\n"
        f"forbidden = {FORBIDDEN_IN_LEAVES!r}\n"
        "print(sorted(m for m in sys.modules if any(m == f or m.startswith(f + '.') for f in forbidden)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _loaded_after(code: str, tmp_path: Path) -> dict[str, bool]:
    env_code = (
        "import json, sys\n" + code + "\n"
        "print(json.dumps({m: m in sys.modules for m in ('torch', 'matplotlib', 'sklearn')}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", env_code],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", "DLOPS_HOME": str(tmp_path / "home"), "PYTHONPATH": str(PACKAGE.parent)},
        cwd=tmp_path,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_cli_loads_no_torch(tmp_path: Path) -> None:
    assert _loaded_after("import dlops.cli", tmp_path) == {"torch": False, "matplotlib": False, "sklearn": False}


def test_study_list_and_show_load_no_torch(tmp_path: Path) -> None:
    import optuna

    url = f"sqlite:///{tmp_path / 'studies.db'}"
    study = optuna.create_study(study_name="s", storage=url)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    code = (
        "from dlops.cli import app\n"
        f"for args in (['study', 'list', '--storage', {url!r}], ['study', 'show', 's', '--storage', {url!r}]):\n"
        "    try:\n"
        "        app(args)\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code in (0, None), exc.code\n"
    )
    loaded = _loaded_after(code, tmp_path)
    assert loaded["torch"] is False and loaded["sklearn"] is False


def test_study_show_of_a_study_without_epochs(tmp_path: Path) -> None:
    """A study whose trials report no epochs (made outside dlops) shows without the epochs line."""
    import optuna
    from typer.testing import CliRunner

    from dlops.cli import app

    url = f"sqlite:///{tmp_path / 'studies.db'}"
    optuna.create_study(study_name="s", storage=url).optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    result = CliRunner().invoke(app, ["study", "show", "s", "--storage", url])
    assert result.exit_code == 0, result.output
    assert "COMPLETE" in result.output and "epochs trained" not in result.output


def test_the_wheel_packages_every_module_and_the_built_in_specs() -> None:
    """``pip install .`` (not -e) installs what pyproject.toml lists: a package missing
    there (``dlops.trainers`` once was) is a ModuleNotFoundError on the user's first run."""
    import tomllib

    root = PACKAGE.parent
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {
        ".".join(init.parent.relative_to(root).parts)
        for init in PACKAGE.rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert on_disk <= listed, f"packages missing from pyproject.toml: {sorted(on_disk - listed)}"
    loose = [p for p in PACKAGE.rglob("*.py") if not (p.parent / "__init__.py").exists()]
    assert loose == [], f"modules outside any package (a wheel leaves them out): {loose}"
    assert config["package-dir"]["dlops.study"] == "study" and "dlops.study" in listed
    assert config["package-data"]["dlops.study"] == ["*.toml"] and list((root / "study").glob("*.toml"))
