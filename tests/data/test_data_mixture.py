"""A weighted mixture of sources: proportions within tolerance, per rank and overall; fsspec URLs."""

from __future__ import annotations

from collections import Counter

import fsspec
import pytest

from dmdr.config import DataConfig, TrainConfig, apply_overrides
from dmdr.data import build_prompt_loader
from dmdr.errors import ConfigError


def test_mixture_proportions_within_tolerance(tmp_path, write_jsonl, write_txt, write_parquet):
    cfg = DataConfig(sources=(write_jsonl(tmp_path / "a.jsonl", [f"a{i}" for i in range(300)]),
                              write_txt(tmp_path / "b.txt", [f"b{i}" for i in range(50)]),
                              write_parquet(tmp_path / "c.parquet", [f"c{i}" for i in range(120)]),
                              write_txt(tmp_path / "d.txt", [f"d{i}" for i in range(10)])),
                     weights=(6, 3, 1, 0), batch_size=8, num_workers=0, shuffle_buffer=32)
    n_batches = 300
    counts: Counter = Counter()
    for rank in range(2):
        it = iter(build_prompt_loader(cfg, dp_rank=rank, dp_world=2, seed=3))
        for _ in range(n_batches):
            counts.update(p[0] for p in next(it)["prompts"])
    total = sum(counts.values())
    assert total == 2 * n_batches * 8
    assert counts["d"] == 0  # weight 0: never drawn
    for source, weight in (("a", 0.6), ("b", 0.3), ("c", 0.1)):
        # 4800 draws: the binomial standard deviation is < 0.75 points; allow ~4 of them.
        assert abs(counts[source] / total - weight) < 0.03, (source, counts)


def test_fsspec_urls_and_memory_filesystem(write_jsonl):
    fs = fsspec.filesystem("memory")
    for i in range(3):
        with fs.open(f"/prompts/part-{i}.jsonl", "w") as f:
            f.write("".join(f'{{"prompt": "m{i}-{j}"}}\n' for j in range(20)))
    cfg = DataConfig(sources=("memory://prompts/part-*.jsonl",), batch_size=6, num_workers=0, shuffle_buffer=7)
    got = [p for b in build_prompt_loader(cfg, dp_rank=0, dp_world=1, seed=0, epochs=1) for p in b["prompts"]]
    assert sorted(got) == sorted(f"m{i}-{j}" for i in range(3) for j in range(20))
    fs.rm("/prompts", recursive=True)


def test_config_fields_validate():
    cfg = apply_overrides(TrainConfig(), ["--data.sources", "a.jsonl,b.txt", "--data.weights", "2,1",
                                          "--data.long_prompts", "skip", "--data.cache_miss", "skip"])
    assert cfg.data.weights == (2.0, 1.0)
    for bad in (["--data.weights", "-1,2", "--data.sources", "a,b"], ["--data.max_prompt_chars", "0"],
                ["--data.on_layout_change", "remap"], ["--data.prefetch_factor", "0"]):
        with pytest.raises(ConfigError):
            apply_overrides(TrainConfig(), bad)
