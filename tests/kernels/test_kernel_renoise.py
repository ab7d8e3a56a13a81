"""The fused renoise ``(1 - t) x0 + t noise`` against a float64 formula, forward and backward."""

from __future__ import annotations

import pytest
import torch

from dmdr import kernels
from tests.kernels.kernel_checks import assert_scaled_close, gpu_specialization_keys

SHAPES = [(3, 16, 37, 29), (1, 4, 1, 1), (2, 3, 5), (6,)]


def _oracle(x0, noise, t_list):
    out = torch.empty(x0.shape, dtype=torch.float64)
    for b, t in enumerate(t_list):
        out[b] = (1 - t) * x0[b].double() + t * noise[b].double()
    return out


def _t(kind, batch, gen):
    if kind == "float":
        return 0.37, [0.37] * batch
    if kind == "0d":
        return torch.tensor(0.81), [0.81] * batch
    t = torch.rand(batch, generator=gen)
    return t, t.tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("t_kind", ["float", "0d", "per_sample"])
def test_forward_matches_float64(triton_backend, poison, gen, shape, dtype, t_kind):
    x0, noise = (torch.randn(*shape, generator=gen).to(dtype) for _ in range(2))
    t, t_list = _t(t_kind, shape[0], gen)
    got = kernels.renoise(x0, noise, t)
    assert len(poison) == 1, "the Triton path did not run"
    assert got.dtype == kernels.renoise_reference(x0, noise, t).dtype  # torch's promotion, as the reference
    assert torch.isfinite(got).all(), "an output element was never written (poison survived)"
    tol = 1e-6 if got.dtype == torch.float32 else 1e-3
    assert_scaled_close(got, _oracle(x0, noise, t_list), tol, "renoise")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_backward_matches_float64(triton_backend, poison, gen, dtype):
    shape = (3, 2, 13, 11)
    x0, noise = (torch.randn(*shape, generator=gen).to(dtype).requires_grad_(True) for _ in range(2))
    t = torch.rand(3, generator=gen)
    out = kernels.renoise(x0, noise, t)
    grad = torch.randn(out.shape, generator=gen).to(out.dtype)
    out.backward(grad)
    tv = t.double().view(-1, 1, 1, 1)
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    assert x0.grad.dtype == dtype and noise.grad.dtype == dtype
    assert_scaled_close(x0.grad, (1 - tv) * grad.double(), tol, "d/dx0")
    assert_scaled_close(noise.grad, tv * grad.double(), tol, "d/dnoise")


def test_trainable_t_takes_the_reference(triton_backend, poison, gen):
    x0, noise = torch.randn(2, 3, generator=gen), torch.randn(2, 3, generator=gen)
    t = torch.tensor([0.2, 0.7], requires_grad=True)
    kernels.renoise(x0, noise, t).sum().backward()
    assert len(poison) == 0  # the kernel treats t as data; a t that needs a gradient goes to torch
    assert torch.allclose(t.grad, (noise - x0).sum(1))


def test_new_t_reuses_the_compiled_kernel(triton_backend, gen):
    from dmdr.kernels import renoise_triton

    x0, noise = torch.randn(2, 5, 7, generator=gen), torch.randn(2, 5, 7, generator=gen)
    with gpu_specialization_keys(renoise_triton._renoise_kernel) as keys:
        for t in (0.1, torch.tensor([0.3, 0.9]), torch.tensor(0.5)):
            kernels.renoise(x0, noise, t)
    assert len(keys) == 3 and len(set(keys)) == 1, keys
