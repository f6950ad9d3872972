"""The versions of dlops and the packages it runs on, and the commit of its source tree:
what ``final.json`` records and ``dlops --version`` prints. Light to import (no torch)."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path


def package_versions() -> dict[str, str | None]:
    """Python's version and each package's; dlops's is that of the code running (a checkout on
    PYTHONPATH may differ from, or lack, an installed copy's metadata)."""
    from dlops import __version__

    out: dict[str, str | None] = {"python": platform.python_version(), "dlops": __version__}
    for pkg in ("torch", "optuna", "numpy", "scikit-learn", "matplotlib"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def git_commit() -> str | None:
    """The commit of the dlops source tree, ``+dirty`` when it has local changes. Outside a
    git checkout of dlops (a copy of the tree on another machine, an install inside another
    project's repository, whose commit is not dlops's): ``$DLOPS_GIT_COMMIT``, else None."""
    here = Path(__file__).resolve().parent
    copied_from = os.environ.get("DLOPS_GIT_COMMIT") or None
    try:
        ours = subprocess.run(
            ["git", "ls-files", "--error-unmatch", "--", Path(__file__).name],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if ours.returncode != 0:  # no repository, or one that does not track this file
            return copied_from
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return copied_from
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return copied_from


def version_line() -> str:
    """``dlops 0.1.0, commit 1e7d7b2c9f0a (python 3.11.7, torch 2.14.1, optuna ...)``."""
    versions = package_versions()
    head = f"dlops {versions.pop('dlops') or '(not installed)'}"
    commit = git_commit()
    if commit:
        head += f", commit {commit[:12]}" + ("+dirty" if commit.endswith("+dirty") else "")
    packages = ", ".join(f"{name} {version or 'not installed'}" for name, version in versions.items())
    return f"{head} ({packages})"
