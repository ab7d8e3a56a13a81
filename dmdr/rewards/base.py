"""The Reward protocol: differentiable scores of decoded images given their prompts."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Reward(Protocol):
    """A frozen, differentiable reward model.

    ``images`` are RGB in ``[0, 1]``, shape ``(B, 3, H, W)`` (or, in the toy worlds, any batch-first
    tensor the reward understands). Returns one score per sample, shape ``(B,)``, differentiable
    w.r.t. ``images`` so that ReFL's gradient reaches the generator.
    """

    name: str

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor: ...
