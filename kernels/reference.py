"""Plain-torch references of the fused kernels: same signatures, used on CPU and as the fallback of every op.

The DMD gradient and loss of ALGORITHM.md's generator update, steps 3-5, are defined here once::

    p_r = x0 - x0_real,  p_f = x0 - x0_fake
    g   = (p_r - p_f) / (mean_{C,H,W} |p_r| + eps)      per sample, non-finite -> 0
    L   = 0.5 * mean (x0 - stopgrad(x0 - g))^2          in fp32

so that ``dL/dx0 = g / numel``; :mod:`dmdr.losses.dmd` reads them from here (losses -> kernels, never back).
The clean estimates come from the library's :mod:`dmdr.parameterization`. The kernels' independent checks are
the float64 formulas written in ``tests/kernels`` and ``tests/losses``, not these functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dmdr.parameterization import (
    EpsilonPrediction,
    FlowMatching,
    Parameterization,
    TimeLike,
    classifier_free_guidance,
    expand_like,
)


def dmd_gradient(x0: Tensor, x0_real: Tensor, x0_fake: Tensor, eps: float = 1e-8) -> Tensor:
    """The normalised DMD gradient ``g`` (fp32), zero wherever it is not finite."""
    x0, x0_real, x0_fake = x0.float(), x0_real.float(), x0_fake.float()
    p_real = x0 - x0_real
    p_fake = x0 - x0_fake
    reduce_dims = tuple(range(1, x0.ndim))
    normalizer = p_real.abs().mean(dim=reduce_dims, keepdim=True) + eps
    grad = (p_real - p_fake) / normalizer
    return torch.where(torch.isfinite(grad), grad, torch.zeros_like(grad))


def dmd_loss(x0: Tensor, grad: Tensor) -> Tensor:
    """``0.5 mean (x0 - stopgrad(x0 - g))^2`` in fp32; its gradient w.r.t. ``x0`` is ``g / numel``."""
    x0 = x0.float()
    target = (x0 - grad.float()).detach()
    return 0.5 * torch.mean((x0 - target) ** 2)


def score_difference_reference(
    param: Parameterization,
    x0: Tensor,
    x_d: Tensor,
    t_d: TimeLike,
    pred_uncond: Tensor,
    pred_cond: Tensor,
    guidance: TimeLike,
    pred_fake: Tensor,
    eps: float = 1e-8,
) -> Tensor:
    """Steps 3-4 of the generator update from raw predictions, in plain torch (fp32 math)."""
    f32 = [p.float() for p in (x_d, pred_uncond, pred_cond, pred_fake)]
    x_d, pred_uncond, pred_cond, pred_fake = f32
    t_d = t_d.float() if isinstance(t_d, Tensor) else t_d
    pred_real = classifier_free_guidance(pred_uncond, pred_cond, guidance)
    x0_real = param.to_x0(x_d, t_d, pred_real)
    x0_fake = param.to_x0(x_d, t_d, pred_fake)
    return dmd_gradient(x0, x0_real, x0_fake, eps)


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
    "dmd_gradient", "dmd_loss", "score_difference_reference",
    "renoise_reference", "dmd_score_difference_reference", "dmd_score_difference_eps_reference",
    "dmd_loss_fused_reference", "dmd_loss_fused_eps_reference", "lora_linear_reference",
]
