"""Text-embedding cache: the round trip equals live encoding; the loader serves it; misses are handled."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dmdr.config import DataConfig
from dmdr.data import EmbeddingCache, EmbeddingCacheWriter, SkipMonitor, build_prompt_loader, cache_embeddings
from dmdr.errors import DataError

ROOT = Path(__file__).resolve().parents[2]


def _load_tool():
    from dmdr.cli import cache_text_embeddings

    return cache_text_embeddings


@pytest.fixture
def prompts():
    return [f"a {'very ' * (i % 5)}small photo of thing {i}" for i in range(37)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_cache_round_trip_equals_live_encoding(tmp_path, prompts, write_jsonl, fake_encoder_cls, num_workers):
    source = write_jsonl(tmp_path / "p.jsonl", prompts + prompts[:5])  # duplicates are encoded once
    encoder = fake_encoder_cls()
    tool = _load_tool()
    out = tmp_path / "cache"
    status = tool.main(["--data.sources", source, "--data.embedding_cache", str(out), "--batch-size", "8",
                        "--shard-prompts", "10", "--device", "cpu"], encoder=encoder)
    assert status == 0
    cache = EmbeddingCache(out)
    assert len(cache) == len(prompts) and len(cache.shard_files) == 4
    for key, value in cache.negative().items():
        assert torch.equal(value, encoder.negative()[key])

    cfg = DataConfig(sources=(source,), batch_size=4, num_workers=num_workers, shuffle_buffer=6)
    loader = build_prompt_loader(cfg, dp_rank=0, dp_world=1, seed=0, embedding_cache=cache)
    it = iter(loader)
    for _ in range(12):
        batch = next(it)
        live = encoder.encode(batch["prompts"])
        assert batch["cond"].keys() == live.keys()
        for key in live:
            assert torch.equal(batch["cond"][key], live[key]), key


def test_variable_length_rows_are_padded(tmp_path, prompts, fake_encoder_cls):
    encoder = fake_encoder_cls(variable=True)
    writer = EmbeddingCacheWriter(tmp_path / "c", shard_prompts=16)
    writer.write_negative(encoder.negative())
    for i in range(0, len(prompts), 5):
        writer.add(prompts[i:i + 5], encoder.encode(prompts[i:i + 5]))
    writer.close()
    cache = EmbeddingCache(tmp_path / "c")
    batch = [prompts[3], prompts[0], prompts[14]]
    got, live = cache.lookup(batch), encoder.encode(batch)
    n = live["prompt_embeds"].shape[1]
    assert torch.equal(got["pooled_prompt_embeds"], live["pooled_prompt_embeds"])
    assert torch.equal(got["prompt_embeds"][:, :n] * live["attention_mask"][..., None], live["prompt_embeds"])
    assert torch.equal(got["attention_mask"][:, :n], live["attention_mask"])
    assert not got["attention_mask"][:, n:].any()
    assert cache.lookup(batch + ["never cached"]) is None


def test_cache_misses_follow_the_policy(tmp_path, prompts, write_jsonl, fake_encoder_cls):
    encoder = fake_encoder_cls()
    cached = write_jsonl(tmp_path / "cached.jsonl", prompts)
    cache_embeddings(DataConfig(sources=(cached,)), encoder, tmp_path / "c")
    cache = EmbeddingCache(tmp_path / "c")
    extra = write_jsonl(tmp_path / "extra.jsonl", [f"uncached {i}" for i in range(20)])
    sources = (cached, extra)

    def first_batches(policy, n=15):
        cfg = DataConfig(sources=sources, batch_size=4, num_workers=0, cache_miss=policy, shuffle_buffer=8)
        it = iter(build_prompt_loader(cfg, dp_rank=0, dp_world=1, seed=0, embedding_cache=cache))
        return [next(it) for _ in range(n)]

    with pytest.raises(DataError, match="is not in the embedding cache"):
        first_batches("error")
    skipped = first_batches("skip")
    assert all("cond" in b and not any(p.startswith("uncached") for p in b["prompts"]) for b in skipped)
    monitor = SkipMonitor(1.0)
    for b in skipped:
        monitor.update(b)
    assert monitor.metrics()["data/skipped/uncached"] > 0
    encoded = first_batches("encode")
    assert any("cond" not in b for b in encoded) and any("cond" in b for b in encoded)


def test_incomplete_cache_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        EmbeddingCache(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    with pytest.raises(DataError, match="no index"):
        EmbeddingCache(tmp_path / "half")


def test_tool_reports_user_errors_in_one_line(tmp_path, capsys, fake_encoder_cls):
    tool = _load_tool()
    assert tool.main(["--data.sources", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "c")],
                     encoder=fake_encoder_cls()) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.txt" in err and err.count("\n") == 1


def test_tool_refuses_to_mix_with_an_existing_cache(tmp_path, write_txt, fake_encoder_cls):
    tool = _load_tool()
    out = tmp_path / "c"
    first = ["--data.sources", write_txt(tmp_path / "a.txt", ["one", "two"]), "--out", str(out)]
    assert tool.main(first, encoder=fake_encoder_cls()) == 0
    second = ["--data.sources", write_txt(tmp_path / "b.txt", ["three"]), "--out", str(out)]
    assert tool.main(second, encoder=fake_encoder_cls()) == 2
    assert tool.main([*second, "--overwrite"], encoder=fake_encoder_cls()) == 0
    cache = EmbeddingCache(out)
    assert len(cache) == 1 and cache.contains("three") and not cache.contains("one")


@pytest.mark.slow
def test_tool_with_a_real_tiny_model_matches_its_text_encoder(tmp_path, write_txt):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from dmdr.models import build_tiny_sd3, load_backbone

    model = build_tiny_sd3(tmp_path / "tiny_sd3")
    prompts = ["a cat", "a red car in the rain", "an astronaut riding a horse"] + [f"thing {i}" for i in range(9)]
    source = write_txt(tmp_path / "p.txt", prompts)
    argv = ["--model.path", str(model), "--model.dtype", "fp32", "--model.max_sequence_length", "16",
            "--data.sources", source, "--data.embedding_cache", str(tmp_path / "c"), "--batch-size", "5",
            "--device", "cpu"]
    assert _load_tool().main(argv) == 0
    cache = EmbeddingCache(tmp_path / "c")
    encoder = load_backbone(model, dtype=torch.float32, max_sequence_length=16).text_encoder
    batch = [prompts[4], prompts[0], prompts[10]]
    live, got = encoder.encode(batch), cache.lookup(batch)
    assert got.keys() == live.keys()
    for key in live:  # encoded in other batches: equal up to batch-dependent float rounding
        torch.testing.assert_close(got[key], live[key], rtol=1e-5, atol=1e-5)
    for key, value in encoder.negative().items():
        torch.testing.assert_close(cache.negative()[key], value, rtol=1e-5, atol=1e-5)
