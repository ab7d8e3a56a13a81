"""``--profile.*``: a torch profiler trace of generator steps N..M, on CPU, readable as Chrome trace JSON."""

from __future__ import annotations

import json

import pytest
import torch

from dmdr.config import TrainConfig, validate
from dmdr.errors import ConfigError
from dmdr.profiling import STEP_RANGE, StepProfiler


def _cfg(tmp_path, start: int, end: int) -> TrainConfig:
    cfg = TrainConfig()
    cfg.train.output_dir = str(tmp_path)
    cfg.profile.enabled, cfg.profile.start_step, cfg.profile.end_step = True, start, end
    return cfg


def _loop(profiler: StepProfiler, steps: int, ratio: int) -> None:
    """The trainer's loop shape: ``ratio`` iterations per generator step, some work in each."""
    state = {"step": 0, "iteration": 0}
    x = torch.randn(64, 64)
    while state["step"] < steps:
        with profiler.iteration(state["step"], lambda: state["step"]):
            for _ in range(3):
                x = torch.tanh(x @ x.T / 64)
            state["iteration"] += 1
            if state["iteration"] % ratio == 0:
                state["step"] += 1
    profiler.close()


def _traced_steps(path) -> set[int]:
    events = json.loads(path.read_text())["traceEvents"]
    return {int(e["name"].split()[-1]) for e in events if str(e.get("name", "")).startswith(STEP_RANGE)}


def test_the_trace_holds_exactly_the_window(tmp_path):
    profiler = StepProfiler(_cfg(tmp_path, 2, 3), rank=0, device=torch.device("cpu"))
    _loop(profiler, steps=6, ratio=2)
    path = tmp_path / "profile" / "rank0.steps2-3.pt.trace.json"
    assert profiler.trace_path == path and path.is_file()
    assert _traced_steps(path) == {2, 3}
    events = json.loads(path.read_text())["traceEvents"]
    assert sum(1 for e in events if e.get("name") == f"{STEP_RANGE} 2") == 2  # both iterations of step 2
    assert any(e.get("name") == "aten::mm" for e in events)  # the ops themselves are in it


def test_a_run_that_stops_inside_the_window_still_writes_it(tmp_path):
    profiler = StepProfiler(_cfg(tmp_path, 1, 10), rank=1, device=torch.device("cpu"))
    _loop(profiler, steps=3, ratio=1)
    assert _traced_steps(tmp_path / "profile" / "rank1.steps1-10.pt.trace.json") == {1, 2}


def test_off_writes_nothing(tmp_path):
    cfg = _cfg(tmp_path, 0, 1)
    cfg.profile.enabled = False
    _loop(StepProfiler(cfg, rank=0, device=torch.device("cpu")), steps=3, ratio=1)
    assert not (tmp_path / "profile").exists()


def test_a_bad_window_and_timeout_are_one_line_each(tmp_path):
    cfg = _cfg(tmp_path, 5, 2)
    with pytest.raises(ConfigError, match="profile.end_step: the window 5..2"):
        validate(cfg)
    cfg = TrainConfig()
    cfg.parallel.timeout_s = 0
    with pytest.raises(ConfigError, match="parallel.timeout_s: must be >= 1"):
        validate(cfg)


def test_the_collective_timeout_reaches_init_process_group(tmp_path, monkeypatch):
    import datetime

    import dmdr.build

    seen = {}

    class Stop(Exception):
        pass

    def fake_init(device="auto", backend=None, timeout=None):
        seen["timeout"] = timeout
        raise Stop

    monkeypatch.setattr(dmdr.build, "init_distributed", fake_init)
    cfg = TrainConfig()
    cfg.parallel.timeout_s = 5400
    with pytest.raises(Stop):
        dmdr.build.build_run(cfg)
    assert seen["timeout"] == datetime.timedelta(seconds=5400)
