"""Prompt sources: resolve paths, globs and fsspec URLs to shards, check them, and cut them into splits.

Everything here runs once, at build time, in the training process: a glob that matches nothing,
a missing or unreadable shard, a Parquet file without the prompt column all raise
:class:`~dmdr.errors.DataError` naming the path before any training work starts.

A *split* is the unit of work handed to one reader (one data-parallel rank x loader worker):
a byte range of a text/JSONL shard (a line belongs to the split in which it starts) or a row
range of a Parquet shard. A source is planned in one of three modes:

* ``range``: at least ``readers`` splits; each epoch, a seeded permutation of the splits is dealt
  round-robin to the readers, so every record is read by exactly one reader, once per epoch.
* ``stripe``: a small text source that cannot be cut into enough splits: every reader reads the
  whole source and keeps the good prompts whose index (within the epoch) is ``reader mod readers``
  (and counts the bad records whose index is): still exactly once per epoch, at a re-read cost
  bounded by :data:`STRIPE_MAX_BYTES` per reader.
* ``replicate``: a source with fewer good prompts than readers: every reader reads all of it
  (a prompt is then seen by every reader in an epoch; only a tiny curated source lands here).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec

from dmdr.data.readers import Cleaner, read_split
from dmdr.data.shards import Shard, Split, is_local, open_parquet
from dmdr.errors import DataError

FORMATS = ("txt", "jsonl", "parquet")
_EXTENSIONS = {".txt": "txt", ".text": "txt", ".prompts": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl",
               ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
_COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".lzma": "lzma", ".zst": "zstd"}

MAX_SPLIT_BYTES = 64 << 20
"""A text split is at most this large (more, smaller splits shuffle better and balance readers)."""
MIN_SPLIT_BYTES = 64 << 10
"""A text split is at least this large (so that a split almost surely holds a line start)."""
MAX_SPLIT_ROWS = 1 << 20
"""A Parquet split holds at most this many rows."""
STRIPE_MAX_BYTES = 64 << 20
"""Largest text source that may be planned as ``stripe`` (every reader reads it whole)."""
SPLITS_PER_READER = 4
"""Target splits per reader per epoch (balance between readers, shuffle of the shard order)."""


@dataclass(frozen=True)
class SourcePlan:
    """A resolved, checked source cut into splits for ``readers`` readers."""

    name: str
    shards: tuple[Shard, ...]
    splits: tuple[Split, ...]
    mode: str
    readers: int

    def fingerprint(self) -> str:
        """Changes whenever the shards, their sizes or the splits change (part of the resume layout)."""
        h = hashlib.blake2b(digest_size=8)
        h.update(repr((self.name, self.mode, self.readers, self.shards, self.splits)).encode())
        return h.hexdigest()

    def content_fingerprint(self) -> str:
        """Changes whenever the shards or their sizes change, not with the number of readers (for messages:
        :meth:`fingerprint` also changes when another world size re-cuts the same files)."""
        h = hashlib.blake2b(digest_size=8)
        h.update(repr((self.name, self.shards)).encode())
        return h.hexdigest()

    def name_fingerprint(self) -> str:
        """:meth:`content_fingerprint` without the folders: the same files copied or moved elsewhere keep it (a
        branch run with its own copy of the prompt list), so a message can say "moved" instead of "changed"."""
        h = hashlib.blake2b(digest_size=8)
        h.update(repr([(s.path.rstrip("/").rsplit("/", 1)[-1], s.fmt, s.size, s.compression, s.row_groups)
                       for s in self.shards]).encode())
        return h.hexdigest()


# --------------------------------------------------------------------------------------------- #
# Resolving
# --------------------------------------------------------------------------------------------- #

def split_suffixes(path: str) -> tuple[str | None, str | None]:
    """``(format, compression)`` read from a file name, e.g. ``a.jsonl.gz`` -> ``("jsonl", "gzip")``."""
    name = path.rsplit("/", 1)[-1].lower()
    stem, ext = os.path.splitext(name)
    compression = _COMPRESSIONS.get(ext)
    if compression:
        stem, ext = os.path.splitext(stem)
    return _EXTENSIONS.get(ext), compression


def expand_source(spec: str, fmt: str = "auto") -> list[str]:
    """Local path, directory, glob or fsspec URL -> sorted shard paths (URLs keep their protocol).

    A folder contributes its files (recursively) with a prompt-file extension, or, when ``fmt`` is
    given, all its files but hidden ones (``.*``, ``_*``: e.g. Spark's ``_SUCCESS``).

    Raises:
        DataError: nothing matches, or the path does not exist.
    """
    try:
        fs, path = fsspec.core.url_to_fs(spec)
    except (ImportError, ValueError) as e:  # e.g. s3:// without s3fs installed
        raise DataError(f"data source {spec!r}: {e}") from None
    local = is_local(fs)
    try:
        if any(c in path for c in "*?["):
            found = [p for p in fs.glob(path) if not fs.isdir(p)]
            if not found:
                raise DataError(f"data source {spec!r} matches no files")
        elif fs.isdir(path):
            found = [p for p in fs.find(path) if (split_suffixes(p)[0] is not None if fmt == "auto"
                                                  else p.rsplit("/", 1)[-1][:1] not in "._")]
            if not found:
                raise DataError(f"data source {spec!r} is a folder without .txt/.jsonl/.parquet files")
        elif fs.exists(path):
            found = [path]
        else:
            raise DataError(f"data source {spec!r} does not exist")
    except OSError as e:
        raise DataError(f"data source {spec!r} cannot be listed: {e}") from None
    found = sorted(found)
    return found if local else [fs.unstrip_protocol(p) for p in found]


def inspect_shard(path: str, fmt: str, field: str) -> Shard:
    """Open a shard once (existence, permissions, Parquet footer and column) and record its size.

    Raises:
        DataError: naming the path, when it cannot be read or has no prompt column.
    """
    _, compression = split_suffixes(path)
    try:
        if fmt == "parquet":
            import pyarrow as pa

            pf = open_parquet(path)
            names = pf.schema_arrow.names
            if field not in names:
                raise DataError(f"parquet shard {path} has no column {field!r} "
                                f"(columns: {', '.join(names)}); set --data.field")
            col_type = pf.schema_arrow.field(field).type
            if pa.types.is_dictionary(col_type):
                col_type = col_type.value_type
            if pa.types.is_string(col_type) or pa.types.is_large_string(col_type):
                kind = "string"
            elif pa.types.is_binary(col_type) or pa.types.is_large_binary(col_type):
                kind = "binary"
            else:
                raise DataError(f"parquet shard {path}: column {field!r} is {col_type}, not text")
            md = pf.metadata
            groups = tuple(md.row_group(i).num_rows for i in range(md.num_row_groups))
            return Shard(path, fmt, sum(groups), None, groups, kind)
        fs, p = fsspec.core.url_to_fs(path)
        size = int(fs.size(p))
        with fs.open(p, "rb") as f:  # permissions, and that the object really opens
            f.read(1)
        return Shard(path, fmt, size, compression)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to open is the user's shard, named here
        raise DataError(f"cannot read data shard {path}: {type(e).__name__}: {e}") from None


def _shard_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    found, _ = split_suffixes(path)
    if found is None:
        raise DataError(f"cannot tell the format of data shard {path} from its name; "
                        f"set --data.format (txt, jsonl or parquet)")
    return found


def _count_prompts(shards: Sequence[Shard], field: str, clean) -> int:
    return sum(prompt is not None
               for i, shard in enumerate(shards) if shard.size
               for _, prompt, _ in read_split(shard, Split(i, 0, -1), None, field=field, clean=clean))


# --------------------------------------------------------------------------------------------- #
# Planning
# --------------------------------------------------------------------------------------------- #

def _text_splits(shards: Sequence[Shard], readers: int) -> list[Split]:
    total = sum(s.size for s in shards)
    target = max(SPLITS_PER_READER * readers, math.ceil(total / MAX_SPLIT_BYTES))
    out = []
    for i, s in enumerate(shards):
        if s.size == 0:
            continue
        if s.compression:  # a compressed stream cannot be entered in the middle
            out.append(Split(i, 0, -1))
            continue
        n = max(1, min(round(s.size * target / max(total, 1)), s.size // MIN_SPLIT_BYTES))
        bounds = [s.size * k // n for k in range(n + 1)]
        out.extend(Split(i, a, b) for a, b in zip(bounds, bounds[1:]))
    return out


def _row_splits(shards: Sequence[Shard], readers: int) -> list[Split]:
    total = sum(s.size for s in shards)
    target = max(SPLITS_PER_READER * readers, math.ceil(total / MAX_SPLIT_ROWS))
    out = []
    for i, s in enumerate(shards):
        if s.size == 0:
            continue
        n = max(1, min(round(s.size * target / max(total, 1)), s.size))
        starts = [0]
        for rows in s.row_groups:
            starts.append(starts[-1] + rows)
        # Cut at row-group boundaries when there are enough of them (no row group is decoded by two
        # readers); otherwise (or if uneven row groups collapse the cuts) in equal row ranges.
        bounds = sorted({min(starts, key=lambda x, t=s.size * k // n: abs(x - t)) for k in range(n + 1)})
        if len(bounds) < n + 1:
            bounds = [s.size * k // n for k in range(n + 1)]
        out.extend(Split(i, a, b) for a, b in zip(bounds, bounds[1:]) if b > a)
    return out


def plan_source(spec: str, *, fmt: str, field: str, readers: int, clean: Any = None) -> SourcePlan:
    """Resolve, check and split one source for ``readers`` readers (see the module docstring).

    Args:
        spec: a path, folder, glob or fsspec URL.
        fmt: ``auto`` (by extension) or the format of every shard.
        field: the JSONL field / Parquet column of the prompt.
        readers: data-parallel ranks x loader workers.
        clean: the loader's :class:`~dmdr.data.readers.Cleaner` (counts the prompts of a small source).

    Raises:
        DataError: a bad path, an unreadable shard, an empty source, or a big source in too few
            compressed shards to give every reader work.
    """
    paths = expand_source(spec, fmt)
    formats = [_shard_format(p, fmt) for p in paths]
    local = all(is_local(fsspec.core.url_to_fs(p)[0]) for p in paths[:1])
    if local or len(paths) < 4:
        shards = [inspect_shard(p, f, field) for p, f in zip(paths, formats)]
    else:  # object stores: one round trip per shard, overlap them
        with ThreadPoolExecutor(16) as pool:
            shards = list(pool.map(lambda pf: inspect_shard(pf[0], pf[1], field), zip(paths, formats)))
    total = sum(s.size for s in shards)
    if total == 0:
        raise DataError(f"data source {spec!r} is empty ({len(shards)} shard(s), no records)")
    kinds = {s.fmt == "parquet" for s in shards}
    if len(kinds) > 1:
        raise DataError(f"data source {spec!r} mixes Parquet and text shards; give them as separate sources")
    if shards[0].fmt == "parquet":
        if total < readers:
            splits, mode = [Split(i, 0, s.size) for i, s in enumerate(shards) if s.size], "replicate"
        else:
            splits, mode = _row_splits(shards, readers), "range"
    else:
        splits, mode = _text_splits(shards, readers), "range"
        if len(splits) < readers:
            if total > STRIPE_MAX_BYTES:
                raise DataError(
                    f"data source {spec!r}: {len(splits)} unsplittable (compressed) shard(s) for {readers} "
                    f"readers (ranks x workers); recompress it into >= {readers} shards or decompress it")
            splits = [Split(i, 0, -1) for i, s in enumerate(shards) if s.size]
            if clean is None:
                clean = Cleaner()
            mode = "stripe" if _count_prompts(shards, field, clean) >= readers else "replicate"
    return SourcePlan(spec, tuple(shards), tuple(splits), mode, readers)
