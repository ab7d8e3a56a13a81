"""Schedules against ALGORITHM.md: shifted few-step levels, cosine DynaDG, DynaRS Beta decay."""

import math

import pytest
import torch

from dmdr.schedules import DynaRSSampler, cosine_decay, dynadg_real_scale, dynars_beta, few_step_timesteps


@pytest.mark.parametrize("n,shift", [(1, 1.0), (4, 3.0), (4, 5.0), (2, 3.0)])
def test_few_step_timesteps(n, shift):
    t = few_step_timesteps(n, shift, t_min=0.001)
    assert t.shape == (n + 1,)
    for i in range(n + 1):
        raw = 1.0 + (0.001 - 1.0) * i / n
        expected = shift * raw / (1 + (shift - 1) * raw)
        if i == n:
            expected = 0.001
        assert t[i].item() == pytest.approx(expected, rel=1e-6)
    assert torch.all(t[:-1] > t[1:])


def test_few_step_known_values():
    # N=4, s=3: linspace(1, .001, 5) = 1, .75025, .5005, .25075, .001
    t = few_step_timesteps(4, 3.0)
    assert t[1].item() == pytest.approx(3 * 0.75025 / (1 + 2 * 0.75025), rel=1e-6)
    assert t[0].item() == 1.0 and t[-1].item() == pytest.approx(0.001)


def test_dynadg_is_cosine_and_hits_zero():
    s0, d = 0.5, 2000
    assert dynadg_real_scale(0, s0, d) == pytest.approx(0.5)
    assert dynadg_real_scale(1000, s0, d) == pytest.approx(0.25)
    k = 500
    assert dynadg_real_scale(k, s0, d) == pytest.approx(s0 * 0.5 * (1 + math.cos(math.pi * k / d)))
    # cosine, not linear: at D/4 it is above the linear ramp
    assert dynadg_real_scale(500, s0, d) > s0 * (1 - 500 / d)
    assert dynadg_real_scale(d, s0, d) == 0.0 and dynadg_real_scale(d + 7, s0, d) == 0.0


def test_dynars_params():
    assert dynars_beta(0, 4.0, 1.5, 2000) == pytest.approx((4.0, 1.5))
    assert dynars_beta(2000, 4.0, 1.5, 2000) == pytest.approx((1.0, 1.0))
    assert dynars_beta(5000, 4.0, 1.5, 2000) == pytest.approx((1.0, 1.0))
    c = 0.5 * (1 + math.cos(math.pi * 0.3))
    assert dynars_beta(600, 4.0, 1.5, 2000) == pytest.approx((1 + 3 * c, 1 + 0.5 * c))
    # a biased end: the decay lands on Beta(end) and stays there; end = the start keeps the levels constant
    assert dynars_beta(600, 4.0, 1.5, 2000, end=(2.0, 1.0)) == pytest.approx((2 + 2 * c, 1 + 0.5 * c))
    assert dynars_beta(2500, 4.0, 1.5, 2000, end=(2.0, 1.0)) == pytest.approx((2.0, 1.0))
    assert dynars_beta(900, 4.0, 1.5, 2000, end=(4.0, 1.5)) == pytest.approx((4.0, 1.5))
    assert cosine_decay(0, 0) == 0.0


def test_dynars_sampler_distribution():
    s = DynaRSSampler(alpha=4.0, beta=1.5, decay_steps=2000, t_min=0.001)
    g = torch.Generator().manual_seed(0)
    t0 = s.sample(0, 40000, g)
    assert t0.mean().item() == pytest.approx(4 / 5.5, abs=0.01)  # Beta(4, 1.5) mean ~ 0.727
    var = 4 * 1.5 / (5.5**2 * 6.5)
    assert t0.var().item() == pytest.approx(var, rel=0.05)
    tend = s.sample(2000, 40000, g)
    assert tend.mean().item() == pytest.approx(0.5, abs=0.01)
    assert tend.var().item() == pytest.approx(1 / 12, rel=0.05)
    assert t0.min().item() >= 0.001 and t0.max().item() < 1.0
    # the same generator state gives the same draws (resumability)
    a = s.sample(10, 8, torch.Generator().manual_seed(3))
    b = s.sample(10, 8, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert DynaRSSampler(enabled=False).params(0) == (1.0, 1.0)


@pytest.mark.parametrize("step", [0, 1, 999, 2000, 5000])
def test_constant_schedule_holds_the_step0_values_for_the_whole_run(step):
    # The paper's "-Dynamic" ablation: a fixed real-score LoRA scale and biased renoise levels throughout.
    assert dynadg_real_scale(step, 0.5, 2000, "constant") == 0.5
    assert dynars_beta(step, 4.0, 1.5, 2000, "constant") == (4.0, 1.5)
    s = DynaRSSampler(alpha=4.0, beta=1.5, decay_steps=2000, schedule="constant")
    assert s.mean(step) == pytest.approx(4.0 / 5.5)
    # the default is the dynamic (cosine) schedule, bit for bit
    assert dynadg_real_scale(step, 0.5, 2000) == dynadg_real_scale(step, 0.5, 2000, "cosine")


def test_unknown_cold_start_schedule_fails_when_built():
    with pytest.raises(ValueError, match="linear"):
        DynaRSSampler(schedule="linear")
