"""One error family for everything a user can cause.

The CLI maps :class:`PyimganoError` (and pydantic's ``ValidationError``) to a single
line on stderr and a non-zero exit code; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class PyimganoError(Exception):
    """Base class of errors caused by user input (configs, data, saved models)."""

    exit_code = 1


class ConfigError(PyimganoError):
    """An experiment config that cannot be used (bad YAML, unknown key, bad value)."""

    exit_code = 2


class DataError(PyimganoError):
    """A dataset that cannot be read: missing folders, unreadable or mismatched files."""

    exit_code = 3


class ModelError(PyimganoError):
    """A saved model folder that is missing, incomplete or from another detector."""

    exit_code = 4


class NotFittedError(PyimganoError):
    """``predict`` (or ``save``) called on a detector that has not been fitted."""

    exit_code = 4


class OptionalDependencyError(PyimganoError):
    """An optional package is needed for the requested feature but is not installed."""

    exit_code = 5


class ResourceError(PyimganoError):
    """The run needs more memory or disk than allowed or available (a limit, a full disk)."""

    exit_code = 7  # (6: a --fail-under gate)


class OutputError(PyimganoError):
    """An output location that cannot be written (``--out``/``output.root`` read-only, a file in
    the way, disk full) or is held by another run."""

    exit_code = 2


class ExecutionError(PyimganoError):
    """Work that could not run: an unreachable cluster, or tasks that failed after their retries."""

    exit_code = 8  # (6: a --fail-under gate, 7: ResourceError)
