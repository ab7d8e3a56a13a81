"""The RL branches through the real trainer on the tiny SD3 pipeline (one process): a reward that turns
non-finite skips the step through the trainer's non-finite path and counts it; DPO's reference is the
generator at the RL start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dmdr.launch import run
from tests.tiny_helpers import tiny_config

pytestmark = pytest.mark.slow


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method,extra", [("dpo", {"rl__dpo_k": 2}), ("grpo", {"rl__grpo_group_size": 2})])
def test_non_finite_reward_skips_and_counts_the_step(tiny_assets, tmp_path, monkeypatch, method, extra):
    from dmdr.rewards.analytic import BrightnessReward

    real = BrightnessReward.__call__
    calls = {"n": 0}

    def flaky(self, images, prompts=None):
        calls["n"] += 1
        scores = real(self, images, prompts)
        return scores * float("nan") if calls["n"] == 2 else scores  # the second RL step's scores

    monkeypatch.setattr(BrightnessReward, "__call__", flaky)
    out = tmp_path / "run"
    cfg = tiny_config(tiny_assets, out, rl__method=method, rl__start_step=1, train__max_steps=4, dmd__ratio=1,
                      checkpoint__interval=0, data__rl_batch_size=2, **extra)
    assert run(cfg) == 0
    skipped = [r["train/skipped_steps"] for r in _metrics(out)]
    assert skipped == [0, 0, 1, 1], skipped  # generator step 3 (the second with RL) skipped, then training goes on


def test_dpo_reference_is_the_generator_at_the_rl_start(tiny_assets, tmp_path):
    from dmdr.build import build_run

    cfg = tiny_config(tiny_assets, tmp_path / "run", rl__method="dpo", rl__dpo_k=2, rl__start_step=2,
                      dmd__ratio=1, data__rl_batch_size=2)
    session = build_run(cfg)
    try:
        trainer = session.trainer
        for _ in range(2):
            trainer.train_iteration()
        at_start = [p.detach().clone() for p in trainer.roles.generator_params]
        reference = trainer.engine.reference
        assert not reference.taken
        trainer.train_iteration()  # the first RL step takes the snapshot before it updates
        assert reference.taken
        assert all(torch.equal(v, p) for v, p in zip(reference.values, at_start))
        assert any(not torch.equal(v, p) for v, p in zip(reference.values, trainer.roles.generator_params))
        assert "rl_reference" in trainer.state_dict() and trainer.state_dict()["rl_reference_taken"]
    finally:
        session.close()


@pytest.mark.parametrize("method,extra", [("dpo", {"rl__dpo_k": 2}), ("grpo", {"rl__grpo_group_size": 2})])
def test_a_cold_start_of_another_method_continues_with_dpo_or_grpo(tiny_assets, tmp_path, method, extra):
    # The paper's Table 5 (benchmarks/paper_tables.py): every RL method continues from one cold start, whose
    # checkpoint holds no DPO reference and no GRPO group; they start fresh at the first RL step.
    quick = {"dmd__ratio": 1, "rl__start_step": 2, "data__rl_batch_size": 2}
    cold = tmp_path / "cold"
    assert run(tiny_config(tiny_assets, cold, train__max_steps=2, checkpoint__interval=2, **quick)) == 0
    out = tmp_path / method
    cfg = tiny_config(tiny_assets, out, rl__method=method, train__max_steps=3, checkpoint__interval=0,
                      checkpoint__resume=str(cold / "checkpoints" / "step-2"), **quick, **extra)
    assert run(cfg) == 0
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [3] and "loss/rl" in rows[0]
