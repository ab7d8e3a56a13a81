"""Bad-data accounting on the trainer's side: sums the workers' skip counts, logs them, stops on garbage."""

from __future__ import annotations

from collections import Counter
from typing import Any

from dmdr.errors import DataError


class SkipMonitor:
    """Accumulates the per-batch counts of one rank's loader and enforces ``max_skip_rate``.

    Feed it every batch (:meth:`update`); log :meth:`metrics`; keep :meth:`state_dict` in the
    checkpoint. The rate is cumulative over the run: ``skipped / (skipped + good records read)``,
    checked once ``min_records`` records were read (one bad first line does not stop a run).

    Args:
        max_skip_rate: the largest tolerated fraction of skipped records (``data.max_skip_rate``).
        min_records: records read before the rate is enforced (``data.skip_check_after``).
        sources: shown in the error, to name what to fix.
    """

    def __init__(self, max_skip_rate: float, min_records: int = 1000, sources: tuple[str, ...] = ()):
        self.max_skip_rate, self.min_records, self.sources = max_skip_rate, min_records, tuple(sources)
        self.skipped: Counter = Counter()
        self.read = 0
        self.truncated = 0
        self.prompts = 0

    @classmethod
    def from_config(cls, cfg: Any) -> SkipMonitor:
        """From a :class:`~dmdr.config.DataConfig`."""
        return cls(cfg.max_skip_rate, cfg.skip_check_after, tuple(cfg.sources))

    @property
    def seen(self) -> int:
        """Records read: good ones plus skipped ones."""
        return self.read + sum(self.skipped.values())

    @property
    def rate(self) -> float:
        seen = self.seen
        return sum(self.skipped.values()) / seen if seen else 0.0

    def update(self, batch: dict[str, Any]) -> None:
        """Add one batch's counts; raises :class:`DataError` when the skip rate is too high."""
        for reason, n in batch.get("skipped", {}).items():
            self.skipped[reason] += int(n)
        self.read += int(batch.get("read", len(batch["prompts"])))
        self.truncated += int(batch.get("truncated", 0))
        self.prompts += len(batch["prompts"])
        self.check()

    def check(self) -> None:
        seen = self.seen
        if seen >= max(self.min_records, 1) and self.rate > self.max_skip_rate:
            reasons = ", ".join(f"{k} {v}" for k, v in self.skipped.most_common())
            where = f" in {', '.join(self.sources)}" if self.sources else ""
            raise DataError(
                f"{self.rate:.1%} of prompt records were skipped as bad{where} "
                f"({sum(self.skipped.values())} of {seen}: {reasons}), above --data.max_skip_rate "
                f"{self.max_skip_rate:g}; fix the data, or raise the threshold if this is expected")

    def metrics(self) -> dict[str, float]:
        """``data/seen``, ``data/skipped``, ``data/skipped/<reason>``, ``data/skip_rate``, ``data/truncated``.

        Counts are this rank's, cumulative since the start of the run (restored on resume).
        """
        out = {"data/seen": float(self.seen), "data/skipped": float(sum(self.skipped.values())),
               "data/skip_rate": self.rate, "data/truncated": float(self.truncated)}
        for reason, n in sorted(self.skipped.items()):
            out[f"data/skipped/{reason}"] = float(n)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": dict(self.skipped), "read": self.read, "truncated": self.truncated,
                "prompts": self.prompts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = Counter({k: int(v) for k, v in state.get("skipped", {}).items()})
        self.read = int(state.get("read", 0))
        self.truncated = int(state.get("truncated", 0))
        self.prompts = int(state.get("prompts", 0))
