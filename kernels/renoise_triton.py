"""Fused renoise ``(1 - t) x0 + t noise`` with a per-sample ``t``: one read of each input, one write.

Grid ``(blocks per sample, batch)``: each program loads its sample's ``t`` once (a scalar) and
streams one block. The backward writes both input gradients in one pass over the output gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import launch


@triton.jit
def _renoise_kernel(x0_ptr, noise_ptr, t_ptr, out_ptr, S, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < S
    offs = b.to(tl.int64) * S + idx
    t = tl.load(t_ptr + b)
    x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    noise = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out = (1.0 - t) * x0 + t * noise
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _renoise_backward_kernel(grad_ptr, t_ptr, dx0_ptr, dnoise_ptr, S, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < S
    offs = b.to(tl.int64) * S + idx
    t = tl.load(t_ptr + b)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx0_ptr + offs, ((1.0 - t) * g).to(dx0_ptr.dtype.element_ty), mask=mask)
    tl.store(dnoise_ptr + offs, (t * g).to(dnoise_ptr.dtype.element_ty), mask=mask)


def _grid(batch: int, per: int, block: int) -> tuple[int, int]:
    return (triton.cdiv(max(per, 1), block), batch)


def renoise_forward(x0: Tensor, noise: Tensor, t_vec: Tensor, out_dtype: torch.dtype) -> Tensor:
    """Launch the forward kernel on contiguous inputs; ``t_vec`` is fp32 ``(B,)``."""
    batch = x0.shape[0]
    per = x0.numel() // max(batch, 1)
    out = launch.alloc(tuple(x0.shape), out_dtype, x0.device)
    if x0.numel():
        block = launch.elementwise_block()
        _renoise_kernel[_grid(batch, per, block)](x0, noise, t_vec, out, per, BLOCK=block, num_warps=4)
    return out


class RenoiseFunction(torch.autograd.Function):
    """Autograd form of the fused renoise (``t`` is a constant: a sampled level, never trained)."""

    @staticmethod
    def forward(ctx, x0: Tensor, noise: Tensor, t_vec: Tensor, out_dtype: torch.dtype) -> Tensor:
        ctx.save_for_backward(t_vec)
        ctx.dtypes = (x0.dtype, noise.dtype)
        return renoise_forward(x0, noise, t_vec, out_dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (t_vec,) = ctx.saved_tensors
        grad = grad.contiguous()
        batch = grad.shape[0]
        per = grad.numel() // max(batch, 1)
        dx0 = launch.alloc(tuple(grad.shape), ctx.dtypes[0], grad.device)
        dnoise = launch.alloc(tuple(grad.shape), ctx.dtypes[1], grad.device)
        if grad.numel():
            block = launch.elementwise_block()
            _renoise_backward_kernel[_grid(batch, per, block)](grad, t_vec, dx0, dnoise, per, BLOCK=block,
                                                               num_warps=4)
        return dx0, dnoise, None, None


def renoise(x0: Tensor, noise: Tensor, t: float | Tensor) -> Tensor:
    """``(1 - t) x0 + t noise``; output dtype as the reference's (torch promotion of the same expression)."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have one shape")
    launch.check_device(x0, noise)
    out_dtype = torch.promote_types(x0.dtype, noise.dtype)
    if isinstance(t, Tensor) and t.ndim >= 1:  # a per-sample tensor takes part in type promotion
        out_dtype = torch.promote_types(out_dtype, t.dtype)
    batch = x0.shape[0] if x0.ndim else 1
    t_vec = launch.per_sample(t, batch, x0.device, "t")
    return RenoiseFunction.apply(x0.contiguous(), noise.contiguous(), t_vec, out_dtype)
