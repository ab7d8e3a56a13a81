"""The text-embedding cache's files follow the umask (group-readable on a shared cluster folder), as the exports do,
not safetensors' private 0600."""

from __future__ import annotations

import os

from dmdr.data import EmbeddingCache, EmbeddingCacheWriter


def test_cache_files_follow_the_umask_not_safetensors_0600(tmp_path, fake_encoder_cls):
    import dmdr.permissions as perms

    prompts = [f"prompt number {i}" for i in range(12)]
    encoder = fake_encoder_cls()
    old = os.umask(0o027)  # group may read, others nothing: 0640 files
    perms._umask = None
    try:
        writer = EmbeddingCacheWriter(tmp_path / "c", shard_prompts=8)
        writer.write_negative(encoder.negative())
        writer.add(prompts, encoder.encode(prompts))  # one full shard, one flushed at close
        writer.close(meta={"model": "fake"})
    finally:
        os.umask(old)
        perms._umask = None
    files = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert files == ["cache.json", "index-r00000.safetensors", "negative.safetensors",
                     "shard-r00000-00000.safetensors", "shard-r00000-00001.safetensors"]
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "c").iterdir()} == dict.fromkeys(files, 0o640)
    assert EmbeddingCache(tmp_path / "c").lookup(prompts[:3]) is not None  # still a readable cache
