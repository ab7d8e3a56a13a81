"""Stage batch sizes: the loader serves gcd-sized batches that an iteration merges into its stage's batch."""

from __future__ import annotations

import pytest
import torch

from dmdr.config import DataConfig
from dmdr.data import build_prompt_loader, loader_batch_size, merge_batches


@pytest.mark.parametrize("cold,rl,chunk", [(4, 0, 4), (4, 2, 2), (8, 4, 4), (6, 4, 2), (3, 5, 1), (2, 4, 2)])
def test_loader_batch_size_divides_both_stages(cold, rl, chunk):
    cfg = DataConfig(batch_size=cold, rl_batch_size=rl)
    assert loader_batch_size(cfg) == chunk
    assert cold % chunk == 0 and (rl or cold) % chunk == 0


def test_merge_concatenates_in_order_and_sums_counts():
    a = {"prompts": ["a", "b"], "read": 3, "truncated": 1, "skipped": {"empty": 1},
         "cond": {"emb": torch.zeros(2, 3, 4), "pooled": torch.zeros(2, 5)}}
    b = {"prompts": ["c", "d"], "read": 2, "truncated": 0, "skipped": {"empty": 2, "bad_json": 1},
         "cond": {"emb": torch.ones(2, 3, 4), "pooled": torch.ones(2, 5)}}
    m = merge_batches([a, b])
    assert m["prompts"] == ["a", "b", "c", "d"]
    assert (m["read"], m["truncated"], m["skipped"]) == (5, 1, {"empty": 3, "bad_json": 1})
    assert m["cond"]["emb"].shape == (4, 3, 4) and m["cond"]["pooled"].shape == (4, 5)
    assert torch.equal(m["cond"]["emb"], torch.cat([torch.zeros(2, 3, 4), torch.ones(2, 3, 4)]))
    assert merge_batches([a]) is a


def test_loader_serves_gcd_batches_and_the_stream_is_unchanged(tmp_path, write_txt):
    src = write_txt(tmp_path / "p.txt", [f"prompt {i}" for i in range(30)])
    base = dict(sources=(src,), num_workers=0, shuffle_buffer=8)
    two_stage = build_prompt_loader(DataConfig(batch_size=4, rl_batch_size=2, **base), dp_rank=0, dp_world=1, seed=3)
    single = build_prompt_loader(DataConfig(batch_size=2, **base), dp_rank=0, dp_world=1, seed=3)
    got = [b["prompts"] for _, b in zip(range(10), two_stage)]
    assert all(len(p) == 2 for p in got)
    assert got == [b["prompts"] for _, b in zip(range(10), single)]
