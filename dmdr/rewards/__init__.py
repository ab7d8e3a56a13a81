"""Rewards behind one :class:`~dmdr.rewards.base.Reward` protocol, built by name for ``rl.rewards``.

Available names: ``brightness`` and ``color`` (analytic, :mod:`dmdr.rewards.analytic`; the tiny
demo and tests use them). ``hps`` (HPSv2.1), ``clip`` (DFN-CLIP) and ``pickscore`` are the paper's
reward models; they load from local checkpoints only and are not part of this release yet: naming
one stops the run at start with a clear message instead of failing at the RL switch.
"""

from __future__ import annotations

from typing import Any

import torch

from dmdr.errors import ConfigError
from dmdr.rewards.analytic import BrightnessReward, ColorReward, RegionReward
from dmdr.rewards.base import Reward

ANALYTIC = {"brightness": BrightnessReward, "color": ColorReward}
MODEL_REWARDS = ("hps", "clip", "pickscore")


def build_reward(name: str, rl_cfg: Any, device: torch.device | str = "cpu") -> Reward:
    """The reward called ``name`` (``rl.rewards`` entry), frozen and ready on ``device``."""
    if name in ANALYTIC:
        return ANALYTIC[name]()
    if name in MODEL_REWARDS:
        raise ConfigError(f"--rl.rewards: the {name!r} reward model is not available in this release; "
                          f"use {', '.join(ANALYTIC)} or --rl.method none")
    known = ", ".join([*ANALYTIC, *MODEL_REWARDS])
    raise ConfigError(f"--rl.rewards: unknown reward {name!r} (known: {known})")


__all__ = ["Reward", "build_reward", "BrightnessReward", "ColorReward", "RegionReward", "ANALYTIC"]
