"""A resumed loader yields exactly what the uninterrupted one would have yielded next; layout changes."""

from __future__ import annotations

import io
import logging

import pytest
import torch

import dmdr.data.sources as sources
from dmdr.config import DataConfig
from dmdr.data import SkipMonitor, build_prompt_loader
from dmdr.errors import CheckpointError


def _batches(it, n):
    return [next(it) for _ in range(n)]


def _checkpoint_roundtrip(state):
    """What the trainer's checkpoint does to the state: save and load it (plain types, weights_only)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.fixture
def mixed_sources(tmp_path, monkeypatch, write_jsonl, write_parquet, write_txt):
    monkeypatch.setattr(sources, "MIN_SPLIT_BYTES", 128)
    a = [f"json prompt {i}" for i in range(150)]
    a[7] = "   "  # bad records are part of what must resume exactly (their counts too)
    (tmp_path / "bad.jsonl").write_bytes(b'{"prompt": "ok one"}\nnot json\n{"other": 1}\n\xff\xfe\n')
    return (write_jsonl(tmp_path / "a.jsonl", a), str(tmp_path / "bad.jsonl"),
            write_parquet(tmp_path / "b.parquet", [f"pq {i}" for i in range(90)], row_group_size=7),
            write_txt(tmp_path / "c.txt", [f"line {i}" for i in range(200)]))


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("cut", [0, 1, 13, 37])
def test_exact_resume_mid_epoch(mixed_sources, num_workers, cut):
    cfg = DataConfig(sources=mixed_sources, weights=(3, 1, 2, 2), batch_size=3, num_workers=num_workers,
                     shuffle_buffer=11, max_skip_rate=1.0)
    total = 60  # crosses blocks, splits and (for the small sources) epochs
    reference = _batches(iter(build_prompt_loader(cfg, dp_rank=1, dp_world=2, seed=5)), total)

    loader = build_prompt_loader(cfg, dp_rank=1, dp_world=2, seed=5)
    it = iter(loader)
    head = _batches(it, cut)
    state = _checkpoint_roundtrip(loader.state_dict())
    del it, loader

    resumed = build_prompt_loader(cfg, dp_rank=1, dp_world=2, seed=5)
    resumed.load_state_dict(state)
    tail = _batches(iter(resumed), total - cut)
    assert [b["prompts"] for b in head + tail] == [b["prompts"] for b in reference]
    # Skip counts are reported exactly once too: the monitor sums to the same totals.
    m1, m2 = SkipMonitor(1.0), SkipMonitor(1.0)
    for b in reference:
        m1.update(b)
    for b in head + tail:
        m2.update(b)
    assert m1.metrics() == m2.metrics()
    assert m1.metrics()["data/skipped"] > 0


def test_resume_twice_and_state_before_iterating(tmp_path, write_jsonl):
    cfg = DataConfig(sources=(write_jsonl(tmp_path / "a.jsonl", [f"p{i}" for i in range(50)]),), batch_size=4,
                     num_workers=0, shuffle_buffer=8)
    reference = [b["prompts"] for b in _batches(iter(build_prompt_loader(cfg, dp_rank=0, dp_world=1, seed=0)), 30)]
    loader = build_prompt_loader(cfg, dp_rank=0, dp_world=1, seed=0)
    state = loader.state_dict()  # before the first batch
    got = []
    for stop in (7, 19, 30):
        loader = build_prompt_loader(cfg, dp_rank=0, dp_world=1, seed=0)
        loader.load_state_dict(state)
        it = iter(loader)
        while len(got) < stop:
            got.append(next(it)["prompts"])
        state = loader.state_dict()
    assert got == reference


def test_state_of_another_rank_is_refused(tmp_path, write_jsonl):
    cfg = DataConfig(sources=(write_jsonl(tmp_path / "a.jsonl", [f"p{i}" for i in range(50)]),), num_workers=0)
    loader = build_prompt_loader(cfg, dp_rank=0, dp_world=2, seed=0)
    next(iter(loader))
    other = build_prompt_loader(cfg, dp_rank=1, dp_world=2, seed=0)
    with pytest.raises(CheckpointError, match="dp rank 0 given to dp rank 1"):
        other.load_state_dict(loader.state_dict())


def test_world_size_change_reshuffles_deterministically(tmp_path, write_jsonl, caplog):
    prompts = [f"p{i}" for i in range(400)]
    cfg = DataConfig(sources=(write_jsonl(tmp_path / "a.jsonl", prompts),), batch_size=4, num_workers=0,
                     shuffle_buffer=40)
    states = []
    for rank in range(2):
        loader = build_prompt_loader(cfg, dp_rank=rank, dp_world=2, seed=0)
        _batches(iter(loader), 10)
        states.append(loader.state_dict())

    def resume_on(world, rank, state):
        loader = build_prompt_loader(cfg, dp_rank=rank, dp_world=world, seed=0)
        loader.load_state_dict(state)
        return loader

    with caplog.at_level(logging.WARNING, logger="dmdr"):
        grown = [resume_on(3, r, states[r % 2]) for r in range(3)]
    assert "dp_world 2 -> 3" in caplog.text and "80 prompts consumed globally" in caplog.text
    # The same files re-cut for 3 readers are not "changed sources" (the message names only what changed).
    assert "sources" not in caplog.text and "splits" not in caplog.text
    # Every new rank derives the same fresh order whichever old state it got: one epoch of the new
    # layout, over all new ranks, covers each record exactly once.
    assert len({loader.dataset.order_seed for loader in grown}) == 1
    assert resume_on(3, 0, states[1]).dataset.order_seed == grown[0].dataset.order_seed
    first = [p for loader in grown for b in _batches(iter(loader), 5) for p in b["prompts"]]
    assert len(set(first)) == len(first)
    # After the change the new layout resumes exactly again.
    loader = resume_on(3, 2, states[0])
    it = iter(loader)
    _batches(it, 3)
    state = loader.state_dict()
    expected = [b["prompts"] for b in _batches(it, 5)]
    again = resume_on(3, 2, state)
    assert [b["prompts"] for b in _batches(iter(again), 5)] == expected

    strict = DataConfig(**{**cfg.__dict__, "on_layout_change": "error"})
    loader = build_prompt_loader(strict, dp_rank=0, dp_world=1, seed=0)
    with pytest.raises(CheckpointError, match="dp_world 2 -> 1"):
        loader.load_state_dict(states[0])
    with pytest.raises(CheckpointError, match=r"\(dp_world 2 -> 1\); an exact"):  # nothing else named
        loader.load_state_dict(states[0])
    # A checkpoint written before the files' own fingerprint was recorded: the re-cut is said as such.
    legacy = {**states[0], "dmdr_data": {k: v for k, v in states[0]["dmdr_data"].items() if k != "source_files"}}
    with pytest.raises(CheckpointError, match="prompt splits re-cut for the new number of readers"):
        loader.load_state_dict(legacy)
    # The same file copied to another folder (a branch run with its own prompt list) is said as such, not "changed".
    moved = tmp_path / "branch"
    moved.mkdir()
    write_jsonl(moved / "a.jsonl", prompts)
    branch = build_prompt_loader(DataConfig(**{**strict.__dict__, "sources": (str(moved / "a.jsonl"),)}),
                                 dp_rank=0, dp_world=2, seed=0)
    with pytest.raises(CheckpointError, match=r"\(prompt files read from a new location \(same names and sizes\)\)"):
        branch.load_state_dict(states[0])
    # Really changed files are named as such, at the same or another world size.
    write_jsonl(tmp_path / "a.jsonl", [*prompts, "one more"])
    for world in (1, 2):
        changed = build_prompt_loader(strict, dp_rank=0, dp_world=world, seed=0)
        with pytest.raises(CheckpointError, match=r"prompt sources changed \(files or sizes\)"):
            changed.load_state_dict(states[0])


def test_resharded_state_hook_sums_the_old_ranks(tmp_path, write_jsonl):
    cfg = DataConfig(sources=(write_jsonl(tmp_path / "a.jsonl", [f"p{i}" for i in range(300)]),), batch_size=2,
                     num_workers=0, shuffle_buffer=16)
    states = []
    for rank in range(2):
        loader = build_prompt_loader(cfg, dp_rank=rank, dp_world=2, seed=0)
        _batches(iter(loader), 6)
        states.append(_checkpoint_roundtrip(loader.state_dict()))
    shrunk = build_prompt_loader(cfg, dp_rank=0, dp_world=1, seed=0)
    shrunk.load_resharded_state(states)
    assert shrunk.samples_before == 24
    via_one = build_prompt_loader(cfg, dp_rank=0, dp_world=1, seed=0)
    via_one.load_state_dict(states[1])
    assert via_one.dataset.order_seed == shrunk.dataset.order_seed
    # Same data layout (only non-data ranks changed): the rank's own state, exactly.
    same = build_prompt_loader(cfg, dp_rank=1, dp_world=2, seed=0)
    same.load_resharded_state(states)
    reference = build_prompt_loader(cfg, dp_rank=1, dp_world=2, seed=0)
    reference.load_state_dict(states[1])
    assert [b["prompts"] for b in _batches(iter(same), 4)] == [b["prompts"] for b in _batches(iter(reference), 4)]
