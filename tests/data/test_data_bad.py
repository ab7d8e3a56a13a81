"""Bad data: skipped (or truncated) and counted by reason; unreadable shards named; too much garbage stops."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest

import dmdr.data.readers as readers
from dmdr.config import DataConfig
from dmdr.data import SkipMonitor, build_prompt_loader
from dmdr.errors import DataError


def _one_epoch(cfg: DataConfig) -> tuple[list[str], Counter, int, int]:
    prompts, skipped, read, truncated = [], Counter(), 0, 0
    for batch in build_prompt_loader(cfg, dp_rank=0, dp_world=1, seed=0, epochs=1):
        prompts += batch["prompts"]
        skipped.update(batch["skipped"])
        read += batch["read"]
        truncated += batch["truncated"]
    return prompts, skipped, read, truncated


def test_jsonl_bad_lines_by_reason(tmp_path):
    long = "word " * 100
    lines = [
        json.dumps({"prompt": "a good one"}).encode(),
        b'{"prompt": "caf\xe9 latin-1"}',  # not UTF-8
        b'{"prompt": "unterminated',  # invalid JSON
        b"[1, 2, 3]",  # JSON, but not an object
        json.dumps({"caption": "wrong field"}).encode(),
        json.dumps({"prompt": None}).encode(),
        json.dumps({"prompt": 42}).encode(),
        json.dumps({"prompt": ""}).encode(),
        json.dumps({"prompt": " \t "}).encode(),
        b"",  # blank line
        json.dumps({"prompt": long}).encode(),
        "\ufeff".encode() + json.dumps({"prompt": "bom and \u00e9t\u00e9"}).encode(),
        json.dumps({"prompt": "  padded  "}).encode(),
        json.dumps({"meta": {"prompt": "nested"}}).encode(),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines))  # no newline at the end of the last line
    cfg = DataConfig(sources=(str(path),), batch_size=2, num_workers=0, max_prompt_chars=40)
    prompts, skipped, read, truncated = _one_epoch(cfg)
    assert sorted(prompts) == sorted(["a good one", long[:40].rstrip(), "bom and \u00e9t\u00e9", "padded"])
    assert skipped == Counter(bad_utf8=1, bad_json=2, missing_field=3, bad_field=1, empty=3)
    assert (read, truncated) == (4, 1)

    nested = DataConfig(sources=(str(path),), batch_size=1, num_workers=0, field="meta.prompt")
    assert _one_epoch(nested)[0] == ["nested"]


def test_txt_and_parquet_bad_records(tmp_path, write_parquet):
    txt = tmp_path / "p.txt"
    txt.write_bytes(b"fine\r\n\xff\xfe broken\n   \n\nalso fine\n" + b"y" * 80 + b"\n")
    cfg = DataConfig(sources=(str(txt),), batch_size=1, num_workers=0, max_prompt_chars=50,
                     long_prompts="skip")
    prompts, skipped, _, _ = _one_epoch(cfg)
    assert sorted(prompts) == ["also fine", "fine"]
    assert skipped == Counter(bad_utf8=1, empty=2, too_long=1)

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": pa.array([b"ok", b"\xff bad", None, b"  ", b"fine too"], type=pa.binary())})
    pq.write_table(table, tmp_path / "b.parquet", row_group_size=2)
    cfg = DataConfig(sources=(str(tmp_path / "b.parquet"),), field="text", batch_size=2, num_workers=0)
    prompts, skipped, _, _ = _one_epoch(cfg)
    assert sorted(prompts) == ["fine too", "ok"]
    assert skipped == Counter(bad_utf8=1, missing_field=1, empty=1)


def test_oversized_line_is_skipped_without_losing_the_next(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "MAX_RECORD_BYTES", 64)
    path = tmp_path / "p.txt"
    path.write_bytes(b"before\n" + b"z" * 1000 + b"\nafter\n" + b"q" * 300)  # the last one has no newline
    cfg = DataConfig(sources=(str(path),), batch_size=1, num_workers=0)
    prompts, skipped, _, _ = _one_epoch(cfg)
    assert sorted(prompts) == ["after", "before"]
    assert skipped == Counter(too_long=2)


@pytest.mark.parametrize("case", ["missing", "glob", "empty_dir", "corrupt_parquet", "no_column", "unknown_ext",
                                  "empty_file", "mixed"])
def test_bad_sources_fail_at_build_naming_the_path(case, tmp_path, write_parquet, write_txt):
    if case == "missing":
        spec, match = str(tmp_path / "nope.jsonl"), "nope.jsonl' does not exist"
    elif case == "glob":
        spec, match = str(tmp_path / "*.parquet"), r"\*.parquet' matches no files"
    elif case == "empty_dir":
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "README.md").write_text("x")
        spec, match = str(tmp_path / "d"), "folder without"
    elif case == "corrupt_parquet":
        (tmp_path / "x.parquet").write_bytes(b"PAR1 this is not parquet")
        spec, match = str(tmp_path / "x.parquet"), "cannot read data shard .*x.parquet"
    elif case == "no_column":
        spec = write_parquet(tmp_path / "y.parquet", ["a"], field="caption")
        match = "y.parquet has no column 'prompt' .*caption"
    elif case == "unknown_ext":
        (tmp_path / "prompts.csv").write_text("a\n")
        spec, match = str(tmp_path / "prompts.csv"), "prompts.csv.*--data.format"
    elif case == "empty_file":
        (tmp_path / "e.txt").write_text("")
        spec, match = str(tmp_path / "e.txt"), "e.txt' is empty"
    else:
        write_txt(tmp_path / "m" / "a.txt", ["a"])
        write_parquet(tmp_path / "m" / "b.parquet", ["b"])
        spec, match = str(tmp_path / "m"), "mixes Parquet and text"
    cfg = DataConfig(sources=(spec,), num_workers=0)
    with pytest.raises(DataError, match=match) as info:
        build_prompt_loader(cfg, dp_rank=0, dp_world=1, seed=0)
    assert "\n" not in str(info.value)


def test_no_sources_is_a_clear_error():
    with pytest.raises(DataError, match="--data.sources"):
        build_prompt_loader(DataConfig(), dp_rank=0, dp_world=1, seed=0)


def test_shard_vanishing_mid_run_is_named_in_one_line(tmp_path, write_txt):
    paths = [write_txt(tmp_path / f"s{i}.txt", [f"s{i} p{j}" for j in range(40)]) for i in range(3)]
    cfg = DataConfig(sources=(str(tmp_path / "s*.txt"),), batch_size=4, num_workers=2, shuffle_buffer=5)
    loader = build_prompt_loader(cfg, dp_rank=0, dp_world=1, seed=0)
    os.remove(paths[1])
    with pytest.raises(DataError, match=r"cannot read data shard .*s1\.txt") as info:
        for _ in loader:
            pass
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value)


def test_an_all_garbage_source_stops_instead_of_spinning(tmp_path):
    (tmp_path / "g.jsonl").write_bytes(b"garbage\n" * 50)
    cfg = DataConfig(sources=(str(tmp_path / "g.jsonl"),), batch_size=2, num_workers=0)
    with pytest.raises(DataError, match="no valid prompt in a whole epoch"):
        next(iter(build_prompt_loader(cfg, dp_rank=0, dp_world=1, seed=0)))


def test_skip_rate_above_threshold_stops_with_one_line(tmp_path):
    lines = [json.dumps({"prompt": f"p{i}"}) if i % 4 else "{broken" for i in range(400)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    cfg = DataConfig(sources=(str(tmp_path / "a.jsonl"),), batch_size=4, num_workers=0, shuffle_buffer=10,
                     max_skip_rate=0.2, skip_check_after=100)
    monitor = SkipMonitor.from_config(cfg)
    it = iter(build_prompt_loader(cfg, dp_rank=0, dp_world=1, seed=0))
    with pytest.raises(DataError, match=r"2\d\.\d% of prompt records were skipped .*bad_json .*max_skip_rate 0.2"):
        for _ in range(100):
            monitor.update(next(it))
    assert monitor.seen >= 100
    # Under the threshold it runs on, and reports the counts.
    lenient = SkipMonitor(0.3, 100)
    for _ in range(100):
        lenient.update(next(it))
    m = lenient.metrics()
    assert m["data/skipped"] == m["data/skipped/bad_json"] > 0
    assert m["data/seen"] == lenient.read + m["data/skipped"]
    assert abs(m["data/skip_rate"] - 0.25) < 0.05


def test_monitor_waits_for_min_records_and_round_trips_its_state():
    monitor = SkipMonitor(0.1, min_records=50)
    monitor.update({"prompts": ["a"], "skipped": {"bad_json": 3}, "read": 1, "truncated": 0})  # 75%, too early
    restored = SkipMonitor(0.1, min_records=50)
    restored.load_state_dict(monitor.state_dict())
    assert restored.metrics() == monitor.metrics()
    with pytest.raises(DataError):
        restored.update({"prompts": ["a"] * 4, "skipped": {"empty": 5}, "read": 45, "truncated": 2})
