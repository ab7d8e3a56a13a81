"""Record readers: stream one split of a shard, one record at a time, in constant memory.

Text and JSONL are read line by line (``readline`` with a cap, so a file without newlines cannot
fill the memory); Parquet by row groups through ``ParquetFile.iter_batches`` on the one prompt
column. Each record comes out as ``(next_offset, prompt, reason)``:

* a good prompt: ``(offset, "text", None)``, or ``(offset, "cut text", "truncated")`` when it was
  longer than ``max_chars`` and the policy is ``truncate``;
* a bad record: ``(offset, None, reason)`` with ``reason`` one of :data:`SKIP_REASONS`.

``next_offset`` is where the following record starts (a byte offset, or a row index for
Parquet), so a reader can be re-entered exactly there after a resume.
"""

from __future__ import annotations

import bisect
import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec

from dmdr.data.shards import Shard, Split, is_local, open_parquet
from dmdr.errors import DataError

SKIP_REASONS = ("bad_utf8", "bad_json", "missing_field", "bad_field", "empty", "too_long", "uncached")
"""Why a record was skipped: undecodable bytes, a line that is not a JSON object, no (or a null) prompt
field, a prompt field that is not a string, an empty or whitespace-only prompt, a prompt longer than
``max_prompt_chars`` under ``long_prompts=skip`` (or a line over :data:`MAX_RECORD_BYTES`), a prompt
absent from the embedding cache under ``cache_miss=skip``."""

MAX_RECORD_BYTES = 1 << 20
"""A text/JSONL line longer than this is skipped (``too_long``) without being held in memory."""

Record = tuple[int, str | None, str | None]


@dataclass(frozen=True)
class Cleaner:
    """Turns a raw prompt into a training prompt, or a skip reason."""

    max_chars: int = 2048
    long_prompts: str = "truncate"

    def __call__(self, text: str) -> tuple[str | None, str | None]:
        text = text.strip()
        if not text:
            return None, "empty"
        if len(text) > self.max_chars:
            if self.long_prompts == "skip":
                return None, "too_long"
            return text[: self.max_chars].rstrip(), "truncated"
        return text, None


def _get_field(obj: object, field: str) -> object:
    if not isinstance(obj, dict):
        return None
    if field in obj or "." not in field:
        return obj.get(field)
    for part in field.split("."):  # nested: "meta.caption"
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def _parse_line(raw: bytes, fmt: str, field: str, clean: Cleaner) -> tuple[str | None, str | None]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "bad_utf8"
    if text.startswith("\ufeff"):
        text = text[1:]
    if fmt == "txt":
        return clean(text)
    if not text.strip():
        return None, "empty"
    try:
        obj = json.loads(text)
    except ValueError:
        return None, "bad_json"
    if not isinstance(obj, dict):
        return None, "bad_json"
    value = _get_field(obj, field)
    if value is None:
        return None, "missing_field"
    if not isinstance(value, str):
        return None, "bad_field"
    return clean(value)


def _open_text(shard: Shard):
    fs, p = fsspec.core.url_to_fs(shard.path)
    if is_local(fs) and shard.compression is None:
        return open(p, "rb", buffering=1 << 20)  # noqa: SIM115 - the builtin file is the fast path
    return fs.open(p, "rb", compression=shard.compression, block_size=8 << 20)


def _read_text(shard: Shard, split: Split, offset: int | None, field: str,
               clean: Cleaner) -> Iterator[Record]:
    end = split.end if split.end >= 0 else None
    with _open_text(shard) as f:
        if offset is None:
            if split.start > 0:
                # Lines belong to the split they start in: skip the tail of a line that began before us.
                f.seek(split.start - 1)
                pos = split.start - 1 + _read_line_capped(f)[1]
            else:
                pos = 0
        else:
            f.seek(offset)
            pos = offset
        while end is None or pos < end:
            raw, n = _read_line_capped(f)
            if not n:
                return
            pos += n
            if not raw:
                yield pos, None, "too_long"
                continue
            if raw.endswith(b"\n"):
                raw = raw[:-1]
            if not raw.strip() and shard.fmt == "txt":
                yield pos, None, "empty"
                continue
            prompt, reason = _parse_line(raw, shard.fmt, field, clean)
            yield pos, prompt, reason


def _read_line_capped(f) -> tuple[bytes, int]:
    """One line and its length in bytes; a line over MAX_RECORD_BYTES is drained and returned as ``b""``."""
    line = f.readline(MAX_RECORD_BYTES)
    if len(line) < MAX_RECORD_BYTES or line.endswith(b"\n"):
        return line, len(line)
    n = len(line)
    while True:  # drain the rest of the oversized line without keeping it
        more = f.readline(MAX_RECORD_BYTES)
        n += len(more)
        if not more or more.endswith(b"\n"):
            return b"", n


def _read_parquet(shard: Shard, split: Split, offset: int | None, field: str,
                  clean: Cleaner) -> Iterator[Record]:
    start = split.start if offset is None else offset
    end = split.end if split.end >= 0 else shard.size
    if start >= end:
        return
    starts = [0]
    for rows in shard.row_groups:
        starts.append(starts[-1] + rows)
    first = bisect.bisect_right(starts, start) - 1
    last = bisect.bisect_left(starts, end) - 1
    groups = [g for g in range(first, last + 1) if shard.row_groups[g] > 0]
    pos = starts[first]
    binary = shard.column_type == "binary"
    with contextlib.closing(open_parquet(shard.path)) as pf:
        yield from _parquet_rows(pf, groups, pos, start, end, field, binary, clean)


def _parquet_rows(pf, groups: list[int], pos: int, start: int, end: int, field: str, binary: bool,
                  clean: Cleaner) -> Iterator[Record]:
    to_skip = start - pos
    for batch in pf.iter_batches(batch_size=4096, row_groups=groups, columns=[field], use_threads=False):
        values = batch.column(0)
        if to_skip >= len(values):
            to_skip -= len(values)
            pos += len(values)
            continue
        if to_skip:
            values = values.slice(to_skip)
            pos += to_skip
            to_skip = 0
        for value in values.to_pylist():
            if pos >= end:
                return
            pos += 1
            if value is None:
                yield pos, None, "missing_field"
                continue
            if binary:
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError:
                    yield pos, None, "bad_utf8"
                    continue
            prompt, reason = clean(value)
            yield pos, prompt, reason


def read_split(shard: Shard, split: Split, offset: int | None, *, field: str,
               clean: Cleaner) -> Iterator[Record]:
    """Stream the records of ``split`` from ``offset`` (``None``: the split's start).

    Raises:
        DataError: naming the shard, when it cannot be opened or read.
    """
    reader = _read_parquet if shard.fmt == "parquet" else _read_text
    try:
        yield from reader(shard, split, offset, field, clean)
    except DataError:
        raise
    except (OSError, EOFError, ValueError) as e:
        raise DataError(f"cannot read data shard {shard.path}: {type(e).__name__}: {e}") from None
    except Exception as e:
        if type(e).__module__.startswith("pyarrow"):
            raise DataError(f"cannot read data shard {shard.path}: {type(e).__name__}: {e}") from None
        raise
