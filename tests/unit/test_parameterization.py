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
