"""The per-reader prompt stream: split order, block shuffle, mixture, batching, and its exact state.

A *reader* is one (data-parallel rank, loader worker) pair: ``reader = dp_rank * W + worker``
of ``readers = dp_world * W`` (``W = max(1, num_workers)``). Every reader's stream is a pure
function of ``(order_seed, reader, readers, plans, config)``: no wall clock, no worker timing.

Per source and reader:

* the epoch's split order is a permutation seeded by ``(order_seed, source, epoch)``, identical
  on every reader; a reader takes every ``readers``-th split (``range`` plans) or all of them;
* records are read into a block of ``shuffle_buffer`` good prompts, the block is permuted with a
  seed ``(order_seed, source, reader, block number)`` and handed out in that order (a bounded
  shuffle buffer whose content is a function of its start position);
* the state is the cursor where the current block started, the block number and how many of its
  prompts were handed out. A resume re-reads that one block (at most ``shuffle_buffer`` records)
  instead of storing it, so a snapshot every batch costs a few integers.

The mixture draws the source of each prompt with ``random.Random((order_seed, reader, batch))``.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from dmdr.data.readers import Cleaner, read_split
from dmdr.data.shards import Split
from dmdr.data.sources import SourcePlan
from dmdr.errors import DataError


def derive_seed(*parts: Any) -> int:
    """A 64-bit seed from any tuple of ints/strings (stable across processes and Python runs)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


@dataclass(frozen=True)
class StreamConfig:
    """What every reader's stream depends on besides its reader index (pickled into the workers)."""

    plans: tuple[SourcePlan, ...]
    weights: tuple[float, ...]
    batch_size: int
    shuffle_buffer: int
    field: str
    cleaner: Cleaner
    epochs: int | None = None


class SourceStream:
    """One source as seen by one reader: shuffled prompts, forever (or for ``epochs`` epochs)."""

    def __init__(self, plan: SourcePlan, index: int, reader: int, readers: int, order_seed: int,
                 cfg: StreamConfig):
        self.plan, self.index, self.reader, self.readers = plan, index, reader, readers
        self.order_seed, self.cfg = order_seed, cfg
        self.block_size = max(1, cfg.shuffle_buffer)
        # Cursor of the next record to read: epoch, split position in this reader's list, offset
        # inside the split (None = its start), record and good-prompt indices within the epoch (stripes).
        self.epoch, self.split_pos, self.offset, self.rec, self.good = 0, 0, None, 0, 0
        self.block: list[str] = []
        self.block_start: tuple[int, int, int | None, int, int] = (0, 0, None, 0, 0)
        self.block_no, self.taken = 0, 0
        self.exhausted = False
        self._records: Iterator | None = None
        self._epoch_cache: tuple[int, list[Split]] | None = None
        self._good_in_epoch, self._epoch_from_start = 0, True

    # -------------------------------------------------------------- order
    def epoch_splits(self, epoch: int) -> list[Split]:
        """This reader's splits of ``epoch`` in reading order."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            order = list(self.plan.splits)
            random.Random(derive_seed(self.order_seed, "order", self.index, epoch)).shuffle(order)
            if self.plan.mode == "range":
                order = order[self.reader::self.readers]
            self._epoch_cache = (epoch, order)
        return self._epoch_cache[1]

    def _read(self) -> Iterator[tuple[str | None, str | None]]:
        """Records from the cursor on, advancing it; only this reader's records of a stripe."""
        cfg, plan = self.cfg, self.plan
        while cfg.epochs is None or self.epoch < cfg.epochs:
            splits = self.epoch_splits(self.epoch)
            while self.split_pos < len(splits):
                split = splits[self.split_pos]
                shard = plan.shards[split.shard]
                for offset, prompt, reason in read_split(shard, split, self.offset, field=cfg.field,
                                                         clean=cfg.cleaner):
                    self.offset = offset
                    if prompt is None:
                        index, self.rec = self.rec, self.rec + 1
                    else:
                        index, self.good = self.good, self.good + 1
                    if plan.mode == "stripe" and index % self.readers != self.reader:
                        continue
                    if prompt is not None:
                        self._good_in_epoch += 1
                    yield prompt, reason
                self.split_pos, self.offset = self.split_pos + 1, None
            if self._epoch_from_start and self._good_in_epoch == 0:
                raise DataError(
                    f"data source {plan.name!r}: reader {self.reader} of {self.readers} (ranks x workers) "
                    f"found no valid prompt in a whole epoch ({len(splits)} of {len(plan.splits)} splits); "
                    f"the source is empty or all bad, or too small for this many readers")
            self.epoch, self.split_pos, self.offset, self.rec, self.good = self.epoch + 1, 0, None, 0, 0
            self._good_in_epoch, self._epoch_from_start = 0, True

    def _fill(self, counts: Counter | None) -> None:
        """Read the next block of good prompts and permute it (counts: skip reasons, or None on replay)."""
        self.block_start = (self.epoch, self.split_pos, self.offset, self.rec, self.good)
        if self._records is None:
            self._epoch_from_start = self.split_pos == 0 and self.offset is None
            self._records = self._read()
        block: list[str] = []
        read = 0
        for prompt, reason in self._records:
            if reason is not None and counts is not None:
                counts[reason] += 1
            if prompt is not None:
                block.append(prompt)
                read += 1
                if len(block) >= self.block_size:
                    break
        if counts is not None:
            counts["_read"] += read
        rng = random.Random(derive_seed(self.order_seed, "block", self.index, self.reader, self.block_no))
        rng.shuffle(block)
        self.block, self.taken = block, 0
        if not block:
            self.exhausted = True

    def next(self, counts: Counter) -> str | None:
        """The next prompt, or ``None`` once a finite stream is exhausted."""
        if self.taken >= len(self.block):
            if self.exhausted:
                return None
            if self.block:
                self.block_no += 1
            self._fill(counts)
            if self.exhausted:
                return None
        prompt = self.block[self.taken]
        self.taken += 1
        return prompt

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        if self.block and self.taken >= len(self.block):
            # The block is used up: resume from the cursor after it, nothing to re-read.
            epoch, split_pos, offset, rec, good = self.epoch, self.split_pos, self.offset, self.rec, self.good
            block_no, taken = self.block_no + 1, 0
        else:
            epoch, split_pos, offset, rec, good = self.block_start
            block_no, taken = self.block_no, self.taken
        return {"epoch": epoch, "split": split_pos, "offset": -1 if offset is None else offset, "rec": rec,
                "good": good, "block": block_no, "taken": taken, "exhausted": self.exhausted}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.split_pos, self.rec = int(state["epoch"]), int(state["split"]), int(state["rec"])
        self.good = int(state["good"])
        self.offset = None if int(state["offset"]) < 0 else int(state["offset"])
        self.block_no, self.taken = int(state["block"]), 0
        self.block, self._records, self.exhausted = [], None, bool(state["exhausted"])
        if int(state["taken"]) > 0 and not self.exhausted:
            self._fill(None)  # re-read the block this reader was in (its skip counts were reported)
            self.taken = int(state["taken"])


class PromptIterator:
    """One reader's batches; a torchdata ``Stateful`` iterator (its state is snapshotted every batch)."""

    def __init__(self, cfg: StreamConfig, reader: int, readers: int, order_seed: int, cache: Any = None,
                 cache_miss: str = "error"):
        self.cfg, self.reader, self.readers = cfg, reader, readers
        self.order_seed, self.cache, self.cache_miss = order_seed, cache, cache_miss
        self.sources = [SourceStream(p, i, reader, readers, order_seed, cfg) for i, p in enumerate(cfg.plans)]
        self.batch_no = 0
        self.counts: Counter = Counter()

    def __iter__(self) -> PromptIterator:
        return self

    def _draw(self, rng: random.Random, live: list[int]) -> str | None:
        weights = self.cfg.weights
        while live:
            i = live[0] if len(live) == 1 else rng.choices(live, [weights[j] for j in live])[0]
            prompt = self.sources[i].next(self.counts)
            if prompt is None:
                live.remove(i)
                continue
            if self.cache is not None and self.cache_miss == "skip" and not self.cache.contains(prompt):
                self.counts["uncached"] += 1
                self.counts["_read"] -= 1
                continue
            return prompt
        return None

    def __next__(self) -> dict[str, Any]:
        rng = random.Random(derive_seed(self.order_seed, "mix", self.reader, self.batch_no))
        live = [i for i, w in enumerate(self.cfg.weights) if w > 0]
        prompts = []
        for _ in range(self.cfg.batch_size):
            prompt = self._draw(rng, live)
            if prompt is None:
                break
            prompts.append(prompt)
        if not prompts:
            raise StopIteration
        self.batch_no += 1
        counts, self.counts = self.counts, Counter()
        batch: dict[str, Any] = {
            "prompts": prompts,
            "skipped": {k: v for k, v in counts.items() if not k.startswith("_") and k != "truncated"},
            "read": counts["_read"],
            "truncated": counts["truncated"],
        }
        if self.cache is not None:
            cond = self.cache.lookup(prompts)
            if cond is not None:
                batch["cond"] = cond
            elif self.cache_miss != "encode":
                missing = next(p for p in prompts if not self.cache.contains(p))
                raise DataError(f"prompt {missing[:60]!r} is not in the embedding cache {self.cache.path} "
                                f"(re-run tools/cache_text_embeddings.py on these sources, or set "
                                f"--data.cache_miss skip/encode)")
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"order_seed": self.order_seed, "reader": self.reader, "readers": self.readers,
                "batch": self.batch_no, "sources": [s.state_dict() for s in self.sources]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (int(state["reader"]), int(state["readers"])) != (self.reader, self.readers):
            raise DataError(f"data loader state of reader {state['reader']}/{state['readers']} given to "
                            f"reader {self.reader}/{self.readers}")
        if len(state["sources"]) != len(self.sources):
            raise DataError(f"data loader state has {len(state['sources'])} sources, the config "
                            f"{len(self.sources)}")
        self.order_seed = int(state["order_seed"])
        self.batch_no = int(state["batch"])
        self.counts = Counter()
        self.sources = [SourceStream(p, i, self.reader, self.readers, self.order_seed, self.cfg)
                        for i, p in enumerate(self.cfg.plans)]
        for source, s in zip(self.sources, state["sources"]):
            source.load_state_dict(s)


class PromptDataset(IterableDataset):
    """The batches of one data-parallel rank; each loader worker iterates its own reader.

    Yields whole batches (use ``batch_size=None`` in the loader), so that the skip counts of a
    worker travel with its batches and the embedding lookup runs in the workers.
    """

    def __init__(self, cfg: StreamConfig, *, dp_rank: int, dp_world: int, num_workers: int, seed: int,
                 cache: Any = None, cache_miss: str = "error"):
        super().__init__()
        self.cfg, self.dp_rank, self.dp_world = cfg, dp_rank, dp_world
        self.workers = max(1, num_workers)
        self.order_seed = derive_seed("dmdr-data", seed)
        self.cache, self.cache_miss = cache, cache_miss

    @property
    def readers(self) -> int:
        return self.dp_world * self.workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        if info is not None and info.num_workers != self.workers:
            raise DataError(f"PromptDataset planned for {self.workers} workers runs in {info.num_workers}")
        return PromptIterator(self.cfg, self.dp_rank * self.workers + worker, self.readers, self.order_seed,
                              self.cache, self.cache_miss)


def mixture_weights(weights: Sequence[float], n: int) -> tuple[float, ...]:
    """Normalised weights; empty means equal."""
    w = [1.0] * n if not weights else [float(x) for x in weights]
    total = sum(w)
    return tuple(x / total for x in w)
