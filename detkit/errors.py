"""Exception types that carry a user-facing message.

The CLI prints a :class:`DetkitError` as one clean message (plus its notes) and exits non-zero; any other exception
is a bug and keeps its traceback.
"""

from __future__ import annotations


class DetkitError(Exception):
    """Base class of every error whose message is meant for the user."""


class RegistryError(DetkitError, KeyError):
    """Unknown or duplicate component name."""

    def __str__(self) -> str:  # KeyError quotes its message; we do not want that
        return str(self.args[0]) if self.args else ""


class ConfigError(DetkitError, ValueError):
    """A config file, key or value is wrong."""


class PluginError(DetkitError):
    """A plugin could not be loaded, or a plugin setting is wrong."""


class CheckpointError(DetkitError):
    """A checkpoint is missing, unsafe, or does not fit the model."""


class DataError(DetkitError):
    """A data set root, file or annotation is unusable."""


class OutputError(DetkitError):
    """A file of a run's output (``metrics.jsonl``, ...) cannot be written: a full disk, a lost mount."""
