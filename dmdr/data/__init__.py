"""Streaming, resumable prompt data: sources, mixture, stateful loader, bad-data accounting, embedding cache.

DMDR is image-free: its data is prompts. This package streams them from any number of shards in
constant memory, in an order fixed by the seed, split across data-parallel ranks and loader
workers without overlap or loss, and resumes exactly from a checkpoint.

Contract with the trainer
=========================

``build_prompt_loader(cfg, *, dp_rank, dp_world, seed, embedding_cache=None) -> PromptLoader``
    ``cfg`` is a :class:`~dmdr.config.DataConfig`. The result is a torchdata
    :class:`~torchdata.stateful_dataloader.StatefulDataLoader` (subclass :class:`PromptLoader`).
    Every source is resolved and checked here, before training: a glob that matches nothing, a
    missing or unreadable shard, a Parquet shard without the prompt column raise
    :class:`~dmdr.errors.DataError` with one line naming the path.

    Iterating it yields, forever (epochs roll over; ``train.max_steps`` ends training), dicts::

        {"prompts": list[str],          # exactly loader_batch_size(cfg) prompts
         "skipped": dict[str, int],     # bad records by reason since this worker's previous batch
         "read": int,                   # good records read since then (the skip rate's denominator)
         "truncated": int,              # prompts cut to data.max_prompt_chars since then
         "cond": dict[str, Tensor]}     # only with an embedding cache: batch-first, as cached

    Skip reasons: :data:`SKIP_REASONS` (``bad_utf8``, ``bad_json``, ``missing_field``, ``bad_field``,
    ``empty``, ``too_long``, ``uncached``). A shard that becomes unreadable during the run raises a
    one-line ``DataError`` naming it (also from a worker process).

    ``loader.state_dict()`` / ``loader.load_state_dict(state)`` is the per-dp-rank entry of the
    checkpoint: save rank r's state and give it back to rank r (at another world size:
    ``loader.load_resharded_state(all_old_states)``, see below). The resumed loader yields exactly
    the batches the uninterrupted run would have yielded next (with ``num_workers`` 0 or more). It
    assumes every rank consumed the same number of batches (one per iteration), as the trainer does.

``loader_batch_size(cfg)``, ``merge_batches(batches)``
    The loader's batches hold ``gcd(data.batch_size, data.rl_batch_size)`` prompts; an iteration takes
    as many whole loader batches as its stage needs and merges them (prompts and ``cond`` concatenated
    in order, counts summed), so the RL stage's smaller batch drops no prompt and resume stays exact.

``SkipMonitor.from_config(cfg)``
    ``update(batch)`` for every batch (raises ``DataError`` once the cumulative skip rate exceeds
    ``data.max_skip_rate`` after ``data.skip_check_after`` records); ``metrics()`` returns
    ``data/seen``, ``data/skipped``, ``data/skipped/<reason>``, ``data/skip_rate``,
    ``data/truncated``; ``state_dict()`` / ``load_state_dict()`` go into the checkpoint.

``EmbeddingCache(path)``
    Read side of a folder written by ``tools/cache_text_embeddings.py``: ``lookup(prompts) ->
    Conditioning | None`` (``None`` if any prompt is missing), ``negative() -> Conditioning`` (the
    empty-prompt negative, batch 1), ``contains(prompt)``. With ``embedding_cache=`` the loader looks
    batches up in its workers; a prompt not in the cache follows ``data.cache_miss``: ``error``
    (one-line ``DataError``), ``skip`` (counted as ``uncached``), ``encode`` (the batch comes without
    ``"cond"`` and the trainer encodes it: the text encoders must then be loaded).
    :class:`EmbeddingCacheWriter` and :func:`cache_embeddings` are the write side.

Order and splitting
===================

A *reader* is one (dp rank, loader worker): ``readers = dp_world * max(1, num_workers)``. Each
source is cut into splits (byte ranges of text/JSONL shards, row ranges of Parquet shards; see
:mod:`dmdr.data.sources`); each epoch a seeded permutation of the splits is dealt round-robin to
the readers; each reader shuffles its records through blocks of ``data.shuffle_buffer`` prompts;
a weighted mixture picks the source of each prompt (:mod:`dmdr.data.stream`). Every reader's
stream depends only on the seed and the layout, never on timing, and StatefulDataLoader
round-robins its workers' batches, so the batches of a rank are deterministic.
Readers do not advance through epochs in lockstep (their splits differ in size), so "one epoch"
is per reader: over its epoch ``e`` each reader reads its own splits, and the union over readers
is every record exactly once. A source with fewer records than readers is read whole by each.

Changing the layout on resume
=============================

The *layout* is the data-parallel world size, ``num_workers``, ``batch_size``, ``shuffle_buffer``,
the seed, the mixture weights, the prompt field and cleaning, and the sources' shards and splits.
A reader's position cannot be remapped onto a different set of readers, so when the checkpoint's
layout differs from the new one:

* ``data.on_layout_change=reshuffle`` (default): a one-line warning names what changed; the data
  order restarts at the beginning of a fresh epoch whose order is seeded by the old order and the
  number of prompts consumed globally (``batches yielded x batch_size x old dp_world``, identical in
  every rank's state). Every new rank derives the same order, no rank depends on timing, and a
  later resume with the new layout is exact again. Prompts of the interrupted epoch may be seen
  again sooner than otherwise; none is lost from the distribution. The checkpoint hands every new
  rank all the old ranks' states through ``loader.load_resharded_state(states)`` (the count is then
  summed over them); ``load_state_dict`` with any one old rank's state gives the same order too.
* ``data.on_layout_change=error``: :class:`~dmdr.errors.CheckpointError` naming the change.
"""

from dmdr.data.cache import (
    EmbeddingCache,
    EmbeddingCacheWriter,
    cache_embeddings,
    iter_source_prompts,
    prompt_hash,
)
from dmdr.data.loader import PromptLoader, build_prompt_loader, loader_batch_size, merge_batches
from dmdr.data.monitor import SkipMonitor
from dmdr.data.readers import MAX_RECORD_BYTES, SKIP_REASONS, Cleaner
from dmdr.data.sources import SourcePlan, expand_source, plan_source

__all__ = [
    "EmbeddingCache", "EmbeddingCacheWriter", "cache_embeddings", "iter_source_prompts", "prompt_hash",
    "PromptLoader", "build_prompt_loader", "loader_batch_size", "merge_batches", "SkipMonitor", "MAX_RECORD_BYTES",
    "SKIP_REASONS", "Cleaner",
    "SourcePlan", "expand_source", "plan_source",
]
