"""User-facing errors: one clear line that names the culprit and the fix.

Anything raised as a :class:`UserError` is printed by the recipe launcher as a single line
(``error: ...``) and exits with status 2, before any training work starts where possible.
"""


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
