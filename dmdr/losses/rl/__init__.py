"""RL branches behind one interface (:mod:`dmdr.losses.rl.base`): ReFL, on-policy DPO, GRPO.

``--rl.method`` picks one; :func:`build_rl_method` makes it from the config's ``rl`` section.
"""

from __future__ import annotations

from typing import Any

from dmdr.losses.rl.base import PolicyAccess, RLBatch, RLMethod
from dmdr.losses.rl.dpo import OnPolicyDPO
from dmdr.losses.rl.grpo import GRPO
from dmdr.losses.rl.refl import ReFL

METHODS = ("none", "refl", "dpo", "grpo")


def build_rl_method(rl: Any, sampler: str = "ode", group_size: int = 0) -> RLMethod | None:
    """The branch named ``rl.method`` with its hyperparameters (None for ``none``).

    ``sampler``: the generator's backward-simulation mode, which DPO's candidates use. ``group_size``: GRPO's
    resolved ``G`` (:func:`dmdr.config.grpo_group_size`; 0: ``rl.grpo_group_size`` as given, its auto 0 as 4).
    """
    if rl.method == "none":
        return None
    if rl.method == "refl":
        return ReFL(rl.margin)
    if rl.method == "dpo":
        return OnPolicyDPO(rl.dpo_k, rl.dpo_beta, rl.dpo_weight, sampler=sampler)
    if rl.method == "grpo":
        return GRPO(group_size or rl.grpo_group_size or 4, rl.grpo_clip, rl.grpo_weight, rl.grpo_inner_updates,
                    kl_weight=rl.grpo_kl_weight)
    raise ValueError(f"unknown rl.method {rl.method!r} (known: {', '.join(METHODS)})")


__all__ = ["RLMethod", "RLBatch", "PolicyAccess", "ReFL", "OnPolicyDPO", "GRPO", "METHODS", "build_rl_method"]
