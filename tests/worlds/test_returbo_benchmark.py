"""Re-turbo's shapes-world benchmark: the style and its checker on exact renders, the step-reached rule, and the quick
run end to end (a few steps of everything)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dmdr.worlds.shapes.scene import parse_prompt, render_batch
from dmdr.worlds.shapes.style import style_scores, styled_prompt, styled_scene

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a yellow circle"]


def _benchmark():
    spec = importlib.util.spec_from_file_location("returbo_benchmark", REPO / "benchmarks" / "returbo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checker_scores_styled_renders_one_and_plain_renders_zero():
    g = torch.Generator().manual_seed(0)
    scenes = [parse_prompt(p) for p in PROMPTS]
    styled = style_scores(render_batch([styled_scene(s) for s in scenes], g), PROMPTS)
    plain = style_scores(render_batch(scenes, g), PROMPTS)
    assert styled["style"] == 1.0 and styled["style_shapeeval"] == 1.0
    assert plain["style"] == 0.0
    assert styled_prompt("a green triangle left of a yellow circle") == "a cyan triangle left of a green circle"


def test_reach_is_the_first_step_at_or_above_every_target():
    reach = _benchmark()._reach
    curve = {10: {"style": 0.5, "style_shapeeval": 0.3, "train_s": 4.0},
             20: {"style": 0.9, "style_shapeeval": 0.2, "train_s": 8.0},
             30: {"style": 0.9, "style_shapeeval": 0.31, "train_s": 12.0}}
    assert reach(curve, {"style": 0.8, "style_shapeeval": 0.3}) == (30, 12.0)
    assert reach(curve, {"style": 0.95, "style_shapeeval": 0.0}) is None


@pytest.mark.slow
@pytest.mark.timeout(1800)  # three recipe launches and their scoring; minutes on busy cores
def test_quick_run_writes_the_table(tmp_path):
    out = tmp_path / "rt"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "returbo.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "returbo.json").read_text())
    assert set(result["arms"]) == {"scratch", "re-turbo"}
    assert len(result["reference"]) == 3 and 0.0 <= result["reference"][0]["style"] <= 1.0
    assert "| re-turbo | 0 |" in (out / "returbo.md").read_text()
    assert json.loads((out / "re-turbo-seed0" / "config.json").read_text())["model"]["init_generator"]
