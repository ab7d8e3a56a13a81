"""Rewards behind one :class:`~dmdr.rewards.base.Reward` protocol, built by name for ``rl.rewards``.

Available names:

* ``brightness`` and ``color``: analytic (:mod:`dmdr.rewards.analytic`); the tiny demo and tests use them.
* ``shapes``: the shapes world's prompt-aware colour reward (:mod:`dmdr.worlds.shapes.reward`), the demo's. A
  package above this one offers its rewards through :func:`register_reward` (the world registers ``shapes`` when
  it is imported; :mod:`dmdr.build` imports it), so this package never imports the worlds. The world also offers
  ``shapes-style`` (the colour reward against the restyled prompt, for re-turbo) and ``shapes-form`` (a learned
  shape-and-count classifier, :mod:`dmdr.worlds.shapes.form_reward`; measured and failed as a training signal).
* ``hps`` (HPSv2.1: open_clip ViT-H-14 + the checkpoint file ``rl.hps_checkpoint``; prompts prefixed
  ``"Realistic photo "``), ``clip`` (DFN-CLIP: open_clip folder ``rl.clip_model``) and ``pickscore``
  (transformers CLIP folder ``rl.pickscore_model``): the paper's reward models
  (:mod:`dmdr.rewards.models`). They load from local files only, frozen on ``device``; a missing or
  malformed path stops the run at build time with one line naming the field. HPS and CLIP score the
  cosine of normalised image/text features; PickScore is ``logit_scale.exp() * cosine / 100``.
  ``rl.hps_arch`` (*default* ViT-H-14) names another open_clip architecture.
* ``srpo``: the semantic-relative reward with the HPS encoders (:mod:`dmdr.rewards.srpo`),
  ``(1 + k) cos(f, f+) - cos(f, f-)`` with control words (``rl.srpo_k``).

All of them share one differentiable preprocessing (:mod:`dmdr.rewards.preprocess`): bicubic
antialiased resize to the model's input size, then its mean/std normalisation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dmdr.errors import ConfigError
from dmdr.rewards.analytic import BrightnessReward, ColorReward, RegionReward
from dmdr.rewards.base import Reward
from dmdr.rewards.preprocess import ImagePreprocess

ANALYTIC = {"brightness": BrightnessReward, "color": ColorReward}
MODEL_REWARDS = ("hps", "clip", "pickscore", "srpo")
RewardFactory = Callable[[Any, torch.device | str], Reward]
"""``factory(rl_cfg, device) -> Reward``: the ``rl`` config section and the device to put it on."""
REGISTERED: dict[str, RewardFactory] = {}
"""Rewards offered by packages above this one (:func:`register_reward`), by name."""


def register_reward(name: str, factory: RewardFactory) -> None:
    """Offer ``factory(rl_cfg, device)`` as ``--rl.rewards name`` (a world's own reward); the built-in names are
    taken. Registering the same name again replaces the factory (a module imported twice, e.g. by path)."""
    if name in ANALYTIC or name in MODEL_REWARDS:
        raise ValueError(f"reward name {name!r} is a built-in reward's")
    REGISTERED[name] = factory


def build_reward(name: str, rl_cfg: Any, device: torch.device | str = "cpu") -> Reward:
    """The reward called ``name`` (``rl.rewards`` entry), frozen and ready on ``device``."""
    if name in ANALYTIC:
        return ANALYTIC[name]()
    if name in REGISTERED:
        return REGISTERED[name](rl_cfg, device)
    resolution = int(rl_cfg.reward_resolution)
    if name == "hps":
        from dmdr.rewards.models import HPS_ARCH, HPSReward

        return HPSReward(getattr(rl_cfg, "hps_checkpoint", ""), device=device,
                         arch=rl_cfg.hps_arch or HPS_ARCH, resolution=resolution)
    if name == "srpo":
        from dmdr.rewards.models import HPS_ARCH
        from dmdr.rewards.srpo import SemanticRelativeReward

        return SemanticRelativeReward(getattr(rl_cfg, "hps_checkpoint", ""), device=device,
                                      arch=rl_cfg.hps_arch or HPS_ARCH, resolution=resolution,
                                      k=getattr(rl_cfg, "srpo_k", 0.1))
    if name == "clip":
        from dmdr.rewards.models import CLIPReward

        return CLIPReward(getattr(rl_cfg, "clip_model", ""), device=device, resolution=resolution)
    if name == "pickscore":
        from dmdr.rewards.models import PickScoreReward

        return PickScoreReward(getattr(rl_cfg, "pickscore_model", ""), device=device, resolution=resolution)
    known = ", ".join([*ANALYTIC, *REGISTERED, *MODEL_REWARDS])
    raise ConfigError(f"--rl.rewards: unknown reward {name!r} (known: {known})")


def __getattr__(name: str) -> Any:
    # The model rewards import open_clip / transformers lazily, only when asked for.
    if name in ("HPSReward", "CLIPReward", "PickScoreReward"):
        from dmdr.rewards import models

        return getattr(models, name)
    if name == "SemanticRelativeReward":
        from dmdr.rewards.srpo import SemanticRelativeReward

        return SemanticRelativeReward
    raise AttributeError(f"module 'dmdr.rewards' has no attribute {name!r}")


__all__ = ["Reward", "build_reward", "register_reward", "REGISTERED", "BrightnessReward", "ColorReward",
           "RegionReward", "ANALYTIC", "MODEL_REWARDS", "ImagePreprocess", "HPSReward", "CLIPReward", "PickScoreReward",
           "SemanticRelativeReward"]
