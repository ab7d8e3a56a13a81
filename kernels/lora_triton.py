"""Fused LoRA linear ``x W^T + b + s (x A^T) B^T`` with a runtime, possibly per-sample, scale ``s``.

Two launches per product instead of eager's five passes over the ``(M, N)`` output:

1. ``_lora_down_kernel``: ``h = s_row * (x A^T)``, ``(M, r)`` in fp32 (one read of ``x``; tiny output).
2. ``_lora_linear_kernel``: the main GEMM tile loop of ``x W^T``; its epilogue adds ``h_tile B^T_tile``
   (an extra ``K = r`` dot on the accumulator in registers) and the bias, then stores once.

The scale lives in memory (an fp32 vector indexed ``row // rows_per_scale``), so a new value, a
per-sample vector, or DynaDG's cosine decay is new data for the same compiled kernel; it is never a
``tl.constexpr`` nor a specialised argument.

Backward reuses both kernels on strided views (no copies of the weights):
``dx = dY W + (s * (dY B)) A`` is the same product with ``W^T, B^T, A^T`` in the roles of
``W, A, B``; ``dA = (s * dY B)^T x``, ``dB = dY^T h``, ``dW = dY^T x`` and ``db = sum dY`` are
reductions over the rows and go to cuBLAS (``torch.matmul``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import launch


def _mm_configs() -> list[triton.Config]:
    if launch.interpreting():  # one config: the interpreter cannot benchmark (no do_bench)
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4)]
    shapes = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (64, 128, 64, 4, 4),
              (128, 64, 64, 4, 4), (128, 128, 32, 4, 4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


def _down_configs() -> list[triton.Config]:
    if launch.interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_K": 32}, num_warps=4)]
    shapes = [(64, 128, 4, 3), (128, 64, 4, 3), (64, 64, 4, 4), (32, 128, 4, 4), (128, 128, 8, 3)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_K": k}, num_warps=w, num_stages=s) for m, k, w, s in shapes]


@triton.autotune(configs=_down_configs(), key=["M", "K", "R"])
@triton.jit
def _lora_down_kernel(x_ptr, a_ptr, s_ptr, h_ptr, M, K, R, rows_per_scale,
                      stride_xm, stride_xk, stride_ar, stride_ak, stride_hm, stride_hr,
                      BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    r_ok = rr < R
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    a_cols = a_ptr + rr.to(tl.int64)[None, :] * stride_ar
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        xt = tl.load(x_rows + kk[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        at = tl.load(a_cols + kk[:, None] * stride_ak, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(xt, at.to(x_ptr.dtype.element_ty), acc, input_precision=PRECISION)
    s = tl.load(s_ptr + rm // rows_per_scale, mask=m_ok, other=0.0)
    acc = acc * s[:, None]
    h_ptrs = h_ptr + rm.to(tl.int64)[:, None] * stride_hm + rr[None, :] * stride_hr
    tl.store(h_ptrs, acc, mask=m_ok[:, None] & r_ok[None, :])


@triton.autotune(configs=_mm_configs(), key=["M", "N", "K", "R"])
@triton.jit
def _lora_linear_kernel(x_ptr, w_ptr, bias_ptr, h_ptr, b_ptr, out_ptr, M, N, K, R,
                        stride_xm, stride_xk, stride_wn, stride_wk, stride_hm, stride_hr,
                        stride_bn, stride_br, stride_om, stride_on,
                        HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr):
    # Grouped tile order: GROUP_M row blocks share their W column blocks in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    # Out-of-range rows/columns read row 0 / column 0 (in bounds) and are never stored: no mask needed.
    rm_safe = tl.where(m_ok, rm, 0).to(tl.int64)
    rn_safe = tl.where(n_ok, rn, 0).to(tl.int64)
    x_rows = x_ptr + rm_safe[:, None] * stride_xm
    w_cols = w_ptr + rn_safe[None, :] * stride_wn
    dt = x_ptr.dtype.element_ty  # the dots run in x's dtype (fp32 accumulation)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        xt = tl.load(x_rows + kk[None, :] * stride_xk, mask=k_ok[None, :], other=0.0)
        wt = tl.load(w_cols + kk[:, None] * stride_wk, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(xt, wt.to(dt), acc, input_precision=PRECISION)
    # LoRA epilogue: acc += (s * x A^T)[rows] @ B^T[:, cols], K = r, on the accumulator in registers.
    rr = tl.arange(0, BLOCK_R)
    h_rows = h_ptr + rm_safe[:, None] * stride_hm
    b_cols = b_ptr + rn_safe[None, :] * stride_bn
    for r0 in range(0, R, BLOCK_R):
        r = r0 + rr
        r_ok = r < R
        ht = tl.load(h_rows + r[None, :] * stride_hr, mask=r_ok[None, :], other=0.0)
        bt = tl.load(b_cols + r[:, None] * stride_br, mask=r_ok[:, None], other=0.0)
        acc = tl.dot(ht.to(dt), bt.to(dt), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn_safe).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn.to(tl.int64)[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _precision(dtype: torch.dtype) -> str:
    # Mirror torch: fp32 matmuls use TF32 only when torch allows it for cuBLAS.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _block_r(rank: int) -> int:
    return min(max(16, triton.next_power_of_2(max(rank, 1))), 64)


def lora_down(x2: Tensor, lora_a: Tensor, scale_vec: Tensor, rows_per_scale: int) -> Tensor:
    """``scale[row // rows_per_scale] * (x2 @ lora_a^T)``, fp32 ``(M, r)``; ``lora_a`` may be strided."""
    m, k = x2.shape
    r = lora_a.shape[0]
    h = launch.alloc((m, r), torch.float32, x2.device)
    if m == 0 or r == 0:
        return h
    block_r = _block_r(r)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(r, block_r))

    _lora_down_kernel[grid](x2, lora_a, scale_vec, h, m, k, r, rows_per_scale,
                            x2.stride(0), x2.stride(1), lora_a.stride(0), lora_a.stride(1),
                            h.stride(0), h.stride(1),
                            BLOCK_R=block_r, PRECISION=_precision(x2.dtype))
    return h


def lora_matmul(x2: Tensor, weight: Tensor, bias: Tensor | None, h: Tensor, lora_b: Tensor,
                out_dtype: torch.dtype) -> Tensor:
    """``x2 @ weight^T + bias + h @ lora_b^T`` in one GEMM launch (``h`` may have 0 columns: plain GEMM)."""
    m, k = x2.shape
    n = weight.shape[0]
    r = h.shape[1]
    out = launch.alloc((m, n), out_dtype, x2.device)
    if m == 0 or n == 0:
        return out

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _lora_linear_kernel[grid](x2, weight, bias if bias is not None else x2, h, lora_b, out, m, n, k, r,
                              x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1),
                              h.stride(0), h.stride(1), lora_b.stride(0), lora_b.stride(1),
                              out.stride(0), out.stride(1),
                              HAS_BIAS=bias is not None, BLOCK_R=_block_r(r), PRECISION=_precision(x2.dtype))
    return out


class LoRALinearFunction(torch.autograd.Function):
    """Autograd form: grads for ``x``, ``A``, ``B``, and ``W``/``b`` when they require them.

    ``scale_vec`` is a constant (fp32, one entry per group of ``rows_per_scale`` rows).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                scale_vec: Tensor, rows_per_scale: int) -> Tensor:
        k = x.shape[-1]
        x2 = x.reshape(-1, k)
        h = lora_down(x2, lora_a, scale_vec, rows_per_scale)
        out = lora_matmul(x2, weight, bias, h, lora_b, x.dtype)
        ctx.save_for_backward(x2, weight, lora_a, lora_b, h, scale_vec)
        ctx.rows_per_scale = rows_per_scale
        ctx.has_bias = bias is not None
        ctx.x_shape = x.shape
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x2, weight, lora_a, lora_b, h, scale_vec = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_lb = ctx.needs_input_grad[:5]
        dy = grad_out.reshape(-1, weight.shape[0])
        dx = dw = db = da = dlb = None
        if need_x or need_a:
            # u = s * (dY B): the LoRA "down" product of the backward, with B^T in A's role.
            u = lora_down(dy, lora_b.t(), scale_vec, ctx.rows_per_scale)
            if need_x:
                dx = lora_matmul(dy, weight.t(), None, u, lora_a.t(), x2.dtype).reshape(ctx.x_shape)
            if need_a:
                da = (u.t().to(x2.dtype) @ x2).to(lora_a.dtype)
        if need_lb:
            dlb = (dy.t() @ h.to(dy.dtype)).to(lora_b.dtype)
        if need_w:
            dw = (dy.t() @ x2.to(dy.dtype)).to(weight.dtype)
        if need_b and ctx.has_bias:
            db = dy.sum(0, dtype=torch.float32).to(weight.dtype)
        return dx, dw, db, da, dlb, None, None


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                scale: float | Tensor) -> Tensor:
    """Fused ``x W^T + b + scale (x A^T) B^T``; ``scale`` a float, 0-d or per-sample ``(x.shape[0],)``."""
    if x.ndim < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} does not match weight {tuple(weight.shape)}")
    if lora_a.shape != (lora_b.shape[1], weight.shape[1]) or lora_b.shape[0] != weight.shape[0]:
        raise ValueError(f"LoRA A {tuple(lora_a.shape)} / B {tuple(lora_b.shape)} do not fit weight "
                         f"{tuple(weight.shape)}")
    tensors = [x, weight, lora_a, lora_b] + ([bias] if bias is not None else [])
    launch.check_device(*tensors)
    if torch.is_autocast_enabled(x.device.type):  # behave like F.linear under autocast
        dt = torch.get_autocast_dtype(x.device.type)
        x, weight, lora_a, lora_b = (t.to(dt) for t in (x, weight, lora_a, lora_b))
        bias = bias.to(dt) if bias is not None else None
    rows = x.numel() // max(x.shape[-1], 1)
    per_sample = isinstance(scale, Tensor) and scale.ndim == 1 and scale.shape[0] != 1
    groups = x.shape[0] if per_sample and x.ndim >= 2 else 1
    if per_sample and scale.shape[0] != (x.shape[0] if x.ndim >= 2 else -1):
        raise ValueError(f"per-sample LoRA scale {tuple(scale.shape)} does not match batch {tuple(x.shape)}")
    scale_vec = launch.per_sample(scale, groups, x.device, "LoRA scale")
    rows_per_scale = max(rows // groups, 1)
    with torch.autocast(x.device.type, enabled=False):
        return LoRALinearFunction.apply(x.contiguous(), weight, bias, lora_a, lora_b, scale_vec,
                                        rows_per_scale)
