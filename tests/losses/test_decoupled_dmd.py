"""Decoupled DMD against float64 references: equal weights and a shared level give the coupled loss; the DM
and CA terms at their own levels and weights; one critic forward either way; off by default."""

from __future__ import annotations

import pytest
import torch

from dmdr.algorithm import DecoupledDMD, dmd_generator_loss
from dmdr.config import TrainConfig, apply_overrides
from dmdr.parameterization import FlowMatching

PARAM = FlowMatching(t_min=0.001)
B, C, H, W = 3, 2, 4, 5


class Critic:
    """A fixed nonlinear 'teacher + critic LoRA': prediction depends on x, t, cond and the per-sample scale."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.m = torch.randn(C, C, generator=g, dtype=torch.float64)
        self.calls = 0

    def __call__(self, x, t, cond, scale):
        self.calls += 1
        x = x.double()
        s = scale.double().view(-1, 1, 1, 1) if torch.is_tensor(scale) else scale
        mixed = torch.einsum("bchw,cd->bdhw", x, self.m)
        return (torch.tanh(mixed) * (1 + s) + cond.double().view(-1, 1, 1, 1) * t.double().view(-1, 1, 1, 1)).float()


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, C, H, W, generator=g)
    cond = torch.rand(B, generator=g) + 0.5
    uncond = torch.zeros(B)
    t_d = torch.rand(B, generator=g) * 0.8 + 0.1
    return x0, cond, uncond, t_d


def _x0_hat(x, t, pred):
    return x + (PARAM.t_min - t.view(-1, 1, 1, 1)) * pred


def _reference(x0, cond, uncond, critic, t_dm, eps_dm, t_ca, eps_ca, w, s_r, s_f, dm_weight, ca_weight):
    """The ALGORITHM.md formulas in float64 from scratch: g = a DM/n(t_dm) + b (w - 1) CA/n(t_ca)."""
    x0 = x0.double()

    def terms(t, eps):
        x = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps.double()
        full = torch.full((B,), float(s_r), dtype=torch.float64)
        v_u = critic(x, t, uncond, full).double()
        v_c = critic(x, t, cond, full).double()
        v_f = critic(x, t, cond, torch.full((B,), float(s_f), dtype=torch.float64)).double()
        u, c, f = _x0_hat(x, t, v_u), _x0_hat(x, t, v_c), _x0_hat(x, t, v_f)
        real = u + w * (c - u)
        n = (x0 - real).abs().mean(dim=(1, 2, 3), keepdim=True) + 1e-8
        return u, c, f, n

    _, c_dm, f_dm, n_dm = terms(t_dm, eps_dm)
    u_ca, c_ca, _, n_ca = terms(t_ca, eps_ca)
    return dm_weight * (f_dm - c_dm) / n_dm + ca_weight * (w - 1) * (u_ca - c_ca) / n_ca


def test_equal_weights_and_shared_level_equal_the_coupled_loss():
    x0, cond, uncond, t_d = _inputs()
    w, s_r, s_f = 4.5, 0.3, 2.0
    critic = Critic()
    coupled = dmd_generator_loss(x0, cond, uncond, critic, PARAM, t_d, w, s_r, s_f,
                                 generator=torch.Generator().manual_seed(5))
    decoupled = dmd_generator_loss(x0, cond, uncond, critic, PARAM, t_d, w, s_r, s_f,
                                   generator=torch.Generator().manual_seed(5), decoupled=DecoupledDMD())
    eps = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(5))
    ref = _reference(x0, cond, uncond, critic, t_d, eps, t_d, eps, w, s_r, s_f, 1.0, 1.0)
    torch.testing.assert_close(coupled.grad.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(decoupled.grad.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(decoupled.grad, coupled.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(decoupled.loss, coupled.loss, rtol=1e-5, atol=1e-8)
    assert torch.equal(decoupled.x_d, coupled.x_d)
    # the gradient the generator receives: g / numel, as the coupled loss
    x = x0.clone().requires_grad_(True)
    dmd_generator_loss(x, cond, uncond, critic, PARAM, t_d, w, s_r, s_f, generator=torch.Generator().manual_seed(5),
                       decoupled=DecoupledDMD()).loss.backward()
    torch.testing.assert_close(x.grad.double(), ref / x0.numel(), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("dm_weight,ca_weight", [(0.25, 1.5), (0.0, 1.0), (1.0, 0.0)])
def test_terms_at_their_own_levels_and_weights(dm_weight, ca_weight):
    x0, cond, uncond, t_d = _inputs(2)
    t_ca = torch.tensor([0.95, 0.6, 0.3])
    w, s_r, s_f = 3.0, 0.0, 2.0
    critic = Critic()
    out = dmd_generator_loss(x0, cond, uncond, critic, PARAM, t_d, w, s_r, s_f,
                             generator=torch.Generator().manual_seed(7),
                             decoupled=DecoupledDMD(dm_weight=dm_weight, ca_weight=ca_weight, t_ca=t_ca))
    assert critic.calls == 1  # DM (uncond, cond, fake) and CA (uncond, cond) as ONE 5x forward
    g = torch.Generator().manual_seed(7)
    eps_dm = torch.randn(B, C, H, W, generator=g)
    eps_ca = torch.randn(B, C, H, W, generator=g)
    ref = _reference(x0, cond, uncond, critic, t_d, eps_dm, t_ca, eps_ca, w, s_r, s_f, dm_weight, ca_weight)
    torch.testing.assert_close(out.grad.double(), ref, rtol=1e-5, atol=1e-5)


def test_decoupled_is_off_by_default_and_configurable():
    cfg = TrainConfig()
    assert cfg.dmd.decoupled is False
    cfg = apply_overrides(TrainConfig(), ["--dmd.decoupled", "true", "--dmd.ca_weight", "2", "--dmd.ca_levels",
                                          "beta", "--dmd.ca_alpha", "4"])
    assert (cfg.dmd.decoupled, cfg.dmd.ca_weight, cfg.dmd.ca_levels, cfg.dmd.ca_alpha) == (True, 2.0, "beta", 4.0)
