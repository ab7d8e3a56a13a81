"""Operating a run (issue 29) through the real trainer on the tiny SD3 pipeline: gradient accumulation, the
profiler window, the plain log line without a terminal; every shipped recipe with every RL branch."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from dmdr.config import grpo_group_size, validate
from dmdr.launch import run
from dmdr.losses.rl import METHODS
from dmdr.recipes import RECIPES
from tests.tiny_helpers import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_accumulated_profiled_run_without_a_terminal(tiny_assets, tmp_path, caplog):
    """grad_accum 2 through the RL switch (batch 4 -> micro 2, RL batch 2 -> micro 1, ReFL), steps 1..2 traced."""
    out = tmp_path / "run"
    cfg = tiny_config(tiny_assets, out, train__max_steps=3, dmd__ratio=1, rl__start_step=2, checkpoint__interval=0,
                      train__grad_accum=2, profile__enabled="true", profile__start_step=1, profile__end_step=2,
                      log__progress_bar="true")  # pytest's stderr is no terminal: the bar stays off
    with caplog.at_level(logging.INFO, logger="dmdr"):
        assert run(cfg) == 0
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and "loss/rl" in rows[-1]
    assert all(r["train/skipped_steps"] == 0 for r in rows)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split(" |")[0] for line in lines] == ["step 1/3 (33.3%)", "step 2/3 (66.7%)", "step 3/3 (100.0%)"]
    trace = out / "profile" / "rank0.steps1-2.pt.trace.json"
    events = json.loads(trace.read_text())["traceEvents"]
    assert {e["name"] for e in events if str(e.get("name", "")).startswith("dmdr/step")} == {"dmdr/step 1",
                                                                                           "dmdr/step 2"}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("method", METHODS)
def test_every_recipe_takes_every_rl_method_with_its_defaults(recipe, method):
    cfg = RECIPES[recipe].config()
    cfg.rl.method = method
    validate(cfg)  # the preflight's value checks: one line per problem, none expected
    if method == "grpo":
        assert grpo_group_size(cfg) >= 2


def test_tiny_grpo_passes_the_whole_preflight(tmp_path, capsys):
    from dmdr.recipes import run as run_recipe

    assert run_recipe("tiny_dmdr", ["--rl.method", "grpo", "--train.output_dir", str(tmp_path), "--dry-run"]) == 0
    assert "error" not in capsys.readouterr().err
