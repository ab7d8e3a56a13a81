"""Analytic rewards: values against their closed forms, gradients that reach the inputs, bad inputs refused."""

import math

import pytest
import torch

from dmdr.losses.rl.refl import refl_loss
from dmdr.rewards.analytic import BrightnessReward, ColorReward, RegionReward
from dmdr.rewards.base import Reward


def test_region_reward_matches_formula():
    reward = RegionReward(direction=(3.0, 4.0), offset=1.0, temperature=0.5)
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [-1.0, 2.0]])
    # u = (0.6, 0.8): x.u = 0, 5, 1 -> sigmoid((x.u - 1) / 0.5)
    expected = torch.tensor([1 / (1 + math.exp(2.0)), 1 / (1 + math.exp(-8.0)), 0.5])
    assert torch.allclose(reward(x, ["a", "b", "c"]), expected, atol=1e-6)


def test_region_reward_gradient_points_along_direction():
    reward = RegionReward(direction=(0.0, 2.0), temperature=2.0)
    x = torch.tensor([[1.0, -3.0], [0.5, 0.0]], requires_grad=True)
    reward(x, []).sum().backward()
    s = torch.sigmoid(torch.tensor([-3.0, 0.0]) / 2.0)
    # d/dx sigmoid(x.u / T) = s (1 - s) u / T with u = (0, 1)
    assert torch.allclose(x.grad[:, 0], torch.zeros(2))
    assert torch.allclose(x.grad[:, 1], s * (1 - s) / 2.0, atol=1e-6)


def test_brightness_reward_is_mean_luma():
    img = torch.zeros(2, 3, 4, 5)
    img[0, 0] = 1.0  # pure red
    img[1] = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(0))
    luma = 0.299 * img[1, 0] + 0.587 * img[1, 1] + 0.114 * img[1, 2]
    out = BrightnessReward()(img, ["", ""])
    assert torch.allclose(out, torch.stack([torch.tensor(0.299), luma.mean()]), atol=1e-6)
    assert BrightnessReward()(torch.ones(1, 3, 2, 2), [""]).item() == pytest.approx(1.0)


def test_color_reward_matches_formula_and_peaks_at_target():
    reward = ColorReward(target=(1.0, 0.5, 0.0))
    img = torch.rand(3, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([1.0, 0.5, 0.0]).view(1, 3, 1, 1)
    expected = 1 - ((img - target) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(reward(img, []), expected, atol=1e-6)
    assert reward(target.expand(1, 3, 6, 6).clone(), []).item() == pytest.approx(1.0)
    assert ColorReward(target=(0.0, 0.0, 0.0))(torch.ones(1, 3, 2, 2), []).item() == pytest.approx(0.0)


@pytest.mark.parametrize("reward,shape", [
    (RegionReward((1.0, 0.0)), (4, 2)),
    (BrightnessReward(), (4, 3, 8, 8)),
    (ColorReward((0.2, 0.9, 0.1)), (4, 3, 8, 8)),
])
def test_rewards_follow_protocol_and_feed_refl_gradients(reward, shape):
    assert isinstance(reward, Reward)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(2), requires_grad=True)
    loss, stats = refl_loss(x, ["p"] * shape[0], [(reward, 0.5)], margin=1.0)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    scores = reward(x.detach(), [])
    assert scores.shape == (shape[0],) and ((scores >= 0) & (scores <= 1)).all()
    assert stats[f"reward/{reward.name}"] == pytest.approx(scores.mean().item(), abs=1e-6)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="direction"):
        RegionReward((0.0, 0.0))
    with pytest.raises(ValueError, match="temperature"):
        RegionReward((1.0, 0.0), temperature=0.0)
    with pytest.raises(ValueError, match="coordinates"):
        RegionReward((1.0, 0.0))(torch.zeros(2, 3), [])
    with pytest.raises(ValueError, match="target"):
        ColorReward((1.5, 0.0, 0.0))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        BrightnessReward()(torch.zeros(2, 4, 3, 3), [])
