"""User-facing errors: one clear line that names the culprit and the fix.

Anything raised as a :class:`UserError` is printed by the recipe launcher and the tools as a single line
(``error: ...``, :func:`error_exit`) and exits with status 2, before any training work starts where possible.
"""

import sys

EXIT_USER_ERROR = 2
"""The exit code for bad input (a missing folder, a typo, a corrupt checkpoint)."""


class UserError(Exception):
    """A mistake in the user's input (config, paths, data, checkpoints), not a bug in dmdr."""

    reported_elsewhere: bool = False
    """Set on the ranks of a job whose rank 0 prints the same line (the launcher prints it once)."""
    rank_local: bool = False
    """Set where the error is this rank's own (its data shard): that rank prints it, prefixed ``[rank R]``. Every
    other error is printed once per node (rank 0 and each node's local rank 0), not once per rank."""


class ConfigError(UserError, ValueError):
    """A bad config key or value."""


class ModelLoadError(UserError):
    """A model folder that is missing, incomplete or of another family."""


class DataError(UserError):
    """Prompt data that cannot be read or is mostly garbage."""


class CheckpointError(UserError):
    """A checkpoint that is corrupt, truncated or incompatible."""


def error_exit(err: Exception, show: bool = True, rank: int = 0, code: int = EXIT_USER_ERROR) -> int:
    """Print ``error: <one line>`` to stderr, prefixed ``[rank R]`` off rank 0 (unless ``show`` is false: a rank
    that is not the reporter) and return ``code`` (default :data:`EXIT_USER_ERROR`)."""
    if show:
        where = "" if rank == 0 else f"[rank {rank}] "
        print(f"{where}error: {err}", file=sys.stderr)
    return code
