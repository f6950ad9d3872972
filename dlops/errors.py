"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""

import re


class DlopsError(Exception):
    """A problem with the user's input or environment (not a bug in dlops)."""

    exit_code = 2


class SpecError(DlopsError):
    """A study spec that cannot be used."""


class DatasetNotAvailable(DlopsError):
    """A dataset whose cache has not been built."""


class StorageError(DlopsError):
    """A study storage URL that cannot be opened."""


def out_of_memory(exc: BaseException) -> str | None:
    """For an exception of torch's allocators (CPU or CUDA) or a ``MemoryError``: what the
    allocation asked for (``tried to allocate 360000000000 bytes``), or "" where it does not
    say; None for any other error."""
    text = " ".join(str(exc).split())
    if not isinstance(exc, MemoryError) and not re.search(r"out of memory|can't allocate memory", text):
        return None
    asked = re.search(r"tried to allocate [0-9.]+ ?[A-Za-z]+", text, re.IGNORECASE)
    return asked.group(0)[0].lower() + asked.group(0)[1:] if asked else ""


def out_of_memory_text(exc: BaseException) -> str | None:
    """Running out of memory as the words after "ran" or "failed:" (``out of memory (tried
    to allocate 3 GiB): a smaller model or batch size needs less``); None for another error."""
    asked = out_of_memory(exc)
    if asked is None:
        return None
    return f"out of memory{f' ({asked})' if asked else ''}: a smaller model or batch size needs less"
