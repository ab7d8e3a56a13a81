"""The fused LoRA linear against float64 formulas: forward, backward (all five gradients), runtime scales."""

from __future__ import annotations

import math

import pytest
import torch

from dmdr import kernels
from tests.kernels.kernel_checks import assert_scaled_close, gpu_specialization_keys

# (x shape, out features, rank): odd sizes, several tiles in M, N and K (the interpreter tiles are 32),
# a rank below the minimum dot width (masked) and one above the rank block (two epilogue chunks).
CASES = [((2, 37, 45), 40, 5), ((19, 33), 17, 3), ((1, 1, 16), 16, 1), ((3, 11, 24), 50, 70)]


def _case_id(case):
    shape, n, r = case
    return f"{'x'.join(map(str, shape))}-N{n}-r{r}"


def _params(gen, shape, n, r, dtype, bias=True):
    k = shape[-1]
    x = torch.randn(*shape, generator=gen)
    w = torch.randn(n, k, generator=gen) / math.sqrt(k)
    b = torch.randn(n, generator=gen) if bias else None
    a = torch.randn(r, k, generator=gen) / math.sqrt(k)
    lb = torch.randn(n, r, generator=gen) / math.sqrt(r)
    cast = [t.to(dtype) if t is not None else None for t in (x, w, b, a, lb)]
    return cast


def _oracle(x, w, b, a, lb, scale_rows):
    """float64 ``x W^T + b + s (x A^T) B^T``; ``scale_rows`` one value per leading index of x (or one)."""
    x, w, a, lb = (t.double() for t in (x, w, a, lb))
    s = torch.as_tensor(scale_rows, dtype=torch.float64)
    s = s.reshape(-1, *([1] * (x.ndim - 1))) if s.ndim else s
    out = x @ w.T + s * ((x @ a.T) @ lb.T)
    return out + b.double() if b is not None else out


def _scale(kind, shape, gen):
    if kind == "float":
        return 1.7, 1.7
    if kind == "0d":
        return torch.tensor(-0.6), -0.6
    s = torch.rand(shape[0], generator=gen) * 3
    return s, s


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("scale_kind", ["float", "0d", "per_sample"])
def test_forward_matches_float64(triton_backend, poison, gen, case, dtype, scale_kind):
    shape, n, r = case
    x, w, b, a, lb = _params(gen, shape, n, r, dtype, bias=scale_kind != "0d")
    scale, s_ref = _scale(scale_kind, shape, gen)
    got = kernels.lora_linear(x, w, b, a, lb, scale)
    assert len(poison) >= 2, "the Triton path did not run"
    assert got.dtype == dtype and got.shape == (*shape[:-1], n)
    assert torch.isfinite(got).all(), "an output element was never written (poison survived)"
    tol = 2e-5 if dtype == torch.float32 else 5e-3
    assert_scaled_close(got, _oracle(x, w, b, a, lb, s_ref), tol, "out")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES[:2] + CASES[3:], ids=_case_id)
@pytest.mark.parametrize("train_base", [False, True], ids=["frozen_base", "trained_base"])
def test_backward_matches_float64_autograd(triton_backend, poison, gen, case, dtype, train_base):
    """Gradcheck-style: the kernel's vector-Jacobian products equal float64 autograd of the formula."""
    shape, n, r = case
    params = _params(gen, shape, n, r, dtype)
    scale = torch.rand(shape[0], generator=gen) + 0.5 if len(shape) == 3 else 0.8
    grads_wanted = [True, train_base, train_base, True, True]  # x, W, b, A, B
    leaves = [p.clone().requires_grad_(want) for p, want in zip(params, grads_wanted)]
    out = kernels.lora_linear(*leaves, scale)
    dy = torch.randn(out.shape, generator=gen).to(dtype)
    out.backward(dy)

    ref_leaves = [p.double().requires_grad_(want) for p, want in zip(params, grads_wanted)]
    _oracle(*ref_leaves, scale).backward(dy.double())
    tol = 5e-5 if dtype == torch.float32 else 1e-2
    for name, leaf, ref in zip(("x", "W", "b", "A", "B"), leaves, ref_leaves):
        if not ref.requires_grad:
            assert leaf.grad is None, f"{name} got a gradient it did not ask for"
            continue
        assert leaf.grad is not None and leaf.grad.dtype == dtype, name
        assert torch.isfinite(leaf.grad).all(), f"d{name} not fully written"
        assert_scaled_close(leaf.grad, ref.grad, tol, f"d{name}")


def test_per_sample_scale_equals_separate_calls(triton_backend, gen):
    x, w, b, a, lb = _params(gen, (3, 9, 20), 12, 4, torch.float32)
    scales = torch.tensor([0.25, 0.25, 2.0])  # (s_r, s_r, s_f): the real and fake score in one batch
    batched = kernels.lora_linear(x, w, b, a, lb, scales)
    for i, s in enumerate(scales.tolist()):
        alone = kernels.lora_linear(x[i:i + 1], w, b, a, lb, s)
        assert_scaled_close(batched[i:i + 1], alone, 1e-6, f"sample {i}")


def test_zero_scale_is_the_plain_linear(triton_backend, poison, gen):
    x, w, b, a, lb = _params(gen, (2, 5, 16), 8, 2, torch.float32)
    x.requires_grad_(True)
    a.requires_grad_(True)
    out = kernels.lora_linear(x, w, b, a, lb, 0.0)
    assert torch.allclose(out, torch.nn.functional.linear(x, w, b))
    out.sum().backward()
    assert a.grad is None  # as the reference: the adapter is not part of the graph at scale 0.0
    zero_tensor = kernels.lora_linear(x, w, b, a, lb, torch.zeros(2))  # a tensor runs the kernel, delta 0
    assert torch.allclose(zero_tensor, torch.nn.functional.linear(x, w, b), atol=1e-6)


def test_changing_scale_reuses_the_compiled_kernels(triton_backend, gen):
    """DynaDG changes the scale every step: the GPU JIT key of both kernels must not depend on it."""
    from dmdr.kernels import lora_triton

    x, w, b, a, lb = _params(gen, (2, 37, 45), 40, 5, torch.float32)
    down = gpu_specialization_keys(lora_triton._lora_down_kernel)
    main = gpu_specialization_keys(lora_triton._lora_linear_kernel)
    with down as down_keys, main as main_keys:
        for s in (0.5, 1.25, torch.tensor(3.0)):
            kernels.lora_linear(x, w, b, a, lb, s)
        for s in (torch.tensor([0.5, 2.0]), torch.tensor([2.0, 0.0])):
            kernels.lora_linear(x, w, b, a, lb, s)
    assert len(down_keys) == 5 and len(set(down_keys)) == 1, down_keys
    assert len(main_keys) == 5 and len(set(main_keys)) == 1, main_keys
    # The key is sensitive to what does specialise: a rank past the rank block is a new compilation.
    _, _, _, a2, lb2 = _params(gen, (2, 37, 45), 40, 20, torch.float32)
    with gpu_specialization_keys(lora_triton._lora_linear_kernel) as other:
        kernels.lora_linear(x, w, b, a2, lb2, 0.5)
    assert other[0] != main_keys[0]


def test_scale_is_not_a_compile_time_constant():
    """The signature behind the test above: the scale reaches the kernels as a pointer, not a constexpr."""
    from dmdr.kernels import lora_triton
    from triton.runtime.jit import JITFunction

    for kernel in (lora_triton._lora_down_kernel, lora_triton._lora_linear_kernel):
        jit = JITFunction(kernel.fn.fn)
        constexprs = {p.name for p in jit.params if p.is_constexpr}
        assert not any("s_ptr" in c or "scale" in c for c in constexprs), constexprs
    down = JITFunction(lora_triton._lora_down_kernel.fn.fn)
    assert "s_ptr" in [p.name for p in down.params]


def test_lora_layers_run_through_the_kernel(triton_backend, poison, gen):
    """dmdr.models.lora's LoRALinear uses the fused path; per-sample scales set at runtime."""
    from torch import nn

    from dmdr.models.lora import inject_lora, lora_parameters

    model = nn.Sequential(nn.Linear(24, 24), nn.GELU(), nn.Linear(24, 16))
    scales = inject_lora(model, "critic", rank=4, alpha=8, targets=["0", "2"])
    for p in lora_parameters(model, "critic"):
        nn.init.normal_(p, std=0.2, generator=gen)
    x = torch.randn(3, 7, 24, generator=gen)
    per = torch.tensor([0.5, 0.5, 2.0])
    scales.set(critic=per)
    before = len(poison)
    out = model(x)
    assert len(poison) > before, "LoRALinear did not take the fused kernel"
    for i, s in enumerate(per.tolist()):
        h = x[i].double()
        for layer in (model[0], model[2]):
            base = layer.base
            a, lb = layer.lora_A["critic"].double(), layer.lora_B["critic"].double()
            h = h @ base.weight.double().T + base.bias.double() + s * 2.0 * (h @ a.T) @ lb.T
            if layer is model[0]:
                h = torch.nn.functional.gelu(h)
        assert_scaled_close(out[i], h, 2e-5, f"sample {i}")
