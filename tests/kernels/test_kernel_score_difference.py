"""The fused DMD score difference (flow, epsilon) and fused loss against float64 formulas of ALGORITHM.md."""

from __future__ import annotations

import math

import pytest
import torch

from dmdr import kernels
from tests.kernels.kernel_checks import assert_scaled_close, gpu_specialization_keys

T_MIN = 0.001


def _oracle_g(x0, x_d, u, c, f, w, to_x0):
    """g of ALGORITHM.md step 4, float64, one sample at a time; ``to_x0(b, x_d, pred)`` the clean estimate."""
    out = torch.empty(x0.shape, dtype=torch.float64)
    for b in range(x0.shape[0]):
        real = u[b].double() + w[b] * (c[b].double() - u[b].double())
        p_r = x0[b].double() - to_x0(b, x_d[b].double(), real)
        p_f = x0[b].double() - to_x0(b, x_d[b].double(), f[b].double())
        g = (p_r - p_f) / (p_r.abs().mean() + 1e-8)
        out[b] = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
    return out


def _oracle_flow(x0, x_d, t, u, c, w, f, t_min=T_MIN):
    t = [float(v) for v in t]
    return _oracle_g(x0, x_d, u, c, f, w, lambda b, xd, pred: xd + (t_min - t[b]) * pred)


def _oracle_eps(x0, x_t, ab, u, c, w, f):
    ab = [float(v) for v in ab]
    def to_x0(b, xt, pred):
        return (xt - math.sqrt(1 - ab[b]) * pred) / math.sqrt(ab[b])

    return _oracle_g(x0, x_t, u, c, f, w, to_x0)


def _inputs(gen, shape, dtype):
    x0, x_d, u, c, f = (torch.randn(*shape, generator=gen).to(dtype) for _ in range(5))
    t = torch.rand(shape[0], generator=gen) * 0.98 + 0.01
    return x0, x_d, t, u, c, f


def _guidance(kind, batch, gen):
    if kind == "float":
        return 4.5, [4.5] * batch
    if kind == "0d":
        return torch.tensor(3.25), [3.25] * batch
    w = torch.rand(batch, generator=gen) * 6 + 1
    return w, w.tolist()


SHAPES = [(3, 16, 37, 29), (1, 4, 1, 1), (2, 3, 5), (5, 7), (2, 4, 33, 31)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("guidance", ["float", "0d", "per_sample"])
def test_flow_matches_float64(triton_backend, poison, gen, shape, dtype, guidance):
    x0, x_d, t, u, c, f = _inputs(gen, shape, dtype)
    w, w_list = _guidance(guidance, shape[0], gen)
    got = kernels.dmd_score_difference(x0, x_d, t, u, c, w, f, T_MIN)
    assert got.dtype == torch.float32 and got.shape == x0.shape
    assert torch.isfinite(got).all(), "an output element was never written (poison survived)"
    assert len(poison) >= 2, "the Triton path did not run"
    assert_scaled_close(got, _oracle_flow(x0, x_d, t, u, c, w_list, f), 2e-5, "g")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_eps_matches_float64(triton_backend, poison, gen, dtype):
    shape = (3, 4, 13, 11)
    x0, x_t, _, u, c, f = _inputs(gen, shape, dtype)
    ab = torch.rand(shape[0], generator=gen) * 0.9 + 0.05
    w = torch.tensor([1.0, 3.0, 7.5])
    got = kernels.dmd_score_difference_eps(x0, x_t, ab, u, c, w, f)
    assert torch.isfinite(got).all()
    assert_scaled_close(got, _oracle_eps(x0, x_t, ab, u, c, w.tolist(), f), 2e-5, "g (eps)")


def test_many_blocks_per_sample(triton_backend, poison, gen, monkeypatch):
    """Small blocks: the per-sample mean is assembled from many partial sums (and a ragged last block)."""
    from dmdr.kernels import launch

    monkeypatch.setattr(launch, "elementwise_block", lambda: 64)
    shape = (3, 3, 17, 13)  # 663 elements a sample: 11 blocks, the last one 23 long
    x0, x_d, t, u, c, f = _inputs(gen, shape, torch.float32)
    got = kernels.dmd_score_difference(x0, x_d, t, u, c, 2.0, f)
    assert torch.isfinite(got).all()
    assert_scaled_close(got, _oracle_flow(x0, x_d, t, u, c, [2.0] * 3, f), 2e-5, "g")


def test_normalisation_is_per_sample(triton_backend, gen):
    shape = (3, 4, 9, 7)
    x0, x_d, t, u, c, f = _inputs(gen, shape, torch.float32)
    for a in (x0, x_d, u, c, f):
        a[1] *= 1000.0  # one sample 1000x larger must not change the others' normalisers
    got = kernels.dmd_score_difference(x0, x_d, t, u, c, 4.0, f)
    assert_scaled_close(got, _oracle_flow(x0, x_d, t, u, c, [4.0] * 3, f), 2e-5, "g")
    for b in range(3):
        one = [a[b:b + 1] for a in (x0, x_d, t, u, c, f)]
        alone = kernels.dmd_score_difference(*one[:5], 4.0, one[5])
        assert_scaled_close(got[b:b + 1], alone, 1e-6, f"sample {b} alone")
    # The big sample's g is O(1) like the others: it was divided by its own mean |p_r|.
    assert got[1].abs().mean() < 100 * got[0].abs().mean()


def test_zeros(triton_backend, poison):
    shape = (2, 3, 5, 5)
    z = torch.zeros(shape)
    t = torch.tensor([0.3, 0.8])
    got = kernels.dmd_score_difference(z, z, t, z, z, 4.0, z)
    assert torch.equal(got, torch.zeros(shape))  # 0 / (0 + eps) = 0
    # p_r == 0 everywhere but p_f != 0: divided by eps alone, large but finite, exactly as the formula says.
    f = torch.full(shape, 1e-3)
    got = kernels.dmd_score_difference(z, z, t, z, z, 4.0, f)
    ref = _oracle_flow(z, z, t, z, z, [4.0, 4.0], f)
    assert torch.isfinite(got).all()
    assert torch.allclose(got.double(), ref, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_non_finite_inputs(triton_backend, poison, gen):
    shape = (3, 2, 6, 5)
    x0, x_d, t, u, c, f = _inputs(gen, shape, torch.float32)
    c[0, 1, 2, 3] = float("inf")  # p_r infinite -> sample 0's normaliser is inf -> its g is all zero
    f[1, 0, 0, 4] = float("nan")  # p_f NaN at one element -> that element is 0, the rest of sample 1 normal
    x0[2, 0, 1, 1] = float("-inf")  # x0 infinite -> p_r inf -> sample 2 zeroed
    got = kernels.dmd_score_difference(x0, x_d, t, u, c, 4.0, f)
    ref = _oracle_flow(x0, x_d, t, u, c, [4.0] * 3, f)
    assert torch.isfinite(got).all()
    assert torch.equal(got[0], torch.zeros_like(got[0])) and torch.equal(got[2], torch.zeros_like(got[2]))
    assert got[1, 0, 0, 4] == 0 and got[1].abs().sum() > 0
    assert_scaled_close(got, ref, 2e-5, "g")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("param", ["flow", "eps"])
def test_fused_loss_forward_backward(triton_backend, poison, gen, dtype, param):
    shape = (2, 4, 11, 9)
    x0, x_d, t, u, c, f = _inputs(gen, shape, dtype)
    x0.requires_grad_(True)
    preds = [a.clone().requires_grad_(True) for a in (u, c, f)]  # predictions get no gradient (stop-grad)
    if param == "flow":
        loss, g = kernels.dmd_loss_fused(x0, x_d, t, *preds[:2], 4.0, preds[2], T_MIN, return_grad=True)
        ref_g = _oracle_flow(x0.detach(), x_d, t, u, c, [4.0, 4.0], f)
    else:
        ab = torch.tensor([0.3, 0.9])
        loss, g = kernels.dmd_loss_fused_eps(x0, x_d, ab, *preds[:2], 4.0, preds[2], return_grad=True)
        ref_g = _oracle_eps(x0.detach(), x_d, ab, u, c, [4.0, 4.0], f)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert_scaled_close(g, ref_g, 2e-5, "g")
    assert abs(loss.item() - 0.5 * (ref_g ** 2).mean().item()) <= 1e-5 * max(1.0, loss.item())
    (3.0 * loss).backward()
    assert x0.grad.dtype == dtype and torch.isfinite(x0.grad).all()
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    assert_scaled_close(x0.grad, 3.0 * ref_g / ref_g.numel(), tol, "dL/dx0 = g / numel")
    assert all(p.grad is None for p in preds)


def test_fused_loss_equals_library_loss(triton_backend, gen, monkeypatch):
    """The fused loss and its gradient equal dmd_loss(x0, score_difference(...)) of dmdr.losses.dmd."""
    from dmdr.losses.dmd import dmd_loss, score_difference
    from dmdr.parameterization import FlowMatching

    shape = (2, 3, 7, 5)
    x0, x_d, t, u, c, f = _inputs(gen, shape, torch.float32)
    a = x0.clone().requires_grad_(True)
    kernels.dmd_loss_fused(a, x_d, t, u, c, 5.0, f, T_MIN).backward()
    monkeypatch.setenv("DMDR_KERNELS", "reference")
    b = x0.clone().requires_grad_(True)
    dmd_loss(b, score_difference(FlowMatching(T_MIN), b, x_d, t, u, c, 5.0, f)).backward()
    assert_scaled_close(a.grad, b.grad, 1e-6, "grad")


def test_library_dispatch_flow_and_eps(triton_backend, gen, monkeypatch):
    """dmdr.losses.dmd.score_difference takes the fused kernel for both parameterizations, same result."""
    from dmdr.losses.dmd import score_difference
    from dmdr.parameterization import EpsilonPrediction, FlowMatching

    shape = (3, 2, 6, 7)
    x0, x_d, t, u, c, f = _inputs(gen, shape, torch.float32)
    eps_param = EpsilonPrediction(torch.linspace(0.999, 0.01, 1000))
    for param in (FlowMatching(0.002), eps_param):
        for t_arg in (t, 0.4):
            fused = score_difference(param, x0, x_d, t_arg, u, c, 3.0, f)
            monkeypatch.setenv("DMDR_KERNELS", "reference")
            ref = score_difference(param, x0, x_d, t_arg, u, c, 3.0, f)
            monkeypatch.setenv("DMDR_KERNELS", "triton")
            assert_scaled_close(fused, ref, 1e-5, f"{param} t={t_arg}")


def test_runtime_values_reuse_the_compiled_kernel(triton_backend, gen):
    """New t_d, guidance and t_min values are data: the GPU JIT key stays the same."""
    from dmdr.kernels import score_difference_triton as sd

    shape = (2, 3, 8, 8)
    x0, x_d, t, u, c, f = _inputs(gen, shape, torch.float32)
    runs = ((4.0, t, 0.001), (torch.tensor([1.0, 9.0]), t.flip(0), 0.02), (torch.tensor(2.0), 0.5, 0.1))
    pass1 = gpu_specialization_keys(sd._score_diff_pass1)
    pass2 = gpu_specialization_keys(sd._score_diff_pass2)
    with pass1 as keys1, pass2 as keys2:
        for w, tt, t_min in runs:
            kernels.dmd_score_difference(x0, x_d, tt, u, c, w, f, t_min)
    assert len(keys1) == 3 and len(set(keys1)) == 1, keys1
    assert len(keys2) == 3 and len(set(keys2)) == 1, keys2
