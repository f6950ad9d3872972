"""Where dlops writes: everything lives under ``$DLOPS_HOME`` (default ``./storage``)."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote


def dlops_home() -> Path:
    """The root of everything dlops writes: study database, data, checkpoints, reports."""
    return Path(os.environ.get("DLOPS_HOME", "storage")).expanduser().absolute()


def data_root() -> Path:
    return dlops_home() / "data"


def checkpoints_dir() -> Path:
    return dlops_home() / "checkpoints"


def reports_dir() -> Path:
    return dlops_home() / "reports"


def artifacts_dir() -> Path:
    return dlops_home() / "artifacts"


def default_storage_url() -> str:
    """``--storage`` falls back to ``$DLOPS_STORAGE``, then to SQLite under ``$DLOPS_HOME``."""
    env = os.environ.get("DLOPS_STORAGE")
    if env:
        return env
    return sqlite_url(dlops_home() / "dlops.db")


def sqlite_url(path: Path) -> str:
    """The SQLAlchemy URL of the SQLite file ``path``, percent-encoded so that a ``?``, ``%`` or
    ``#`` in a folder name stays part of the path (SQLAlchemy decodes it; ``?`` would start options)."""
    return "sqlite:///" + quote(str(path))
