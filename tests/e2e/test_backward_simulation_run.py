"""The trainer's generator input and critic samples under ``dmd.backward_simulation`` / ``dmd.critic_samples``."""

from __future__ import annotations

import pytest
import torch

from dmdr.launch import run
from tests.tiny_helpers import tiny_config


@pytest.mark.slow
@pytest.mark.parametrize("simulation,critic", [("sde", "final"), ("ode", "level")])
def test_generator_input_and_critic_samples(tiny_assets, tmp_path, monkeypatch, simulation, critic):
    from dmdr.engine import StepEngine

    seen: dict = {"level": [], "critic": [], "x0_sim": []}
    generator_update, critic_update = StepEngine.generator_update, StepEngine.critic_update

    def record_generator(self, x0_sim, cond, uncond, prompts, level=None):
        assert level is not None, "the input is drawn up front in this mode"
        with torch.no_grad():  # the pair: the generator's own clean estimate from exactly this input
            own = self.param.to_x0(level.x_t, level.t, self.roles.generator_fn(level.x_t, level.t, cond))
        torch.testing.assert_close(level.clean, own, rtol=1e-4, atol=1e-5)
        seen["level"].append(level)
        seen["x0_sim"].append(x0_sim)
        seen["last_t"] = self.timesteps[-2]
        return generator_update(self, x0_sim, cond, uncond, prompts, level)

    def record_critic(self, x0, cond):
        seen["critic"].append(x0)
        return critic_update(self, x0, cond)

    monkeypatch.setattr(StepEngine, "generator_update", record_generator)
    monkeypatch.setattr(StepEngine, "critic_update", record_critic)
    cfg = tiny_config(tiny_assets, tmp_path / "run", dmd__backward_simulation=simulation,
                      dmd__critic_samples=critic, dmd__ratio=1, rl__method="none", train__max_steps=3)
    assert run(cfg) == 0
    assert len(seen["level"]) == len(seen["critic"]) == 3
    for level, x0_sim, x0_critic in zip(seen["level"], seen["x0_sim"], seen["critic"]):
        assert torch.equal(x0_critic, level.clean if critic == "level" else x0_sim)
    if simulation == "sde":  # the first level's input is the simulation's noise, the last one's estimate the sample
        levels = torch.cat([lv.t for lv in seen["level"]])
        assert levels.unique().numel() == cfg.dmd.num_steps
        for level, x0_sim in zip(seen["level"], seen["x0_sim"]):
            last = level.t == seen["last_t"]
            torch.testing.assert_close(level.clean[last], x0_sim[last])


@pytest.mark.slow
@pytest.mark.parametrize("switch", [False, True])
def test_only_distill_switches_to_the_rl_batch_when_asked(tiny_assets, tmp_path, monkeypatch, switch):
    from dmdr.trainer import DMDRTrainer

    sizes: list[int] = []
    conditioning = DMDRTrainer._conditioning

    def record(self, batch):
        sizes.append(len(batch["prompts"]))
        return conditioning(self, batch)

    monkeypatch.setattr(DMDRTrainer, "_conditioning", record)
    cfg = tiny_config(tiny_assets, tmp_path / "run", rl__method="none", data__rl_batch_for_distill=str(switch).lower(),
                      train__max_steps=3, rl__start_step=1, dmd__ratio=1)
    assert (cfg.data.batch_size, cfg.data.rl_batch_size) == (4, 2)
    assert run(cfg) == 0
    assert sizes == ([4, 2, 2] if switch else [4, 4, 4])
