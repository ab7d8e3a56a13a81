"""Analytic differentiable rewards: closed-form scores for the toy worlds and the tiny-model demo.

They follow the :class:`~dmdr.rewards.base.Reward` protocol (``reward(images, prompts) -> (B,)``),
ignore the prompts, and are cheap enough for CPU tests:

* :class:`RegionReward` scores 2-D (or any ``(B, D)``) points by how deep they sit in a preferred
  half-space, for the Gaussian-mixture world;
* :class:`BrightnessReward` and :class:`ColorReward` score ``(B, 3, H, W)`` RGB images in ``[0, 1]``.

Every score lies in ``[0, 1]``, so ReFL's ``relu(margin - score)`` with a margin below 1 saturates.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# ITU-R BT.601 luma weights.
_LUMA = (0.299, 0.587, 0.114)


def _check_images(images: Tensor, name: str) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} expects RGB images of shape (B, 3, H, W), got {tuple(images.shape)}")


class RegionReward:
    """Prefers points on one side of a line: ``score = sigmoid((x . u - offset) / temperature)``.

    ``u`` is ``direction`` normalised to unit length; the preferred region is ``x . u > offset``.
    A half-space rather than a bump keeps the gradient pointing the same way everywhere, so
    samples far from the region still feel it (what makes reward hacking reachable in the toy).

    Args:
        direction: ``(D,)`` direction of preference.
        offset: where the score crosses 0.5 along ``u``.
        temperature: width of the transition (> 0).
    """

    def __init__(self, direction: Sequence[float] | Tensor, offset: float = 0.0, temperature: float = 1.0,
                 name: str = "region"):
        u = torch.as_tensor(direction, dtype=torch.float32).flatten()
        if u.norm() == 0:
            raise ValueError("RegionReward direction must be non-zero")
        if temperature <= 0:
            raise ValueError(f"RegionReward temperature must be > 0, got {temperature}")
        self.direction = u / u.norm()
        self.offset = float(offset)
        self.temperature = float(temperature)
        self.name = name

    def __call__(self, images: Tensor, prompts: list[str] | None = None) -> Tensor:
        x = images.reshape(images.shape[0], -1)
        if x.shape[1] != self.direction.numel():
            raise ValueError(f"{self.name}: points have {x.shape[1]} coordinates, direction has "
                             f"{self.direction.numel()}")
        u = self.direction.to(device=x.device, dtype=x.dtype)
        return torch.sigmoid((x @ u - self.offset) / self.temperature)


class BrightnessReward:
    """Mean luma of an RGB image in ``[0, 1]``: ``mean_{H,W}(0.299 R + 0.587 G + 0.114 B)``."""

    def __init__(self, name: str = "brightness"):
        self.name = name

    def __call__(self, images: Tensor, prompts: list[str] | None = None) -> Tensor:
        _check_images(images, self.name)
        w = torch.tensor(_LUMA, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        return (images * w).sum(dim=1).mean(dim=(1, 2))


class ColorReward:
    """Closeness of every pixel to a target colour: ``1 - mean_{C,H,W}(image - target)^2``.

    Args:
        target: the RGB colour in ``[0, 1]``, e.g. ``(1.0, 0.0, 0.0)`` for red.
    """

    def __init__(self, target: Sequence[float] = (1.0, 0.0, 0.0), name: str = "color"):
        target_t = torch.as_tensor(target, dtype=torch.float32).flatten()
        if target_t.numel() != 3 or (target_t < 0).any() or (target_t > 1).any():
            raise ValueError(f"ColorReward target must be 3 values in [0, 1], got {list(target)}")
        self.target = target_t
        self.name = name

    def __call__(self, images: Tensor, prompts: list[str] | None = None) -> Tensor:
        _check_images(images, self.name)
        target = self.target.to(device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        return 1.0 - ((images - target) ** 2).mean(dim=(1, 2, 3))


__all__ = ["RegionReward", "BrightnessReward", "ColorReward"]
