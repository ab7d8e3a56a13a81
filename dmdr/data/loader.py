"""``build_prompt_loader``: the resumable, prefetching prompt loader of one data-parallel rank."""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

from torchdata.stateful_dataloader import StatefulDataLoader

from dmdr.data.cache import EmbeddingCache
from dmdr.data.readers import Cleaner
from dmdr.data.sources import plan_source
from dmdr.data.stream import PromptDataset, StreamConfig, derive_seed, mixture_weights
from dmdr.errors import CheckpointError, DataError
from dmdr.models.base import cat_conditioning

log = logging.getLogger("dmdr")

_STATE_KEY = "dmdr_data"


def _identity(batch: Any) -> Any:
    return batch


def _one_line(e: DataError) -> DataError:
    """A worker's DataError comes back with the worker's traceback in its message: keep the message."""
    text = str(e)
    if "Traceback" not in text:
        return e
    last = [line for line in text.splitlines() if "DataError: " in line]
    msg = last[-1].split("DataError: ", 1)[1] if last else text.splitlines()[0]
    return DataError(msg)


class _Batches:
    """The loader's iterator with worker errors turned back into one-line :class:`DataError` s."""

    def __init__(self, it: Any):
        self._it = it

    def __iter__(self) -> _Batches:
        return self

    def __next__(self) -> dict[str, Any]:
        try:
            return next(self._it)
        except DataError as e:
            shutdown = getattr(self._it, "_shutdown_workers", None)
            if shutdown is not None:  # stop the other workers now, not at garbage collection
                shutdown()
            raise _one_line(e) from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._it, name)


def _num_yielded(state: dict[str, Any]) -> int:
    if "_snapshot" in state:
        return int(state["_snapshot"]["_snapshot_step"]) + int(state.get("_steps_since_snapshot", 0))
    return int(state.get("_num_yielded", 0))


class PromptLoader(StatefulDataLoader):
    """A :class:`StatefulDataLoader` whose state also records the data layout it was made for.

    ``state_dict()`` adds a ``"dmdr_data"`` entry (layout, rank, global samples consumed);
    ``load_state_dict()`` restores exactly when the layout matches, and otherwise applies
    ``data.on_layout_change`` (see :mod:`dmdr.data`).
    """

    def __init__(self, dataset: PromptDataset, *, layout: dict[str, Any], on_layout_change: str,
                 source_files: list[str] | None = None, source_names: list[str] | None = None, **kwargs: Any):
        with warnings.catch_warnings():  # torchdata calls a deprecated torch.set_vital; not ours to show
            warnings.simplefilter("ignore", UserWarning)
            super().__init__(dataset, **kwargs)
        self.layout = layout
        self.on_layout_change = on_layout_change
        # Not part of the layout (older checkpoints lack it): only tells a re-cut from changed files.
        self.source_files = list(source_files or [])
        self.source_names = list(source_names or [])
        self.samples_before = 0  # global samples consumed before this layout's first batch

    def __iter__(self) -> _Batches:  # type: ignore[override]
        return _Batches(super().__iter__())

    def state_dict(self) -> dict[str, Any]:
        state = dict(super().state_dict())
        ds: PromptDataset = self.dataset  # type: ignore[assignment]
        state[_STATE_KEY] = {"layout": dict(self.layout), "dp_rank": ds.dp_rank, "order_seed": ds.order_seed,
                             "samples_before": self.samples_before, "source_files": list(self.source_files),
                             "source_names": list(self.source_names)}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore this rank's position; on a layout change apply ``data.on_layout_change``."""
        state = dict(state_dict)
        ours = state.pop(_STATE_KEY, None)
        if not state:
            return super().load_state_dict(state)
        if ours is None:
            raise CheckpointError("data loader state has no 'dmdr_data' entry (not written by dmdr.data)")
        ds: PromptDataset = self.dataset  # type: ignore[assignment]
        if not self._changed(ours):
            if int(ours["dp_rank"]) != ds.dp_rank:
                raise CheckpointError(f"data loader state of dp rank {ours['dp_rank']} given to dp rank "
                                      f"{ds.dp_rank}")
            ds.order_seed = int(ours["order_seed"])
            self.samples_before = int(ours["samples_before"])
            return super().load_state_dict(state)
        old = ours["layout"]
        # Every rank consumed as many batches as this one (one per iteration).
        consumed = int(ours["samples_before"]) + _num_yielded(state) * old["batch_size"] * old["dp_world"]
        self._reshuffle(ours, consumed)

    def load_resharded_state(self, states: list[dict[str, Any]]) -> None:
        """Restore from all the old ranks' states (the checkpoint's hook for a world-size change).

        The state of the same dp rank is used as is when the data layout did not change (e.g. only
        non-data-parallel ranks changed); otherwise the order restarts as for ``load_state_dict``,
        with the prompts consumed summed over all old ranks.
        """
        states = [s for s in states if s]
        if not states:
            return super().load_state_dict({})
        ds: PromptDataset = self.dataset  # type: ignore[assignment]
        for state in states:
            ours = state.get(_STATE_KEY)
            if ours is not None and not self._changed(ours) and int(ours["dp_rank"]) == ds.dp_rank:
                return self.load_state_dict(state)
        infos = [s.get(_STATE_KEY) for s in states]
        if any(i is None for i in infos):
            raise CheckpointError("data loader state has no 'dmdr_data' entry (not written by dmdr.data)")
        old = infos[0]["layout"]
        per_rank = {int(i["dp_rank"]): _num_yielded(s) for i, s in zip(infos, states)}
        consumed = int(infos[0]["samples_before"]) + sum(per_rank.values()) * old["batch_size"]
        self._reshuffle(infos[0], consumed)

    def _changed(self, ours: dict[str, Any]) -> list[str]:
        old = ours["layout"]
        return sorted(k for k in set(old) | set(self.layout) if old.get(k) != self.layout.get(k))

    def _describe_changes(self, ours: dict[str, Any]) -> str:
        """What changed, for people. The ``sources`` fingerprint also covers the cut into splits, which another
        reader count (world size, workers) changes for the same files: that is not reported as a source change."""
        old, changed = ours["layout"], self._changed(ours)
        recut = bool({"dp_world", "num_workers"} & set(changed))
        parts = []
        for k in changed:
            if k != "sources":
                parts.append(f"{k} {old.get(k)} -> {self.layout.get(k)}")
            elif ours.get("source_files") == self.source_files and recut:
                continue  # the same files, re-cut for the new number of readers
            elif "source_files" not in ours and recut:
                parts.append("prompt splits re-cut for the new number of readers")
            elif ours.get("source_names") and ours.get("source_names") == self.source_names:
                parts.append("prompt files read from a new location (same names and sizes)")
            else:
                parts.append("prompt sources changed (files or sizes)")
        return "; ".join(parts)

    def _reshuffle(self, ours: dict[str, Any], consumed: int) -> None:
        diff = self._describe_changes(ours)
        if self.on_layout_change == "error":
            raise CheckpointError(f"the data layout changed since the checkpoint ({diff}); an exact data "
                                  f"resume needs the same layout (or set --data.on_layout_change reshuffle)")
        # Per-reader positions cannot be mapped onto other readers. Start a fresh order, seeded by the
        # old order and the number of samples consumed globally, which every rank derives alike.
        ds: PromptDataset = self.dataset  # type: ignore[assignment]
        ds.order_seed = derive_seed("reshuffle", int(ours["order_seed"]), consumed)
        self.samples_before = consumed
        super().load_state_dict({})
        log.warning("data layout changed since the checkpoint (%s): the prompt order restarts, reshuffled, "
                    "after %d prompts consumed globally (data.on_layout_change=reshuffle)", diff, consumed)


def loader_batch_size(cfg: Any) -> int:
    """Prompts per loader batch for a :class:`~dmdr.config.DataConfig`: ``gcd(batch_size, rl_batch_size)``.

    The trainer takes ``batch_size`` prompts per iteration in the cold start and ``rl_batch_size`` in the
    RL stage (``DMDRTrainer._next_batch``); with loader batches of their gcd both are whole numbers of loader
    batches, so the switch drops no prompt and the data position stays a loader position (exact resume
    on either side of it).
    """
    return math.gcd(cfg.batch_size, cfg.rl_batch_size or cfg.batch_size)


def merge_batches(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """Loader batches as one: prompts (and cached ``cond`` tensors) concatenated in order, counts summed."""
    if len(batches) == 1:
        return batches[0]
    out: dict[str, Any] = {"prompts": [p for b in batches for p in b["prompts"]],
                           "read": sum(b.get("read", 0) for b in batches),
                           "truncated": sum(b.get("truncated", 0) for b in batches), "skipped": {}}
    for b in batches:
        for reason, n in b.get("skipped", {}).items():
            out["skipped"][reason] = out["skipped"].get(reason, 0) + n
    if "cond" in batches[0]:
        out["cond"] = cat_conditioning([b["cond"] for b in batches])  # variable lengths padded to the longest
    return out


def build_prompt_loader(cfg: Any, *, dp_rank: int, dp_world: int, seed: int,
                        embedding_cache: EmbeddingCache | None = None,
                        epochs: int | None = None) -> PromptLoader:
    """The prompt loader of data-parallel rank ``dp_rank`` of ``dp_world`` (see :mod:`dmdr.data`).

    Args:
        cfg: a :class:`~dmdr.config.DataConfig`.
        dp_rank: this rank's index among the data-parallel ranks (ranks that see different data).
        dp_world: the number of data-parallel ranks.
        seed: fixes the order (``train.seed``).
        embedding_cache: serve ``"cond"`` from this cache (``None``: prompts only).
        epochs: stop after this many epochs of every source (``None``: forever; for evaluation/tests).

    Raises:
        DataError: no sources, a glob matching nothing, a missing or unreadable shard (by name).
    """
    if not cfg.sources:
        raise DataError("no prompt data: set --data.sources (paths, globs or fsspec URLs of "
                        ".txt/.jsonl/.parquet files)")
    if not 0 <= dp_rank < dp_world:
        raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_world})")
    workers = max(1, cfg.num_workers)
    readers = dp_world * workers
    clean = Cleaner(cfg.max_prompt_chars, cfg.long_prompts)
    plans = tuple(plan_source(s, fmt=cfg.format, field=cfg.field, readers=readers, clean=clean)
                  for s in cfg.sources)
    weights = mixture_weights(cfg.weights, len(plans))
    batch_size = loader_batch_size(cfg)
    stream = StreamConfig(plans=plans, weights=weights, batch_size=batch_size,
                          shuffle_buffer=cfg.shuffle_buffer, field=cfg.field,
                          cleaner=clean, epochs=epochs)
    dataset = PromptDataset(stream, dp_rank=dp_rank, dp_world=dp_world, num_workers=cfg.num_workers,
                            seed=seed, cache=embedding_cache, cache_miss=cfg.cache_miss)
    layout = {"dp_world": dp_world, "num_workers": cfg.num_workers, "batch_size": batch_size,
              "shuffle_buffer": cfg.shuffle_buffer, "seed": seed, "weights": list(weights),
              "sources": [p.fingerprint() for p in plans], "field": cfg.field,
              "cleaning": [cfg.max_prompt_chars, cfg.long_prompts]}
    kwargs: dict[str, Any] = {"batch_size": None, "num_workers": cfg.num_workers, "collate_fn": _identity}
    if cfg.num_workers > 0:
        kwargs["prefetch_factor"] = cfg.prefetch_factor
    return PromptLoader(dataset, layout=layout, on_layout_change=cfg.on_layout_change,
                        source_files=[p.content_fingerprint() for p in plans],
                        source_names=[p.name_fingerprint() for p in plans], **kwargs)
