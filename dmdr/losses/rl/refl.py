"""ReFL: reward feedback on the generator's one-step clean estimate (differentiable rewards).

``L_rl = sum_r w_r relu(margin - score_r).mean()`` (ALGORITHM.md, RL branch); the images are the
decoded clean estimate ``x0`` of the generator step, inside the graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from dmdr.rewards.base import Reward

if TYPE_CHECKING:
    from dmdr.losses.rl.base import PolicyAccess, RLBatch


def refl_loss(images: Tensor, prompts: list[str], rewards: Sequence[tuple[Reward, float]],
              margin: float) -> tuple[Tensor, dict[str, float]]:
    """The weighted ReFL loss and per-reward stats (``reward/<name>`` mean and ``reward/<name>_std``)."""
    if not rewards:
        raise ValueError("refl_loss needs at least one (reward, weight) pair")
    total = images.new_zeros((), dtype=torch.float32)
    stats: dict[str, float] = {}
    for reward, weight in rewards:
        scores = reward(images, prompts).float()
        if scores.ndim != 1 or scores.shape[0] != images.shape[0]:
            raise ValueError(f"reward {reward.name!r} returned shape {tuple(scores.shape)}, "
                             f"expected ({images.shape[0]},)")
        total = total + weight * torch.relu(margin - scores).mean()
        detached = scores.detach()
        stats[f"reward/{reward.name}"] = detached.mean().item()
        stats[f"reward/{reward.name}_std"] = detached.std(unbiased=False).item() if detached.numel() > 1 else 0.0
    return total, stats


class ReFL:
    """ReFL as an :class:`~dmdr.losses.rl.base.RLMethod`: the rewards of the decoded step estimate ``x0``.

    No extra generator forward: the images are the DMD step's own clean estimate, in the graph.

    Args:
        margin: the per-reward ``relu(margin - score)`` margin (``rl.margin``).
    """

    name = "refl"
    needs_reference = False
    stateful = False

    def __init__(self, margin: float = 0.7):
        self.margin = float(margin)

    def prepare(self, prompts: list[str], cond: Any, generator: PolicyAccess,
                rewards: Sequence[tuple[Reward, float]]) -> tuple[None, dict[str, float]]:
        """Nothing to draw for the whole batch: each slice scores its own clean estimate."""
        return None, {}

    def micro_loss(self, prepared: None, batch: RLBatch, generator: PolicyAccess,
                   rewards: Sequence[tuple[Reward, float]], rows: slice) -> tuple[Tensor, dict[str, float]]:
        return refl_loss(generator.decode(batch.x0), batch.prompts, rewards, self.margin)

    def loss(self, batch: RLBatch, generator: PolicyAccess,
             rewards: Sequence[tuple[Reward, float]]) -> tuple[Tensor, dict[str, float]]:
        return refl_loss(generator.decode(batch.x0), batch.prompts, rewards, self.margin)
