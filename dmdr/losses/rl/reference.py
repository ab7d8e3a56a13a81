"""The frozen reference policy of DPO and GRPO's KL term; it lives with the EMA in :mod:`dmdr.snapshots`."""

from dmdr.snapshots import FrozenReference

__all__ = ["FrozenReference"]
