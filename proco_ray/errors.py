"""Errors that name a problem with the data or where it is stored, for the user to fix."""

from __future__ import annotations


class DataError(ValueError):
    """Input data that cannot be used as it is: the message names each offending item."""


class StorageError(DataError):
    """Object storage that cannot be reached, refuses the credentials, or holds something unexpected."""
