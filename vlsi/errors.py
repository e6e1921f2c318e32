"""Typed errors. Every message says what is wrong, where, and what to do about it."""

from __future__ import annotations


class VLsIError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(VLsIError, ValueError):
    """A configuration key or value is invalid; the message names the key and allowed values."""


class DataError(VLsIError, ValueError):
    """A data file or one of its records is unusable.

    ``path`` is the file, ``record`` the record's index or id within it (None when the whole
    file is at fault).
    """

    def __init__(self, path, record, message: str):
        self.path = str(path)
        self.record = record
        where = self.path if record is None else f"{self.path} [record {record}]"
        super().__init__(f"{where}: {message}")
        self.reason = message


class CheckpointError(VLsIError):
    """A checkpoint folder is missing files, or a file holds the wrong keys or shapes."""


class UnsupportedArchitectureError(VLsIError, ValueError):
    """The model's architecture has no adapter (or the target cannot take it)."""
