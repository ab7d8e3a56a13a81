"""A source's shards and splits (the units readers and the planner share), and opening a shard's file."""

from __future__ import annotations

from dataclasses import dataclass

import fsspec


@dataclass(frozen=True)
class Shard:
    """One file of a source.

    Attributes:
        path: a local path or an fsspec URL.
        fmt: ``txt``, ``jsonl`` or ``parquet``.
        size: bytes (text; compressed size when compressed) or rows (Parquet).
        compression: an fsspec compression name, or ``None``.
        row_groups: Parquet row counts per row group (empty for text).
        column_type: ``string`` or ``binary`` for Parquet (binary values are decoded as UTF-8).
    """

    path: str
    fmt: str
    size: int
    compression: str | None = None
    row_groups: tuple[int, ...] = ()
    column_type: str = "string"


@dataclass(frozen=True)
class Split:
    """Byte range (text) or row range (Parquet) ``[start, end)`` of shard number ``shard``; ``-1``: to EOF."""

    shard: int
    start: int
    end: int


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def open_parquet(path: str):
    import pyarrow.parquet as pq

    fs, p = fsspec.core.url_to_fs(path)
    if is_local(fs):
        return pq.ParquetFile(p)
    return pq.ParquetFile(fs.open(p, "rb"))
