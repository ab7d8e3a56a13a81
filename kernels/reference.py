"""Plain-torch references of the fused kernels: same signatures, used on CPU and as test oracles' peers.

Each reference is built from the library's own math (:mod:`dmdr.parameterization`,
:mod:`dmdr.losses.dmd`) so that there is one definition of every formula.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from dmdr.parameterization import FlowMatching, TimeLike, expand_like


def renoise_reference(x0: Tensor, noise: Tensor, t: TimeLike) -> Tensor:
    """``(1 - t) x0 + t noise`` with per-sample ``t`` (flow matching)."""
    return FlowMatching().renoise(x0, noise, t)


def dmd_score_difference_reference(
    x0: Tensor, x_d: Tensor, t_d: Tensor, v_uncond: Tensor, v_cond: Tensor, guidance: TimeLike,
    v_fake: Tensor, t_min: float = 0.001,
) -> Tensor:
    """The DMD gradient ``g`` (fp32) of ALGORITHM.md from velocity predictions."""
    from dmdr.losses.dmd import score_difference_reference

    return score_difference_reference(FlowMatching(t_min), x0, x_d, t_d, v_uncond, v_cond, guidance, v_fake)


def lora_linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                          scale: TimeLike) -> Tensor:
    """``x W^T + b + scale (x A^T) B^T``; ``scale`` a float, a 0-d tensor or a per-sample ``(B,)`` tensor."""
    base = F.linear(x, weight, bias)
    if not isinstance(scale, Tensor) and scale == 0.0:
        return base
    delta = F.linear(F.linear(x, lora_a), lora_b)
    if isinstance(scale, Tensor):
        scale = expand_like(scale.to(delta.dtype), delta)
    return base + scale * delta


__all__ = ["renoise_reference", "dmd_score_difference_reference", "lora_linear_reference"]
