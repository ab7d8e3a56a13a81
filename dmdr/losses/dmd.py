"""The DMD losses: the generator's distribution-matching gradient and the critic's denoising loss.

ALGORITHM.md, generator update, steps 3-5::

    p_r = x0 - x0_real,  p_f = x0 - x0_fake
    g   = (p_r - p_f) / (mean_{C,H,W} |p_r| + eps)      per sample, non-finite -> 0
    L   = 0.5 * mean (x0 - stopgrad(x0 - g))^2          in fp32

so that ``dL/dx0 = g / numel``. The plain-torch definitions (:func:`dmd_gradient`, :func:`dmd_loss`,
:func:`score_difference_reference`) are the kernels' references (:mod:`dmdr.kernels.reference`): the losses
import the kernels, never the other way. :func:`score_difference` is the whole chain from the raw score
predictions (CFG combine, both clean estimates, the normalised difference), through the fused kernel when the
dispatcher picks Triton, with the reference's signature.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dmdr import kernels
from dmdr.kernels.reference import dmd_gradient, dmd_loss, score_difference_reference
from dmdr.parameterization import (
    EpsilonPrediction,
    FlowMatching,
    Parameterization,
    TimeLike,
    expand_like,
)


def decoupled_dmd_gradient(x0: Tensor, dm: tuple[Tensor, Tensor, Tensor], ca: tuple[Tensor, Tensor, Tensor],
                           guidance: TimeLike, dm_weight: float = 1.0, ca_weight: float = 1.0,
                           eps: float = 1e-8) -> Tensor:
    """Decoupled DMD (ALGORITHM.md; arXiv 2511.22677): the DM and CA terms, each at its own level and weight.

    With CFG, ``x0_fake - x0_real = DM + (w - 1) CA`` where ``DM = x0_fake - x0_cond`` (distribution matching,
    the regulariser) and ``CA = x0_uncond - x0_cond`` (CFG augmentation, the engine). Each term is taken at
    its own renoise level and normalised by the coupled loss's per-sample normaliser at that level::

        g = dm_weight DM(t_dm) / n(t_dm) + ca_weight (w - 1) CA(t_ca) / n(t_ca),
        n(t) = mean_{C,H,W} |x0 - x0_real(t)| + eps

    so with equal weights and one shared level (and noise) it is the coupled :func:`dmd_gradient`.

    Args:
        x0: the generator's clean estimate.
        dm: ``(x0_cond, x0_fake, x0_real)`` at the DM term's level.
        ca: ``(x0_uncond, x0_cond, x0_real)`` at the CA term's level.
        guidance: the CFG scale ``w`` (float or per-sample).
    """
    x0 = x0.float()
    dm_cond, dm_fake, dm_real = (t.float() for t in dm)
    ca_uncond, ca_cond, ca_real = (t.float() for t in ca)
    dims = tuple(range(1, x0.ndim))
    n_dm = (x0 - dm_real).abs().mean(dim=dims, keepdim=True) + eps
    n_ca = (x0 - ca_real).abs().mean(dim=dims, keepdim=True) + eps
    w = expand_like(guidance, x0)
    grad = dm_weight * (dm_fake - dm_cond) / n_dm + ca_weight * (w - 1) * (ca_uncond - ca_cond) / n_ca
    return torch.where(torch.isfinite(grad), grad, torch.zeros_like(grad))


def score_difference(
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
    """The DMD gradient ``g`` from the teacher's predictions; fused kernel when available."""
    if eps == 1e-8 and kernels.use_triton(x0):  # the kernels take floats, 0-d or (B,) for t and guidance
        if isinstance(param, FlowMatching):
            return kernels.dmd_score_difference(x0.detach(), x_d, t_d, pred_uncond, pred_cond, guidance,
                                                pred_fake, param.t_min)
        if isinstance(param, EpsilonPrediction):
            alpha_bar = param.alpha_bar(t_d, x0)
            alpha_bar = alpha_bar.reshape(-1) if alpha_bar.ndim else alpha_bar
            return kernels.dmd_score_difference_eps(x0.detach(), x_d, alpha_bar, pred_uncond, pred_cond,
                                                    guidance, pred_fake)
    return score_difference_reference(param, x0.detach(), x_d, t_d, pred_uncond, pred_cond, guidance,
                                      pred_fake, eps=eps)


def critic_loss(pred_fake: Tensor, target: Tensor) -> Tensor:
    """The fake score's denoising loss ``mean ||pred - target||^2`` (fp32)."""
    return torch.mean((pred_fake.float() - target.float()) ** 2)


__all__ = ["dmd_gradient", "decoupled_dmd_gradient", "dmd_loss", "score_difference_reference",
           "score_difference", "critic_loss"]
