"""Tiny prompt files for the data tests (writers as fixtures, so no test imports a sibling module)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

from dmdr.data.cache import prompt_hash


def _write_jsonl(path: Path, prompts: Sequence[str], field: str = "prompt") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps({field: p, "id": 0}) + "\n")
    return str(path)


def _write_txt(path: Path, prompts: Sequence[str]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
    return str(path)


def _write_parquet(path: Path, prompts: Sequence[str | None], field: str = "prompt", row_group_size: int = 64) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({field: pa.array(list(prompts), type=pa.string()), "n": list(range(len(prompts)))})
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)


@pytest.fixture
def write_jsonl() -> Callable[..., str]:
    return _write_jsonl


@pytest.fixture
def write_txt() -> Callable[..., str]:
    return _write_txt


@pytest.fixture
def write_parquet() -> Callable[..., str]:
    return _write_parquet


class FakeTextEncoder:
    """Deterministic stand-in for a family's text encoder: each prompt's rows depend on the prompt only.

    ``variable=True`` gives each prompt its own length (words, capped) and pads the batch to its longest,
    with an attention mask, like a variable-length encoder (Qwen3); otherwise every row has ``max_len``
    tokens (like SD3's padded T5).
    """

    def __init__(self, dim: int = 8, max_len: int = 6, variable: bool = False):
        self.dim, self.max_len, self.variable = dim, max_len, variable
        self.calls = 0

    def _row(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(prompt_hash(prompt) % (2**31))
        n = max(1, min(len(prompt.split()), self.max_len)) if self.variable else self.max_len
        return torch.randn(n, self.dim, generator=g), torch.randn(2 * self.dim, generator=g)

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        self.calls += 1
        rows = [self._row(p) for p in prompts]
        length = max(r[0].shape[0] for r in rows)
        embeds = torch.zeros(len(prompts), length, self.dim)
        mask = torch.zeros(len(prompts), length, dtype=torch.long)
        for i, (e, _) in enumerate(rows):
            embeds[i, : e.shape[0]] = e
            mask[i, : e.shape[0]] = 1
        out = {"prompt_embeds": embeds, "pooled_prompt_embeds": torch.stack([r[1] for r in rows])}
        if self.variable:
            out["attention_mask"] = mask
        return out

    def negative(self) -> dict[str, torch.Tensor]:
        return self.encode([""])


@pytest.fixture
def fake_encoder_cls() -> type[FakeTextEncoder]:
    return FakeTextEncoder
