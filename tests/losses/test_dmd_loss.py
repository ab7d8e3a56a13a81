"""The DMD gradient and loss against an independent float64 implementation."""

import torch

from dmdr.losses.dmd import critic_loss, dmd_gradient, dmd_loss, score_difference
from dmdr.parameterization import FlowMatching


def _ref_grad(x0, xr, xf, eps=1e-8):
    out = torch.empty_like(x0, dtype=torch.float64)
    for b in range(x0.shape[0]):
        pr = x0[b].double() - xr[b].double()
        pf = x0[b].double() - xf[b].double()
        g = (pr - pf) / (pr.abs().mean() + eps)
        out[b] = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
    return out


def test_gradient_matches_formula_per_sample():
    g = torch.Generator().manual_seed(0)
    x0, xr, xf = (torch.randn(3, 4, 5, 6, generator=g) for _ in range(3))
    xr[1] *= 1000  # per-sample normalisation: one sample's scale must not leak into another's
    got = dmd_gradient(x0, xr, xf)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), _ref_grad(x0, xr, xf), rtol=1e-5, atol=1e-6)


def test_non_finite_zeroed():
    x0 = torch.zeros(2, 3)
    xr = torch.tensor([[1.0, float("inf"), 2.0], [0.0, 0.0, 0.0]])
    xf = torch.tensor([[0.0, 1.0, float("nan")], [0.0, 0.0, 0.0]])
    got = dmd_gradient(x0, xr, xf)
    assert torch.isfinite(got).all()
    # all-zero sample: 0 / eps = 0
    assert torch.equal(got[1], torch.zeros(3))


def test_loss_gradient_is_g_over_numel():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 3, 4, generator=g, requires_grad=True)
    grad = torch.randn(2, 3, 4, generator=g)
    loss = dmd_loss(x0, grad)
    assert abs(loss.item() - 0.5 * torch.mean(grad.double() ** 2).item()) < 1e-6
    loss.backward()
    assert torch.allclose(x0.grad, grad / grad.numel(), atol=1e-7)


def test_score_difference_chain():
    g = torch.Generator().manual_seed(2)
    shape = (3, 2, 5, 5)
    x0, x_d, vu, vc, vf = (torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(5))
    t_d = torch.tensor([0.2, 0.6, 0.95], dtype=torch.float64)
    w, t_min = 4.5, 0.001
    got = score_difference(FlowMatching(t_min), x0, x_d, t_d, vu, vc, w, vf)
    tt = t_d.view(-1, 1, 1, 1)
    v_real = vu + w * (vc - vu)
    x0_real = x_d + (t_min - tt) * v_real
    x0_fake = x_d + (t_min - tt) * vf
    assert torch.allclose(got.double(), _ref_grad(x0, x0_real, x0_fake), rtol=1e-5, atol=1e-6)


def test_critic_loss():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    assert torch.allclose(critic_loss(a, b), ((a - b) ** 2).mean())
