"""Fused DMD score difference: CFG combine, both clean estimates, per-sample normalisation, in two passes.

ALGORITHM.md, generator update, steps 3-4, per sample ``b`` of ``S = C*H*W`` elements::

    real    = u + w_b (c - u)                          (CFG combine of the real score)
    x0_real = x_d + (t_min - t_b) real                 (flow; eps: (x_t - sqrt(1-ab_b) real) / sqrt(ab_b))
    x0_fake = x_d + (t_min - t_b) fake
    p_r, p_f = x0 - x0_real, x0 - x0_fake
    g = (p_r - p_f) / (mean |p_r| + 1e-8),  non-finite -> 0

Pass 1 (grid: blocks x batch) reads the five inputs once, writes the unnormalised ``p_r - p_f`` into the
fp32 output and one partial ``sum |p_r|`` per block. Pass 2 re-reads that fp32 buffer, sums its
sample's partials (a few hundred floats, cached), divides, zeroes non-finite values and writes in
place; with ``WITH_LOSS`` it also emits per-block partial sums of ``g^2`` for the loss.

Why store the difference instead of recomputing it from the inputs in pass 2: the stored buffer costs
8 bytes an element (fp32 write + read), a recompute re-reads x0, x_d, u, c (8 bytes in bf16, 16 in
fp32), so storing is never worse. Nothing else is materialised (no clean estimates, no CFG output).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import launch

EPS = 1e-8


@triton.jit
def _score_diff_pass1(x0_ptr, xd_ptr, u_ptr, c_ptr, f_ptr, t_ptr, w_ptr, d_ptr, part_ptr, S, NB, t_min,
                      EPS_PRED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < S
    offs = b.to(tl.int64) * S + idx
    t = tl.load(t_ptr + b)  # t_d (flow) or alpha-bar (eps), per sample
    w = tl.load(w_ptr + b)
    x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    xd = tl.load(xd_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    f = tl.load(f_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    real = u + w * (c - u)
    if EPS_PRED:
        sq_noise = tl.sqrt(1.0 - t)
        sq_signal = tl.sqrt(t)
        x0_real = (xd - sq_noise * real) / sq_signal
        x0_fake = (xd - sq_noise * f) / sq_signal
    else:
        k = t_min - t
        x0_real = xd + k * real
        x0_fake = xd + k * f
    p_r = x0 - x0_real
    p_f = x0 - x0_fake
    tl.store(d_ptr + offs, p_r - p_f, mask=mask)
    tl.store(part_ptr + b * NB + pid, tl.sum(tl.where(mask, tl.abs(p_r), 0.0), axis=0))


@triton.jit
def _score_diff_pass2(d_ptr, part_ptr, loss_part_ptr, S, NB, eps, NB_POW2: tl.constexpr, BLOCK: tl.constexpr,
                      WITH_LOSS: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    j = tl.arange(0, NB_POW2)
    parts = tl.load(part_ptr + b * NB + j, mask=j < NB, other=0.0)
    norm = tl.sum(parts, axis=0) / S + eps
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < S
    offs = b.to(tl.int64) * S + idx
    d = tl.load(d_ptr + offs, mask=mask, other=0.0)
    g = d / norm
    g = tl.where(tl.abs(g) < float("inf"), g, 0.0)  # NaN fails the comparison too
    tl.store(d_ptr + offs, g, mask=mask)
    if WITH_LOSS:
        gm = tl.where(mask, g, 0.0)
        tl.store(loss_part_ptr + b * NB + pid, tl.sum(gm * gm, axis=0))


@triton.jit
def _scale_cast_kernel(g_ptr, out_ptr, go_ptr, inv_numel, N, BLOCK: tl.constexpr):
    # dL/dx0 = grad_output * g / numel, in x0's dtype; grad_output read from memory (no host sync).
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    s = tl.load(go_ptr) * inv_numel
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, (g * s).to(out_ptr.dtype.element_ty), mask=mask)


def _prepare(x0: Tensor, x_d: Tensor, t: float | Tensor, u: Tensor, c: Tensor, w: float | Tensor, f: Tensor,
             t_name: str):
    shape = x0.shape
    for name, other in (("x_d", x_d), ("uncond", u), ("cond", c), ("fake", f)):
        if other.shape != shape:
            raise ValueError(f"{name} has shape {tuple(other.shape)}, x0 has {tuple(shape)}")
    if x0.ndim < 1:
        raise ValueError("x0 must have a batch dimension")
    launch.check_device(x0, x_d, u, c, f)
    batch = shape[0]
    t_vec = launch.per_sample(t, batch, x0.device, t_name)
    w_vec = launch.per_sample(w, batch, x0.device, "guidance")
    return t_vec, w_vec


def _contiguous(*tensors: Tensor) -> list[Tensor]:
    return [a.detach().contiguous() for a in tensors]


def _launch(tensors: list[Tensor], t_vec: Tensor, w_vec: Tensor, t_min: float, eps_pred: bool,
            with_loss: bool) -> tuple[Tensor, Tensor | None]:
    x0 = tensors[0]
    batch = x0.shape[0]
    per = x0.numel() // max(batch, 1)
    g = launch.alloc(tuple(x0.shape), torch.float32, x0.device)
    if x0.numel() == 0:
        return g, (torch.zeros(1, device=x0.device) if with_loss else None)
    block = launch.elementwise_block()
    nb = triton.cdiv(per, block)
    parts = launch.alloc((batch, nb), torch.float32, x0.device)
    loss_parts = launch.alloc((batch, nb), torch.float32, x0.device) if with_loss else parts
    grid = (nb, batch)
    _score_diff_pass1[grid](*tensors, t_vec, w_vec, g, parts, per, nb, float(t_min), EPS_PRED=eps_pred,
                            BLOCK=block, num_warps=4)
    _score_diff_pass2[grid](g, parts, loss_parts, per, nb, EPS, NB_POW2=triton.next_power_of_2(nb),
                            BLOCK=block, WITH_LOSS=with_loss, num_warps=4)
    return g, (loss_parts if with_loss else None)


def dmd_score_difference(x0: Tensor, x_d: Tensor, t_d: float | Tensor, v_uncond: Tensor, v_cond: Tensor,
                         guidance: float | Tensor, v_fake: Tensor, t_min: float = 0.001) -> Tensor:
    """The DMD gradient ``g`` (fp32) from velocity predictions, two passes over memory."""
    t_vec, w_vec = _prepare(x0, x_d, t_d, v_uncond, v_cond, guidance, v_fake, "t_d")
    tensors = _contiguous(x0, x_d, v_uncond, v_cond, v_fake)
    return _launch(tensors, t_vec, w_vec, t_min, False, False)[0]


def dmd_score_difference_eps(x0: Tensor, x_t: Tensor, alpha_bar: float | Tensor, eps_uncond: Tensor,
                             eps_cond: Tensor, guidance: float | Tensor, eps_fake: Tensor) -> Tensor:
    """The DMD gradient ``g`` (fp32) from epsilon predictions with per-sample alpha-bar."""
    ab_vec, w_vec = _prepare(x0, x_t, alpha_bar, eps_uncond, eps_cond, guidance, eps_fake, "alpha_bar")
    tensors = _contiguous(x0, x_t, eps_uncond, eps_cond, eps_fake)
    return _launch(tensors, ab_vec, w_vec, 0.0, True, False)[0]


class DMDLossFunction(torch.autograd.Function):
    """``0.5 mean g^2`` forward; backward sends ``grad_output * g / numel`` to ``x0`` only.

    This is ``0.5 mean (x0 - stopgrad(x0 - g))^2`` of ALGORITHM.md step 5 without building the
    target: ``g`` is saved (one fp32 buffer), the clean estimates never exist.
    """

    @staticmethod
    def forward(ctx, x0: Tensor, x_d: Tensor, t_vec: Tensor, u: Tensor, c: Tensor, w_vec: Tensor, f: Tensor,
                t_min: float, eps_pred: bool) -> Tensor:
        tensors = _contiguous(x0, x_d, u, c, f)
        g, loss_parts = _launch(tensors, t_vec, w_vec, t_min, eps_pred, True)
        ctx.save_for_backward(g)
        ctx.x0_dtype = x0.dtype
        ctx.mark_non_differentiable(g)
        return 0.5 * loss_parts.sum() / max(g.numel(), 1), g

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_g: Tensor | None = None):
        (g,) = ctx.saved_tensors
        dx0 = launch.alloc(tuple(g.shape), ctx.x0_dtype, g.device)
        n = g.numel()
        if n:
            go = grad_loss.detach().to(torch.float32).reshape(1).contiguous()
            block = launch.elementwise_block()
            _scale_cast_kernel[(triton.cdiv(n, block),)](g, dx0, go, 1.0 / n, n, BLOCK=block, num_warps=4)
        return dx0, None, None, None, None, None, None, None, None


def _loss(x0, x_d, t, u, c, w, f, t_min, eps_pred, t_name, return_grad):
    t_vec, w_vec = _prepare(x0, x_d, t, u, c, w, f, t_name)
    loss, g = DMDLossFunction.apply(x0, x_d.detach(), t_vec, u.detach(), c.detach(), w_vec, f.detach(), t_min,
                                    eps_pred)
    return (loss, g) if return_grad else loss


def dmd_loss_fused(x0: Tensor, x_d: Tensor, t_d: float | Tensor, v_uncond: Tensor, v_cond: Tensor,
                   guidance: float | Tensor, v_fake: Tensor, t_min: float = 0.001, return_grad: bool = False):
    """The DMD loss (fp32 scalar) whose gradient w.r.t. ``x0`` is ``g / numel`` (velocity predictions)."""
    return _loss(x0, x_d, t_d, v_uncond, v_cond, guidance, v_fake, t_min, False, "t_d", return_grad)


def dmd_loss_fused_eps(x0: Tensor, x_t: Tensor, alpha_bar: float | Tensor, eps_uncond: Tensor,
                       eps_cond: Tensor, guidance: float | Tensor, eps_fake: Tensor,
                       return_grad: bool = False):
    """The DMD loss (fp32 scalar) whose gradient w.r.t. ``x0`` is ``g / numel`` (epsilon predictions)."""
    return _loss(x0, x_t, alpha_bar, eps_uncond, eps_cond, guidance, eps_fake, 0.0, True, "alpha_bar",
                 return_grad)
