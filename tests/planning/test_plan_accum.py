"""The planner advises gradient accumulation (the recipe's batch and update kept) before a smaller batch."""

from __future__ import annotations

import pytest

from dmdr.config import TrainConfig
from dmdr.planning.advise import accumulation_that_fits


def test_the_smallest_accumulation_that_fits_and_divides_both_stages():
    cfg = TrainConfig()
    cfg.data.batch_size, cfg.data.rl_batch_size = 8, 4
    assert accumulation_that_fits(cfg, [8, 4]) == 1
    assert accumulation_that_fits(cfg, [3, 4]) == 4  # 8 / 4 = 2 <= 3 (3 does not divide 8)
    assert accumulation_that_fits(cfg, [8, 1]) == 4
    assert accumulation_that_fits(cfg, [0, 4]) == 0  # not even one sample fits
    cfg.rl.method, cfg.rl.grpo_group_size = "grpo", 2
    assert accumulation_that_fits(cfg, [8, 1]) == 0  # a GRPO group of 2 must stay in one micro-batch


@pytest.mark.slow
def test_sd35_on_a100_40_is_advised_to_accumulate_not_to_shrink(capsys):
    import json

    from dmdr.cli import plan as plan_tool

    assert plan_tool.main(["--recipe", "sd35_dmdr", "--gpu", "a100-40", "--json", "-"]) == 0  # JSON: the verdict inside
    data = json.loads(capsys.readouterr().out)
    assert not data["fits"]  # the recipe as it is does not fit an A100-40
    fix = data["advice"]["overrides"]
    assert data["advice"]["fits"] and int(fix["train.grad_accum"]) >= 2
    assert "data.batch_size" not in fix and "data.rl_batch_size" not in fix
    assert "parallel.cpu_offload_teacher" not in fix  # accumulation costs less than streaming the teacher
