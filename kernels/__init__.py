"""Fused kernels (installed as ``dmdr.kernels``) with a plain-torch reference for each.

Dispatch: Triton on CUDA tensors, the torch reference elsewhere. ``DMDR_KERNELS=triton`` forces
Triton (also on CPU under ``TRITON_INTERPRET=1``), ``DMDR_KERNELS=reference`` forces the reference.
"""

from __future__ import annotations

import functools
import os

from torch import Tensor

from .reference import dmd_score_difference_reference, lora_linear_reference, renoise_reference

_BACKENDS = ("auto", "triton", "reference")


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


def renoise(x0: Tensor, noise: Tensor, t):
    """``(1 - t) x0 + t noise`` with per-sample ``t``."""
    return renoise_reference(x0, noise, t)


def dmd_score_difference(x0, x_d, t_d, v_uncond, v_cond, guidance, v_fake, t_min: float = 0.001):
    """The DMD gradient ``g`` from velocity predictions (see :mod:`dmdr.losses.dmd`)."""
    return dmd_score_difference_reference(x0, x_d, t_d, v_uncond, v_cond, guidance, v_fake, t_min)


def lora_linear(x, weight, bias, lora_a, lora_b, scale):
    """``x W^T + b + scale (x A^T) B^T`` with a runtime (possibly per-sample) scale."""
    return lora_linear_reference(x, weight, bias, lora_a, lora_b, scale)


__all__ = [
    "backend", "use_triton", "triton_available", "renoise", "dmd_score_difference", "lora_linear",
    "renoise_reference", "dmd_score_difference_reference", "lora_linear_reference",
]
