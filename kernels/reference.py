"""Plain-torch references of the fused kernels: same signatures, used on CPU and as test oracles' peers.

Each reference is built from the library's own math (:mod:`dmdr.parameterization`,
:mod:`dmdr.losses.dmd`) so that there is one definition of every formula.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dmdr.losses.dmd_reference import dmd_loss, score_difference_reference
from dmdr.parameterization import EpsilonPrediction, FlowMatching, TimeLike, expand_like


class _GivenAlphaBar(EpsilonPrediction):
    """:class:`EpsilonPrediction` whose alpha-bar the caller supplies per sample (in place of ``t``).

    Only the table look-up is replaced; the clean estimate is the library's ``to_x0``.
    """

    def __init__(self) -> None:  # no alphas_cumprod table: alpha-bar comes with every call
        self.t_min = 0.0

    def alpha_bar(self, t: TimeLike, like: Tensor) -> Tensor:
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        ab = torch.as_tensor(t, dtype=dtype, device=like.device)
        return expand_like(ab, like) if ab.ndim else ab

    def __repr__(self) -> str:
        return "EpsilonPrediction(alpha_bar given)"


def renoise_reference(x0: Tensor, noise: Tensor, t: TimeLike) -> Tensor:
    """``(1 - t) x0 + t noise`` with per-sample ``t`` (flow matching)."""
    return FlowMatching().renoise(x0, noise, t)


def dmd_score_difference_reference(
    x0: Tensor, x_d: Tensor, t_d: Tensor, v_uncond: Tensor, v_cond: Tensor, guidance: TimeLike,
    v_fake: Tensor, t_min: float = 0.001,
) -> Tensor:
    """The DMD gradient ``g`` (fp32) of ALGORITHM.md from velocity predictions."""
    return score_difference_reference(FlowMatching(t_min), x0, x_d, t_d, v_uncond, v_cond, guidance, v_fake)


def dmd_score_difference_eps_reference(
    x0: Tensor, x_t: Tensor, alpha_bar: TimeLike, eps_uncond: Tensor, eps_cond: Tensor, guidance: TimeLike,
    eps_fake: Tensor,
) -> Tensor:
    """The DMD gradient ``g`` (fp32) from epsilon predictions; ``alpha_bar`` per sample ``(B,)`` or scalar."""
    return score_difference_reference(_GivenAlphaBar(), x0, x_t, alpha_bar, eps_uncond, eps_cond, guidance,
                                      eps_fake)


def _loss_and_grad(x0: Tensor, g: Tensor, return_grad: bool):
    loss = dmd_loss(x0, g)
    return (loss, g) if return_grad else loss


def dmd_loss_fused_reference(
    x0: Tensor, x_d: Tensor, t_d: TimeLike, v_uncond: Tensor, v_cond: Tensor, guidance: TimeLike,
    v_fake: Tensor, t_min: float = 0.001, return_grad: bool = False,
):
    """``dmd_loss(x0, g)`` with ``g`` from velocity predictions; ``(loss, g)`` when ``return_grad``."""
    g = dmd_score_difference_reference(x0.detach(), x_d, t_d, v_uncond, v_cond, guidance, v_fake, t_min)
    return _loss_and_grad(x0, g, return_grad)


def dmd_loss_fused_eps_reference(
    x0: Tensor, x_t: Tensor, alpha_bar: TimeLike, eps_uncond: Tensor, eps_cond: Tensor, guidance: TimeLike,
    eps_fake: Tensor, return_grad: bool = False,
):
    """``dmd_loss(x0, g)`` with ``g`` from epsilon predictions; ``(loss, g)`` when ``return_grad``."""
    g = dmd_score_difference_eps_reference(x0.detach(), x_t, alpha_bar, eps_uncond, eps_cond, guidance,
                                           eps_fake)
    return _loss_and_grad(x0, g, return_grad)


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


__all__ = [
    "renoise_reference", "dmd_score_difference_reference", "dmd_score_difference_eps_reference",
    "dmd_loss_fused_reference", "dmd_loss_fused_eps_reference", "lora_linear_reference",
]
