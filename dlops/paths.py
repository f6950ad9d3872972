"""Where dlops writes: everything lives under ``$DLOPS_HOME`` (default ``./storage``), the data
under ``$DLOPS_DATA`` where that is set."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from urllib.parse import quote


def dlops_home() -> Path:
    """The root of everything dlops writes: study database, data, checkpoints, reports
    (``$DLOPS_HOME``; unset or empty: ``./storage``)."""
    return Path(os.environ.get("DLOPS_HOME") or "storage").expanduser().absolute()


def data_root() -> Path:
    """Where the datasets live: ``$DLOPS_DATA`` (a big disk, one copy for many homes), else
    ``$DLOPS_HOME/data``."""
    env = os.environ.get("DLOPS_DATA")
    return Path(env).expanduser().absolute() if env else dlops_home() / "data"


def checkpoints_dir() -> Path:
    return dlops_home() / "checkpoints"


def folder_name(name: str) -> str:
    """A folder name for ``name`` (a study or spec) that no other name maps to: a
    readable slug plus a short hash of the exact name (``a/b`` and ``a_b`` differ)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:48] or "x"
    return f"{slug}-{hashlib.sha256(name.encode()).hexdigest()[:10]}"


# What reports/ holds beside the spec folders (no spec may be named so, in any case).
REPORTS_RESERVED = {
    "index.md": "the index of every spec's report",
    "val_top5_by_loss.png": "the index's chart",
    "data": "the PNGs of `dlops data show`",
}


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
