"""tools/plan.py end to end on the shipped configs, its advice, and its one-line errors (issue 14)."""

from __future__ import annotations

import json

import pytest

from dmdr.cli import plan as plan_tool
from dmdr.gpus import GPUS


@pytest.fixture(scope="module")
def plan_main():
    return plan_tool.main


def _json(plan_main, capsys, *argv: str) -> dict:
    assert plan_main([*argv, "--json", "-"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_sd3m_plan_fits_and_counts_every_part(plan_main, capsys):
    data = _json(plan_main, capsys, "--recipe", "sd3m_dmdr", "--rl.rewards", "hps,clip,pickscore",
                 "--rl.weights", "0.3,0.3,0.3")
    assert data["world_size"] == 8 and data["dp_shard"] == 8 and data["gpu"] == "h100-80"
    cold, rl = data["stages"]
    assert (cold["batch_per_gpu"], rl["batch_per_gpu"]) == (8, 4)
    assert cold["generator_steps"] + rl["generator_steps"] == 4000
    # Three ViT-H-14 reward models in fp32 (~1B parameters each) are on every GPU for the whole run.
    rewards = cold["memory_bytes"]["reward models (fp32)"]
    assert 3 * 3.5e9 < rewards < 3 * 4.5e9
    assert "ReFL: VAE decode + rewards, fwd+bwd" in rl["flops_per_generator_step"]
    assert data["fits"] is True and data["advice"]["overrides"] == {}
    assert cold["seconds_per_generator_step"] > 0 and data["run_seconds"] > 0


@pytest.mark.slow
def test_advice_makes_a_plan_fit(plan_main, capsys):
    argv = ["--recipe", "sd35_dmdr", "--gpu", "a100-40", "--parallel.activation_checkpointing", "none"]
    data = _json(plan_main, capsys, *argv)
    assert data["fits"] is False
    fix = data["advice"]["overrides"]
    assert fix and data["advice"]["fits"]
    flags = [x for k, v in fix.items() for x in (f"--{k}", v) if "embedding_cache" not in k]
    if "data.embedding_cache" in fix:
        flags += ["--data.embedding_cache", "/cache"]
    fixed = _json(plan_main, capsys, *argv, *flags)
    assert fixed["fits"] is True


@pytest.mark.parametrize("argv, needle", [
    (["--recipe", "sd99_dmdr"], "sd35_dmdr"),
    (["--recipe", "sd35_dmdr", "--gpu", "v100"], ", ".join(GPUS)),
    (["--recipe", "sd35_dmdr", "--parallel.dp_shrad", "8"], "--parallel.dp_shard"),
])
def test_bad_input_is_one_line(plan_main, capsys, argv, needle):
    assert plan_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and needle in err
