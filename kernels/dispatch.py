"""The dispatcher of ``dmdr.kernels``: each fused op or its plain-torch reference.

Dispatch: Triton on CUDA tensors, the torch reference elsewhere. ``DMDR_KERNELS=triton`` forces
Triton (also on CPU under ``TRITON_INTERPRET=1``), ``DMDR_KERNELS=reference`` forces the reference.
Each public function has the signature of its ``*_reference`` twin. The Triton modules are imported
lazily, on the first call that takes the Triton path: ``TRITON_INTERPRET`` is read when a kernel is
defined, so importing them here would freeze the mode before tests or tools could choose it.

Ops (see ``kernels/README.md``): :func:`renoise`, :func:`dmd_score_difference` (+ ``_eps``),
:func:`dmd_loss_fused` (+ ``_eps``, autograd: ``dL/dx0 = g / numel``), :func:`lora_linear` (autograd).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from .reference import (
    dmd_loss_fused_eps_reference,
    dmd_loss_fused_reference,
    dmd_score_difference_eps_reference,
    dmd_score_difference_reference,
    lora_linear_reference,
    renoise_reference,
)

_BACKENDS = ("auto", "triton", "reference")
# What the Triton path computes on (fp32 math inside); anything else (fp64, ints) takes the reference.
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def backend() -> str:
    """The kernel backend chosen by ``DMDR_KERNELS`` (``auto`` when unset)."""
    choice = os.environ.get("DMDR_KERNELS", "auto").strip().lower() or "auto"
    if choice not in _BACKENDS:
        raise ValueError(f"DMDR_KERNELS={choice!r} is not one of {', '.join(_BACKENDS)}")
    return choice


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(x: Tensor) -> bool:
    """Whether the fused Triton path runs for tensors like ``x``."""
    choice = backend()
    if choice == "reference":
        return False
    if choice == "triton":
        return triton_available()
    return x.is_cuda and triton_available()


def _fused(*tensors: Tensor) -> bool:
    return use_triton(tensors[0]) and all(t.dtype in _TRITON_DTYPES for t in tensors)


def renoise(x0: Tensor, noise: Tensor, t):
    """``(1 - t) x0 + t noise`` with per-sample ``t``."""
    if _fused(x0, noise) and not (isinstance(t, Tensor) and t.requires_grad):
        from . import renoise_triton

        return renoise_triton.renoise(x0, noise, t)
    return renoise_reference(x0, noise, t)


def dmd_score_difference(x0, x_d, t_d, v_uncond, v_cond, guidance, v_fake, t_min: float = 0.001):
    """The DMD gradient ``g`` (fp32) from velocity predictions (see :mod:`dmdr.losses.dmd`)."""
    if _fused(x0, x_d, v_uncond, v_cond, v_fake):
        from . import score_difference_triton

        return score_difference_triton.dmd_score_difference(x0, x_d, t_d, v_uncond, v_cond, guidance, v_fake,
                                                            t_min)
    return dmd_score_difference_reference(x0, x_d, t_d, v_uncond, v_cond, guidance, v_fake, t_min)


def dmd_score_difference_eps(x0, x_t, alpha_bar, eps_uncond, eps_cond, guidance, eps_fake):
    """The DMD gradient ``g`` (fp32) from epsilon predictions, ``alpha_bar`` given per sample."""
    if _fused(x0, x_t, eps_uncond, eps_cond, eps_fake):
        from . import score_difference_triton

        return score_difference_triton.dmd_score_difference_eps(x0, x_t, alpha_bar, eps_uncond, eps_cond,
                                                                guidance, eps_fake)
    return dmd_score_difference_eps_reference(x0, x_t, alpha_bar, eps_uncond, eps_cond, guidance, eps_fake)


def dmd_loss_fused(x0, x_d, t_d, v_uncond, v_cond, guidance, v_fake, t_min: float = 0.001,
                   return_grad: bool = False):
    """DMD loss (fp32 scalar) with ``dL/dx0 = g / numel``; ``(loss, g)`` when ``return_grad``."""
    if _fused(x0, x_d, v_uncond, v_cond, v_fake):
        from . import score_difference_triton

        return score_difference_triton.dmd_loss_fused(x0, x_d, t_d, v_uncond, v_cond, guidance, v_fake, t_min,
                                                      return_grad)
    return dmd_loss_fused_reference(x0, x_d, t_d, v_uncond, v_cond, guidance, v_fake, t_min, return_grad)


def dmd_loss_fused_eps(x0, x_t, alpha_bar, eps_uncond, eps_cond, guidance, eps_fake,
                       return_grad: bool = False):
    """Epsilon-prediction twin of :func:`dmd_loss_fused`."""
    if _fused(x0, x_t, eps_uncond, eps_cond, eps_fake):
        from . import score_difference_triton

        return score_difference_triton.dmd_loss_fused_eps(x0, x_t, alpha_bar, eps_uncond, eps_cond, guidance,
                                                          eps_fake, return_grad)
    return dmd_loss_fused_eps_reference(x0, x_t, alpha_bar, eps_uncond, eps_cond, guidance, eps_fake,
                                        return_grad)


def lora_linear(x, weight, bias, lora_a, lora_b, scale):
    """``x W^T + b + scale (x A^T) B^T`` with a runtime (possibly per-sample) scale."""
    tensors = [x, weight, lora_a, lora_b] + ([bias] if bias is not None else [])
    zero = not isinstance(scale, Tensor) and scale == 0.0  # the reference's short-circuit: plain linear
    scale_grad = isinstance(scale, Tensor) and scale.requires_grad  # the fused backward treats scale as data
    if not zero and not scale_grad and _fused(*tensors):
        from . import lora_triton

        return lora_triton.lora_linear(x, weight, bias, lora_a, lora_b, scale)
    return lora_linear_reference(x, weight, bias, lora_a, lora_b, scale)


