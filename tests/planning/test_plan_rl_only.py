"""The planner counts what the step engine runs when the DMD loss is off (``dmd.weight 0``, the RL loss alone).

The engine then trains no critic and steps the generator every iteration (tests/worlds/test_toy_engine.py): so the
plan has no critic steps and no teacher pass, one backward simulation and one prompt encoding per generator step
(not ``dmd.ratio``), and no critic gradients or AdamW moments; the generator's own step costs the same.
"""

from __future__ import annotations

import dataclasses

import pytest

from dmdr.config import TrainConfig
from dmdr.models.tiny import build_tiny
from dmdr.planning.memory import Layout, stage_memory, state_bytes
from dmdr.planning.planner import frozen_costs, stage_flops
from dmdr.planning.specs import build_model_spec

RATIO = 5


def _cfg(folder, weight: float) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.path = str(folder)
    cfg.model.dtype = "fp32"
    cfg.model.resolution = 32
    cfg.model.max_sequence_length = 16
    cfg.parallel.param_dtype = "fp32"
    cfg.rl.rewards, cfg.rl.weights = ("brightness",), (1.0,)
    cfg.dmd.ratio, cfg.dmd.weight = RATIO, weight
    return cfg


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = build_tiny("sd3", tmp_path_factory.mktemp("plan-rl-only") / "sd3")
    with_dmd = _cfg(folder, 1.0)
    spec = build_model_spec(with_dmd)
    return spec, with_dmd, _cfg(folder, 0.0), frozen_costs(spec, with_dmd)


@pytest.mark.parametrize("rl", [False, True])
def test_rl_only_flops_have_no_critic_and_one_iteration_per_generator_step(tiny, rl):
    spec, with_dmd, rl_only, frozen = tiny
    dmd = stage_flops(spec, with_dmd, rl, frozen).parts
    alone = stage_flops(spec, rl_only, rl, frozen).parts
    assert dmd["critic steps"] > 0 and dmd["teacher 3x-batch pass"] > 0
    assert "critic steps" not in alone and "teacher 3x-batch pass" not in alone
    assert alone["backward simulation"] * RATIO == dmd["backward simulation"] > 0
    assert alone["text encoders"] * RATIO == dmd["text encoders"] > 0
    assert alone["generator step"] == dmd["generator step"] > 0


def test_rl_only_memory_has_no_critic_step_gradients_or_moments(tiny):
    spec, with_dmd, rl_only, _ = tiny
    layout = Layout.of(with_dmd, 1)
    dmd, alone = state_bytes(spec, with_dmd, layout), state_bytes(spec, rl_only, layout)
    critic = spec.denoiser.critic_lora.shard_numel(1) * 4  # fp32
    generator = spec.denoiser.generator_lora.shard_numel(1) * 4
    assert alone.params == dmd.params  # the critic LoRA still exists, it just never steps
    assert (dmd.grads, alone.grads) == (generator + critic, generator)
    assert (dmd.optimizer, alone.optimizer) == (2 * (generator + critic), 2 * generator)
    assert "critic step" in stage_memory(spec, with_dmd, layout, rl=False).activations
    assert "critic step" not in stage_memory(spec, rl_only, layout, rl=False).activations


def test_rl_only_plan_ignores_the_ratio(tiny):
    spec, _, rl_only, frozen = tiny
    ratio_one = dataclasses.replace(rl_only, dmd=dataclasses.replace(rl_only.dmd, ratio=1))
    assert stage_flops(spec, ratio_one, True, frozen).parts == stage_flops(spec, rl_only, True, frozen).parts
