"""Errors that name a problem for the user to fix: with the data, where it is stored, the configuration."""

from __future__ import annotations

import re


class ProcoError(Exception):
    """An expected failure that the user can fix: the command line prints its message, not a traceback."""


class DataError(ProcoError, ValueError):
    """Input data that cannot be used as it is: the message names each offending item."""


class StorageError(DataError):
    """Object storage that cannot be reached, refuses the credentials, or holds something unexpected."""


def image_problem(error: Exception) -> str:
    """Why bytes did not decode as an image, in words: PIL names the in-memory buffer it read
    (`<_io.BytesIO object at 0x7f...>`), which tells a user nothing."""
    text = re.sub(r"\s*<_io\.\w+ object at 0x[0-9a-fA-F]+>", "", str(error)).strip()
    if type(error).__name__ == "UnidentifiedImageError":
        return "not an image format PIL can read (unknown format, or a damaged or empty file)"
    return f"{text} ({type(error).__name__})" if text else type(error).__name__
