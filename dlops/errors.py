"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""


class DlopsError(Exception):
    """A problem with the user's input or environment (not a bug in dlops)."""

    exit_code = 2


class SpecError(DlopsError):
    """A study spec that cannot be used."""


class DatasetNotAvailable(DlopsError):
    """A dataset whose cache has not been built."""


class StorageError(DlopsError):
    """A study storage URL that cannot be opened."""
