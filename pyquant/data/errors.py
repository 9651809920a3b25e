"""Exceptions raised by the data layer. Every message names the file (or folder) and the problem."""

from __future__ import annotations


class DataError(ValueError):
    """A data file is unreadable, has the wrong structure, or selects nothing."""


class MissingDataError(DataError, FileNotFoundError):
    """A data file or folder that the loader needs does not exist."""
