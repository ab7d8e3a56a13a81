"""Text-embedding cache: sharded safetensors keyed by a prompt hash, written once, read by the loader.

The text encoders are frozen, so a prompt's conditioning never changes: encode every prompt of
the sources once (``tools/cache_text_embeddings.py``) and a training run need not load T5-XXL /
Qwen3 at all. Layout of a cache folder::

    cache.json                      what wrote it (model path, keys, prompt cleaning); informative
    negative.safetensors            the empty-prompt negative, batch 1, as ``encoder.negative()`` returned it
    shard-r00000-00000.safetensors  per prompt ``<row>/<key>`` tensors (one row of encode()'s batch-first
                                    outputs, any length) and ``<row>/__prompt__`` (its UTF-8 bytes)
    index-r00000.safetensors        ``hash`` (int64, 64-bit BLAKE2b of the prompt), ``shard``, ``row``

One index and a series of shards per writer rank (``r00000`` ...), so several processes can
write one cache without talking to each other. The reader merges the indexes, finds a prompt by
binary search on its hash and checks the stored bytes (a hash collision is a miss, never a wrong
embedding). Variable-length encoders (a padding mask in the conditioning, :data:`dmdr.models.base.Conditioning`)
are stored at each prompt's own length (the batch padding is cut off: a Qwen2.5-VL row is its tokens, not the
longest prompt's); a looked-up batch is right-padded with zeros to its longest (the mask pads with False).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from dmdr.errors import DataError
from dmdr.models.base import pad_cat, padding_mask_key, sequence_lengths
from dmdr.permissions import respect_umask

Conditioning = dict[str, Tensor]
_PROMPT = "__prompt__"


def prompt_hash(prompt: str) -> int:
    """The cache key of a prompt: a signed 64-bit BLAKE2b of its UTF-8 bytes."""
    digest = hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _pad_stack(rows: Sequence[Tensor]) -> Tensor:
    """Rows of one key stacked into a batch, right-padded with zeros to the longest (a mask pads with False)."""
    try:
        return pad_cat([r.unsqueeze(0) for r in rows])
    except ValueError:
        raise DataError(f"cached rows have different ranks {sorted({tuple(r.shape) for r in rows})}; the cache "
                        "mixes encoders") from None


class EmbeddingCache:
    """Read side of a cache folder; picklable (file handles are reopened in each loader worker).

    Args:
        path: a folder written by :class:`EmbeddingCacheWriter`.

    Raises:
        DataError: the folder is missing, has no index or no negative.
    """

    def __init__(self, path: str | os.PathLike, max_open: int = 32):
        self.path = Path(path)
        if not self.path.is_dir():
            raise DataError(f"embedding cache {self.path} does not exist; "
                            f"write it with tools/cache_text_embeddings.py")
        indexes = sorted(self.path.glob("index-*.safetensors"))
        if not indexes:
            raise DataError(f"embedding cache {self.path} has no index-*.safetensors (incomplete or not a "
                            f"cache); re-run tools/cache_text_embeddings.py")
        if not (self.path / "negative.safetensors").is_file():
            raise DataError(f"embedding cache {self.path} has no negative.safetensors; re-run the cache tool")
        hashes, shards, rows, self.shard_files = [], [], [], []
        self.keys: tuple[str, ...] = ()
        for index in indexes:
            try:
                with safe_open(str(index), framework="np") as f:
                    names = json.loads(f.metadata()["shards"])
                    keys = tuple(json.loads(f.metadata().get("keys", "[]")))
                    hashes.append(f.get_tensor("hash"))
                    shards.append(f.get_tensor("shard").astype(np.int64) + len(self.shard_files))
                    rows.append(f.get_tensor("row"))
            except Exception as e:  # noqa: BLE001 - a truncated/corrupt file is named, not traced
                raise DataError(f"embedding cache index {index} is unreadable: {e}") from None
            self.shard_files.extend(names)
            if keys and self.keys and keys != self.keys:
                raise DataError(f"embedding cache {self.path}: {index.name} holds {list(keys)}, others "
                                f"{list(self.keys)} (written by different encoders)")
            self.keys = self.keys or keys
        h = np.concatenate(hashes)
        order = np.argsort(h, kind="stable")
        self._hash = h[order]
        self._shard = np.concatenate(shards)[order]
        self._row = np.concatenate(rows)[order]
        manifest = self.path / "cache.json"
        self.meta = json.loads(manifest.read_text()) if manifest.is_file() else {}
        self.max_open = max_open
        self._handles: OrderedDict[int, Any] = OrderedDict()
        self._negative: Conditioning | None = None

    def __len__(self) -> int:
        return len(self._hash)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
        return state

    def _handle(self, shard: int):
        f = self._handles.get(shard)
        if f is None:
            f = safe_open(str(self.path / self.shard_files[shard]), framework="pt")
            self._handles[shard] = f
            if len(self._handles) > self.max_open:
                self._handles.popitem(last=False)
        else:
            self._handles.move_to_end(shard)
        return f

    def _locate(self, prompt: str) -> tuple[int, int] | None:
        h = prompt_hash(prompt)
        i = int(np.searchsorted(self._hash, h))
        while i < len(self._hash) and self._hash[i] == h:  # equal hashes: check the stored text
            f = self._handle(int(self._shard[i]))
            row = int(self._row[i])
            if bytes(f.get_tensor(f"{row}/{_PROMPT}").numpy()) == prompt.encode("utf-8"):
                return int(self._shard[i]), row
            i += 1
        return None

    def contains(self, prompt: str) -> bool:
        return self._locate(prompt) is not None

    def get(self, prompt: str) -> Conditioning | None:
        """One prompt's tensors (without the batch dimension), or ``None`` when it is not cached."""
        where = self._locate(prompt)
        if where is None:
            return None
        f = self._handle(where[0])
        return {k: f.get_tensor(f"{where[1]}/{k}") for k in self.keys}

    def lookup(self, prompts: Sequence[str]) -> Conditioning | None:
        """Batch-first conditioning of ``prompts``, or ``None`` if any of them is not cached."""
        rows = []
        for p in prompts:
            r = self.get(p)
            if r is None:
                return None
            rows.append(r)
        return {k: _pad_stack([r[k] for r in rows]) for k in rows[0]}

    def negative(self) -> Conditioning:
        """The empty-prompt negative, batch 1."""
        if self._negative is None:
            with safe_open(str(self.path / "negative.safetensors"), framework="pt") as f:
                self._negative = {k: f.get_tensor(k) for k in f.keys()}
        return self._negative


class EmbeddingCacheWriter:
    """Write side: add prompts with their encoded rows; :meth:`close` writes the index.

    Args:
        path: the cache folder (created).
        rank: this writer's number (several writers may fill one folder, each with its own files).
        shard_prompts: prompts per shard file.
    """

    def __init__(self, path: str | os.PathLike, rank: int = 0, shard_prompts: int = 1000):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.rank, self.shard_prompts = rank, shard_prompts
        self._pending: dict[str, Tensor] = {}
        self._rows = 0
        self._hashes: list[int] = []
        self._index_shard: list[int] = []
        self._index_row: list[int] = []
        self._shard_names: list[str] = []
        self.keys: tuple[str, ...] = ()

    def write_negative(self, negative: Conditioning) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in negative.items()},
                  str(self.path / "negative.safetensors"))
        respect_umask(self.path / "negative.safetensors")  # safetensors writes 0600: the group reads the cache too

    def add(self, prompts: Sequence[str], cond: Conditioning) -> None:
        """Store row ``i`` of every batch-first tensor of ``cond`` under ``prompts[i]``."""
        for k, v in cond.items():
            if v.shape[0] != len(prompts):
                raise ValueError(f"encode() returned {k!r} with batch {v.shape[0]} for {len(prompts)} "
                                 f"prompts")
        if not self.keys:
            self.keys = tuple(cond)
        elif tuple(cond) != self.keys:
            raise ValueError(f"encode() returned keys {sorted(cond)}, earlier batches {sorted(self.keys)}")
        cpu = {k: v.detach().cpu() for k, v in cond.items()}
        lengths = sequence_lengths(cpu)
        padded = cpu[padding_mask_key(cpu)].shape[1] if lengths is not None else -1
        for i, prompt in enumerate(prompts):
            row = self._rows
            for k, v in cpu.items():
                v = v[i]
                if lengths is not None and v.ndim and v.shape[0] == padded:  # a masked sequence: its own length
                    v = v[:int(lengths[i])]
                self._pending[f"{row}/{k}"] = v.clone().contiguous()
            text = bytearray(prompt.encode("utf-8"))
            self._pending[f"{row}/{_PROMPT}"] = torch.frombuffer(text, dtype=torch.uint8)
            self._hashes.append(prompt_hash(prompt))
            self._index_shard.append(len(self._shard_names))
            self._index_row.append(row)
            self._rows += 1
            if self._rows >= self.shard_prompts:
                self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        name = f"shard-r{self.rank:05d}-{len(self._shard_names):05d}.safetensors"
        save_file(self._pending, str(self.path / f".{name}.tmp"))
        respect_umask(self.path / f".{name}.tmp")
        os.replace(self.path / f".{name}.tmp", self.path / name)
        self._shard_names.append(name)
        self._pending, self._rows = {}, 0

    def close(self, meta: dict[str, Any] | None = None) -> int:
        """Flush the last shard and write this rank's index (the cache is readable from now on)."""
        self._flush()
        tensors = {"hash": torch.tensor(self._hashes, dtype=torch.int64),
                   "shard": torch.tensor(self._index_shard, dtype=torch.int32),
                   "row": torch.tensor(self._index_row, dtype=torch.int32)}
        name = f"index-r{self.rank:05d}.safetensors"
        save_file(tensors, str(self.path / f".{name}.tmp"), metadata={"shards": json.dumps(self._shard_names),
                                                                   "keys": json.dumps(list(self.keys))})
        respect_umask(self.path / f".{name}.tmp")
        os.replace(self.path / f".{name}.tmp", self.path / name)
        if meta is not None and self.rank == 0:
            (self.path / "cache.json").write_text(json.dumps({"version": 1, "created": time.time(), **meta},
                                                             indent=2, sort_keys=True) + "\n")
        return len(self._hashes)


def iter_source_prompts(cfg: Any) -> Iterable[str]:
    """Every good prompt of ``cfg``'s sources once, in file order, cleaned as the loader cleans them."""
    from dmdr.data.readers import Cleaner, read_split
    from dmdr.data.sources import Split, plan_source

    clean = Cleaner(cfg.max_prompt_chars, cfg.long_prompts)
    for spec in cfg.sources:
        plan = plan_source(spec, fmt=cfg.format, field=cfg.field, readers=1)
        for i, shard in enumerate(plan.shards):
            if shard.size:
                for _, prompt, _ in read_split(shard, Split(i, 0, -1), None, field=cfg.field, clean=clean):
                    if prompt is not None:
                        yield prompt


def cache_embeddings(cfg: Any, encoder: Any, out: str | os.PathLike, *, batch_size: int = 64,
                     shard_prompts: int = 1000, rank: int = 0, world: int = 1,
                     meta: dict[str, Any] | None = None,
                     progress: Callable[[int], None] | None = None) -> dict[str, int]:
    """Encode every distinct prompt of ``cfg.sources`` (a :class:`~dmdr.config.DataConfig`) into ``out``.

    Writer ``rank`` of ``world`` takes the prompts whose hash is ``rank`` modulo ``world``, so
    ``torchrun --nproc_per_node=N`` fills one cache with N encoders. Rank 0 writes the negative.

    Returns:
        ``{"prompts": distinct prompts written by this rank, "duplicates": repeats skipped}``.
    """
    writer = EmbeddingCacheWriter(out, rank=rank, shard_prompts=shard_prompts)
    if rank == 0:
        with torch.no_grad():
            writer.write_negative(encoder.negative())
    seen: set[int] = set()
    duplicates = 0
    batch: list[str] = []

    def flush() -> None:
        with torch.no_grad():
            writer.add(batch, encoder.encode(list(batch)))
        if progress is not None:
            progress(len(batch))
        batch.clear()

    for prompt in iter_source_prompts(cfg):
        h = prompt_hash(prompt)
        if h % world != rank:
            continue
        if h in seen:
            duplicates += 1
            continue
        seen.add(h)
        batch.append(prompt)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    info = {"max_prompt_chars": cfg.max_prompt_chars, "long_prompts": cfg.long_prompts,
            "sources": list(cfg.sources), "field": cfg.field, **(meta or {})}
    n = writer.close(info)
    return {"prompts": n, "duplicates": duplicates}
