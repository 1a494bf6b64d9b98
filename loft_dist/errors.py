"""The errors a user can fix. The CLI prints each as one line (what, where, how to fix) and exits 2; any other
exception is a bug in loft_dist and keeps its traceback (exit 1).

Each also subclasses the builtin it replaced (ValueError, FileNotFoundError), so callers that caught those still do.
"""

from __future__ import annotations


class LoftError(Exception):
    """Base of every error the message of which tells the user what to change."""


class ConfigError(LoftError, ValueError):
    """A config problem, phrased as: which key, which value, what is allowed."""


class DataError(LoftError, ValueError):
    """Input data that cannot be used as it is: a malformed source, a pool that changed, an empty split."""


class StorageError(LoftError, FileNotFoundError):
    """A file or table that should be there is not, or is incomplete (no _SUCCESS)."""


class WeightsError(LoftError, FileNotFoundError):
    """Weights or a checkpoint that cannot be loaded into the configured model."""


class LeaseError(LoftError, RuntimeError):
    """Another driver holds the run (or the scoring output) this command would write."""
