"""Opening Optuna storages from a URL, and keeping passwords out of every message."""

from __future__ import annotations

import re
from pathlib import Path

import optuna

from dlops.errors import StorageError

_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)(?P<password>[^@\s]*)(?P<tail>@)")


def mask_url(text: str) -> str:
    """Replace the password of every URL in ``text`` by ``***``."""
    return _PASSWORD.sub(lambda m: f"{m['head']}***{m['tail']}", text)


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``. SQLite files get their folder created."""
    try:
        if url.startswith("sqlite:///"):
            path = Path(url[len("sqlite:///") :])
            if str(path) not in ("", ":memory:"):
                path.parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.RDBStorage(url)
        if "://" in url:
            return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    except Exception as exc:  # noqa: BLE001 - any driver error is the user's URL
        raise StorageError(f"cannot open storage {mask_url(url)}: {mask_url(str(exc).splitlines()[0])}") from None
    raise StorageError(f"unsupported storage URL {mask_url(url)!r} (e.g. sqlite:///path/to/dlops.db)")
