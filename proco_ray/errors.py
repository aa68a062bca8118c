"""Errors that name a problem for the user to fix: with the data, where it is stored, the configuration."""

from __future__ import annotations


class ProcoError(Exception):
    """An expected failure that the user can fix: the command line prints its message, not a traceback."""


class DataError(ProcoError, ValueError):
    """Input data that cannot be used as it is: the message names each offending item."""


class StorageError(DataError):
    """Object storage that cannot be reached, refuses the credentials, or holds something unexpected."""
