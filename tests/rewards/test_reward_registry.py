"""Rewards offered by packages above dmdr.rewards (a world's own reward) are built by name through a registry, so
dmdr.rewards imports no world; a run's builder registers the shapes world's reward."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dmdr.config import RLConfig
from dmdr.errors import ConfigError
from dmdr.rewards import REGISTERED, BrightnessReward, build_reward, register_reward

REPO = Path(__file__).resolve().parents[2]


def test_a_registered_reward_is_built_by_name_with_the_rl_section_and_device(monkeypatch):
    calls = []

    def factory(rl_cfg, device):
        calls.append((rl_cfg, device))
        return BrightnessReward()

    monkeypatch.setitem(REGISTERED, "toy-world", factory)
    rl = RLConfig()
    assert isinstance(build_reward("toy-world", rl, "cpu"), BrightnessReward)
    assert calls == [(rl, "cpu")]
    with pytest.raises(ConfigError, match="unknown reward 'nope'.*toy-world"):
        build_reward("nope", rl)


@pytest.mark.parametrize("name", ["brightness", "hps"])
def test_a_built_in_name_cannot_be_taken(name):
    with pytest.raises(ValueError, match=name):
        register_reward(name, lambda rl_cfg, device: BrightnessReward())
    assert name not in REGISTERED


def test_a_run_builder_knows_the_shapes_reward_without_importing_the_world_itself():
    code = ("import dmdr.build\nfrom dmdr.config import RLConfig\nfrom dmdr.rewards import build_reward\n"
            "print(type(build_reward('shapes', RLConfig())).__name__)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ShapesReward"
