"""The step engine on the 2-D world: the toy loop is the trainer's step, and its schedules hold.

Tiny teacher, a few iterations: seconds. The distillation claims themselves are tests/e2e/test_toy_world.py's.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import dmdr.engine
from dmdr.engine import StepEngine
from dmdr.errors import ConfigError
from dmdr.rewards.analytic import RegionReward
from dmdr.worlds import GaussianMixtureWorld, ToyDMDRConfig, run_toy_dmdr, train_teacher
from dmdr.worlds.toy_dmdr import toy_engine

pytestmark = pytest.mark.usefixtures("one_thread")

REWARD = RegionReward(direction=(1.0, 0.0), offset=0.0, temperature=1.0)
QUICK = ToyDMDRConfig(num_steps=2, shift=3.0, ratio=3, batch_size=16, generator_steps=2, eval_every=1,
                      eval_samples=64, teacher_sample_steps=4)


@pytest.fixture(scope="module")
def world():
    return GaussianMixtureWorld.ring(num_modes=4, num_classes=2, radius=3.0, std=0.2)


@pytest.fixture(scope="module")
def teacher(world):
    return train_teacher(world, steps=20, seed=0, hidden=32, depth=1)


def _engine(teacher, world, cfg: ToyDMDRConfig) -> StepEngine:
    return toy_engine(teacher, world, cfg, torch.Generator().manual_seed(0))


def _iterate(engine: StepEngine, world, n: int) -> list[dict | None]:
    labels = torch.arange(8) % world.num_classes
    return [engine.iteration(world.cond(labels), world.uncond(8), [f"class {c}" for c in labels.tolist()])
            for _ in range(n)]


def _copy(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def test_with_dmd_the_critic_steps_every_iteration_and_the_generator_every_ratio(world, teacher):
    engine = _engine(teacher, world, QUICK)
    critic0, gen0 = _copy(engine.roles.critic_params), _copy(engine.roles.generator_params)
    out = _iterate(engine, world, 2)
    assert out == [None, None] and engine.step == 0
    assert all(torch.equal(a, b) for a, b in zip(gen0, engine.roles.generator_params))
    assert any(not torch.equal(a, b) for a, b in zip(critic0, engine.roles.critic_params))
    (metrics,) = _iterate(engine, world, 1)
    assert engine.step == 1 and engine.counters.iteration == 3
    assert "loss/fake" in metrics and "loss/dmd" in metrics
    assert any(not torch.equal(a, b) for a, b in zip(gen0, engine.roles.generator_params))


def test_without_dmd_the_critic_rests_and_the_generator_steps_every_iteration(world, teacher):
    engine = _engine(teacher, world, dataclasses.replace(QUICK, dmd=False, reward=REWARD))
    assert not engine.trains_critic and engine.iterations_per_generator_step == 1
    critic0 = _copy(engine.roles.critic_params)
    out = _iterate(engine, world, 3)
    assert all(m is not None for m in out) and engine.step == 3 == engine.counters.iteration
    assert all("loss/fake" not in m and "loss/dmd" not in m and m["loss/generator"] == m["loss/rl"] for m in out)
    assert all(torch.equal(a, b) for a, b in zip(critic0, engine.roles.critic_params))


def test_the_toy_loop_is_the_engines_iterations(world, teacher, monkeypatch):
    calls = []
    real = StepEngine.iteration

    def counted(self, *args, **kwargs):
        calls.append(self.step)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(dmdr.engine.StepEngine, "iteration", counted)
    history = run_toy_dmdr(teacher, world, QUICK, seed=0)
    assert calls == [0, 0, 0, 1, 1, 1]  # ratio 3, 2 generator steps
    assert history.steps == [0, 1, 2]
    calls.clear()
    run_toy_dmdr(teacher, world, dataclasses.replace(QUICK, dmd=False, reward=REWARD), seed=0)
    assert calls == [0, 1]


def test_toy_grpo_alone_takes_the_kl_term_against_the_rl_start(world, teacher):
    cfg = dataclasses.replace(QUICK, dmd=False, reward=REWARD, rl_method="grpo", grpo_group_size=4,
                              grpo_kl_weight=0.04)
    engine = _engine(teacher, world, cfg)
    assert engine.reference is not None and not engine.reference.taken
    first, second = _iterate(engine, world, 2)
    assert engine.reference.taken
    assert first["rl/grpo_kl"] == 0.0 < second["rl/grpo_kl"]  # the policy moved away from its RL-start copy
    no_kl = _engine(teacher, world, dataclasses.replace(cfg, grpo_kl_weight=0.0))
    assert no_kl.reference is None and "rl/grpo_kl" not in _iterate(no_kl, world, 1)[0]


def test_rl_alone_before_the_rl_start_is_one_config_error(world, teacher):
    engine = _engine(teacher, world, dataclasses.replace(QUICK, dmd=False, reward=REWARD))
    engine.cfg.rl.start_step = 5  # as a run launched with --dmd.weight 0 and a later rl.start_step
    gen0 = _copy(engine.roles.generator_params)
    with pytest.raises(ConfigError, match="dmd.weight 0 trains the RL loss alone, but generator step 0 has no RL"):
        _iterate(engine, world, 1)
    assert all(torch.equal(a, b) for a, b in zip(gen0, engine.roles.generator_params))
