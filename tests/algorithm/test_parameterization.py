"""Parameterizations against ALGORITHM.md's formulas, computed independently in float64."""

import math

import pytest
import torch

from dmdr.parameterization import EpsilonPrediction, FlowMatching, classifier_free_guidance, expand_like


def _rand(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("shape", [(3, 4, 5, 7), (1, 16, 1, 1), (5, 2)])
def test_flow_matching_formulas(shape):
    p = FlowMatching(t_min=0.001)
    x0, noise, v = _rand(*shape, seed=1), _rand(*shape, seed=2), _rand(*shape, seed=3)
    t = torch.rand(shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for b in range(shape[0]):
        tb = t[b].item()
        assert torch.allclose(p.renoise(x0, noise, t)[b], (1 - tb) * x0[b] + tb * noise[b])
        assert torch.allclose(p.to_x0(x0, t, v)[b], x0[b] + (0.001 - tb) * v[b])
    assert torch.allclose(p.target(x0, noise), noise - x0)
    # the exact velocity recovers x0 up to the t_min step: x_t + (t_min - t)(eps - x0) = x_{t_min}
    x_t = p.renoise(x0, noise, t)
    assert torch.allclose(p.to_x0(x_t, t, noise - x0), p.renoise(x0, noise, torch.full_like(t, 0.001)))
    assert torch.allclose(p.model_timestep(t), 1000 * t)


def test_flow_step_is_euler():
    p = FlowMatching()
    x, v = _rand(2, 3, seed=5), _rand(2, 3, seed=6)
    t, tn = torch.tensor([0.9, 0.5], dtype=torch.float64), torch.tensor([0.7, 0.1], dtype=torch.float64)
    expected = x + (tn - t)[:, None] * v
    assert torch.allclose(p.step(x, t, tn, v), expected)


def test_epsilon_prediction_formulas():
    ab = torch.linspace(0.9999, 0.01, 1000, dtype=torch.float64)
    p = EpsilonPrediction(ab)
    x0, eps = _rand(3, 4, 2, 2, seed=7), _rand(3, 4, 2, 2, seed=8)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    x_t = p.renoise(x0, eps, t)
    for b, tb in enumerate(t.tolist()):
        pos = tb * 999
        lo = min(int(math.floor(pos)), 998)
        a = ab[lo] * (1 - (pos - lo)) + ab[lo + 1] * (pos - lo)
        assert torch.allclose(x_t[b], a.sqrt() * x0[b] + (1 - a).sqrt() * eps[b])
    assert torch.allclose(p.to_x0(x_t, t, eps), x0)
    assert torch.equal(p.target(x0, eps), eps)
    # DDIM step with the true eps lands exactly on the forward process at the next level
    tn = torch.tensor([0.0, 0.2, 0.3], dtype=torch.float64)
    assert torch.allclose(p.step(x_t, t, tn, eps), p.renoise(x0, eps, tn))


def test_epsilon_rejects_bad_table():
    with pytest.raises(ValueError):
        EpsilonPrediction(torch.tensor([1.5, 0.5]))


def test_cfg_and_expand():
    u, c = _rand(4, 3, seed=9), _rand(4, 3, seed=10)
    w = torch.tensor([0.0, 1.0, 4.0, 7.5], dtype=torch.float64)
    out = classifier_free_guidance(u, c, w)
    for b in range(4):
        assert torch.allclose(out[b], u[b] + w[b] * (c[b] - u[b]))
    assert torch.allclose(classifier_free_guidance(u, c, 3.0), u + 3 * (c - u))
    with pytest.raises(ValueError):
        expand_like(torch.ones(3), u)


def _sdxl_alphas_cumprod_f64():
    """SDXL's scaled-linear table, derived here in float64 (not read from a scheduler)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def test_discrete_epsilon_at_integer_timesteps_against_float64():
    """SDXL's levels k / 999 in float32 hit exactly alphas_cumprod[k]: renoise, x0-from-eps, and back."""
    ab = _sdxl_alphas_cumprod_f64()
    p = EpsilonPrediction(ab.float(), discrete=True)
    ks = [999, 749, 499, 399, 249, 0]
    t = torch.tensor([p.level(k) for k in ks], dtype=torch.float32)
    assert [p.level(k) * 999 for k in ks] == pytest.approx(ks, abs=1e-9)
    assert p.model_timestep(t).tolist() == ks  # the network sees the integers, not 398.99997
    x0, eps = _rand(6, 4, 3, 3, seed=11), _rand(6, 4, 3, 3, seed=12)
    a = ab.float().double()[ks].reshape(-1, 1, 1, 1)  # the scheduler stores its table in float32
    x_t = p.renoise(x0.float(), eps.float(), t)
    ref = a.sqrt() * x0 + (1 - a).sqrt() * eps
    assert torch.allclose(x_t.double(), ref, atol=1e-6, rtol=0)
    x0_hat = p.to_x0(ref.float(), t, eps.float())  # x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab)
    assert torch.allclose(x0_hat.double(), (ref - (1 - a).sqrt() * eps) / a.sqrt(), atol=1e-4, rtol=1e-5)
    assert torch.allclose(x0_hat.double()[1:], x0[1:], atol=1e-4)  # t = 999: 1/sqrt(ab) ~ 15 amplifies rounding
    # eps from (x_t, x0) and back: the prediction that gives x0 is the forward process's noise
    eps_back = (ref - a.sqrt() * x0) / (1 - a).sqrt()
    assert torch.allclose(eps_back, eps, atol=1e-10)


def test_discrete_epsilon_snaps_between_integers_and_float_mode_interpolates():
    ab = _sdxl_alphas_cumprod_f64()
    x = torch.ones(2, 1)
    t = torch.tensor([(399 + 0.4) / 999, (399 + 0.6) / 999], dtype=torch.float64)
    snapped = EpsilonPrediction(ab, discrete=True).alpha_bar(t, x.double()).flatten()
    assert torch.allclose(snapped, ab[[399, 400]])
    smooth = EpsilonPrediction(ab).alpha_bar(t, x.double()).flatten()
    assert torch.allclose(smooth, torch.stack([0.6 * ab[399] + 0.4 * ab[400], 0.4 * ab[399] + 0.6 * ab[400]]))


def test_epsilon_sampler_step_is_x0_then_renoise():
    """The ode step predicts x0 and renoises it to the next integer level with the predicted eps (DDIM);
    the sde sampler renoises the same x0 with fresh noise (LCM's multi-step sampling)."""
    from dmdr.sampling import few_step_sample
    from dmdr.schedules import generator_levels

    ab = _sdxl_alphas_cumprod_f64()
    p = EpsilonPrediction(ab, discrete=True)
    levels = generator_levels(4, 1.0, 0.0, (999, 749, 499, 249), p).double()
    assert (levels * 999).round().tolist() == [999, 749, 499, 249, 0]
    assert generator_levels(1, 1.0, 0.0, (399,), p).double().mul(999).round().tolist() == [399, 0]
    x, eps = _rand(2, 3, seed=13), _rand(2, 3, seed=14)
    x0 = (x - (1 - ab[999]).sqrt() * eps) / ab[999].sqrt()
    expected = ab[749].sqrt() * x0 + (1 - ab[749]).sqrt() * eps
    assert torch.allclose(p.step(x, levels[0], levels[1], eps), expected)

    calls = []

    def fn(x_t, t, cond):
        calls.append((x_t.clone(), t.clone()))
        return 0.5 * x_t

    g = torch.Generator().manual_seed(3)
    out = few_step_sample(fn, x, None, levels, p, mode="sde", generator=torch.Generator().manual_seed(3))
    cur = x
    for i, k in enumerate([999, 749, 499, 249]):
        assert torch.allclose(calls[i][0], cur, atol=1e-12) and p.model_timestep(calls[i][1]).tolist() == [k, k]
        x0_i = (cur - (1 - ab[k]).sqrt() * 0.5 * cur) / ab[k].sqrt()
        if i == 3:
            assert torch.allclose(out, x0_i)
        else:
            k_next = [749, 499, 249][i]
            fresh = torch.randn(x.shape, generator=g, dtype=torch.float32).double()
            cur = ab[k_next].sqrt() * x0_i + (1 - ab[k_next]).sqrt() * fresh
