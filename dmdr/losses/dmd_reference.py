"""The DMD gradient and loss in plain torch: the one definition of ALGORITHM.md's steps 3-5, which the fused
kernels (:mod:`dmdr.kernels`) reproduce and test against.

ALGORITHM.md, generator update, steps 3-5::

    p_r = x0 - x0_real,  p_f = x0 - x0_fake
    g   = (p_r - p_f) / (mean_{C,H,W} |p_r| + eps)      per sample, non-finite -> 0
    L   = 0.5 * mean (x0 - stopgrad(x0 - g))^2          in fp32

so that ``dL/dx0 = g / numel``. :mod:`dmdr.losses.dmd` adds the dispatch to the fused kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dmdr.parameterization import Parameterization, TimeLike, classifier_free_guidance


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
